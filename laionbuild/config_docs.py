"""The reference of every config key (docs/config.md), generated from the dataclasses of
:mod:`laionbuild.config`: type, default and the ``#:`` comment above each field.

``python -m laionbuild.config_docs`` prints it; ``--write`` updates docs/config.md;
``--check`` exits 1 when docs/config.md is not what the code says.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping

from .config import RETIRED_KEYS, ClipModelConfig, Config, config_to_dict

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"
#: defaults longer than this many characters are shown cut, with the count of items
MAX_DEFAULT_CHARS = 60
#: the key under a mapping of per-subset model settings
SUBSET_PLACEHOLDER = "<subset>"

HEADER = """# Configuration reference

Every key a config file (`configs/*.yaml`) or `--set dotted.key=value` may set, with its type,
its default (what `laionbuild` uses when the key is absent) and what it does. Unknown keys are
refused. This page is generated from the dataclasses in `laionbuild/config.py`
(`python -m laionbuild.config_docs --write`); a test checks that it is in sync.
Command-line options set some keys: `--output` `run.output`, `--input` `run.inputs`, `--limit`
`run.limit`, `--shard` `run.shard`, `--force` `run.force`, `--no-progress` `run.progress`,
`--address` `ray.address`, `--local` `ray.local`, `--offline` `models.offline`,
`--cache` `models.cache`.
Retired keys that no longer do anything ({retired}) are ignored with a warning,
so that the `config.yaml` of an older output folder still loads.
"""


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str
    type: str
    default: Any
    meaning: str


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: text}`` of the ``#:`` comment lines right above each field of a dataclass."""
    src = textwrap.dedent("".join(inspect.getsourcelines(cls)[0]))
    tree = ast.parse(src)
    out: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    lines = src.splitlines()
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment: list[str] = []
            i = node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                comment.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            out[node.target.id] = " ".join(comment)
    return out


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is tuple:
        return f"list of {_type_text(args[0])}" if args else "list"
    if origin in (Mapping, dict) or tp in (dict, Mapping) or origin is typing.get_origin(Mapping[str, str]):
        if args:
            return f"mapping {_type_text(args[0])} -> {_type_text(args[1])}"
        return "mapping"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def iter_keys(cls: type = Config, prefix: str = "") -> Iterator[KeyDoc]:
    """Every settable key under ``cls``, in declaration order (nested sections expanded)."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    defaults = config_to_dict(cls()) if dataclasses.is_dataclass(cls) else {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, f"{key}.")
            continue
        args = typing.get_args(tp)
        if args and len(args) == 2 and args[1] is ClipModelConfig:
            default = defaults[f.name]
            subsets = ", ".join(default)
            meaning = comments[f.name] or f"one entry per subset ({subsets}); each has the keys below"
            yield KeyDoc(key, f"mapping subset -> model ({subsets})", None, meaning)
            for sub in iter_keys(ClipModelConfig, f"{key}.{SUBSET_PLACEHOLDER}."):
                per_subset = {s: default[s][sub.key.rsplit(".", 1)[-1]] for s in default}
                values = set(json.dumps(v) for v in per_subset.values())
                yield dataclasses.replace(sub, default=next(iter(per_subset.values())) if len(values) == 1
                                          else per_subset)
            continue
        yield KeyDoc(key, _type_text(tp), defaults[f.name], comments[f.name])


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > MAX_DEFAULT_CHARS:
        count = f"{len(value)} items: " if isinstance(value, (list, tuple, dict)) else ""
        text = f"{count}{text[:MAX_DEFAULT_CHARS]}…"
    return f"`{text}`".replace("|", "\\|")


def _section_doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def render() -> str:
    """The whole of docs/config.md."""
    parts = [HEADER.format(retired=", ".join(f"`{k}`" for k in RETIRED_KEYS))]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        parts.append(f"\n## `{section.name}`\n\n{_section_doc(cls)}\n\n| key | type | default | meaning |\n"
                     "| --- | --- | --- | --- |")
        for k in iter_keys(cls, f"{section.name}."):
            if k.default is None and k.type.startswith("mapping subset"):
                default = ""
            elif SUBSET_PLACEHOLDER in k.key and isinstance(k.default, dict):  # differs between subsets
                default = ", ".join(f"{s}: {_default_text(v)}" for s, v in k.default.items())
            else:
                default = _default_text(k.default)
            meaning = k.meaning.replace("``", "`").replace("|", "\\|")
            parts.append(f"| `{k.key}` | {k.type} | {default} | {meaning} |")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--write" in argv:
        DOC_PATH.write_text(text, encoding="utf-8")
        return 0
    if "--check" in argv:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else ""
        if current != text:
            print(f"{DOC_PATH} is out of date: run python -m laionbuild.config_docs --write", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
