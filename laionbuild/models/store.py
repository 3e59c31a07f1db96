"""Getting model files into the cache, onto each node, and into provenance.

* :func:`pull` downloads what :func:`~laionbuild.models.requirements.required_models`
  finds missing: Hugging Face files with ``huggingface_hub`` (which honours
  ``HF_ENDPOINT``) into the hub cache layout the loaders read, plain URLs and LAION's
  released safety models with :func:`~laionbuild.models.download.download_url`
  (resumable, verified, atomic), converting released files to our formats. Each
  fetched file is recorded (source, sha256, size) in ``<cache>/models.lock.json``.
  With a URL cache (``s3://``, ``gs://``...) files are fetched into the local folder
  and uploaded; the record is uploaded last.
* :func:`ensure_models` is what a run calls on the driver before its preflight:
  pull what is missing unless offline, then return the config with local paths.
* :func:`localize_models` is what each actor / node calls: copy the cache's files
  for this config onto the node once (under a file lock) and return the config
  pointing at the local copies.
* :func:`model_provenance` gives the record for ``provenance.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..config import Config
from ..errors import ModelMissingError, SetupError
from ..output.fs import open_fs
from .download import ModelDownloadError, HTTPStatusError, download_url, partial_path, sha256_file
from .hosts import HOST_PROBE_TIMEOUT_S, hf_endpoint, source_origins, unreachable_origins
from .hub import quiet_library_handlers
from .requirements import (
    RELEASE_PREFIX,
    RELEASES,
    CacheLayout,
    ModelRequirement,
    cache_layout,
    env_offline,
    required_models,
)

log = logging.getLogger(__name__)

LOCK_NAME = "models.lock.json"
LOCK_FORMAT = "laionbuild.models-lock/1"
_NODE_LOCK = ".localize.lock"
_ST_OPTIONAL = ("tokenizer_config.json", "special_tokens_map.json", "sentence_bert_config.json",
                "config_sentence_transformers.json", "tokenizer.json", "sentencepiece.bpe.model", "vocab.txt",
                "spiece.model")


@dataclass
class ModelsReport:
    """Outcome of :func:`ensure_models`."""

    #: the config with local paths (what the stages must be given)
    config: Config
    present: list[str] = field(default_factory=list)
    pulled: list[dict[str, Any]] = field(default_factory=list)
    #: requirements still missing that ``pull`` cannot fetch (the preflight names them)
    unfetchable: list[str] = field(default_factory=list)
    offline: bool = False


# --------------------------------------------------------------------------- lock file
def _read_lock_text(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        return {"format": LOCK_FORMAT, "files": {}}
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return {"format": LOCK_FORMAT, "files": {}}
    return data


def read_lock(root: str | Path) -> dict[str, Any]:
    """The record of fetched files in a cache folder or URL (empty when there is none)."""
    root = str(root)
    if "://" in root:
        try:
            fs, path = open_fs(root)
            target = path.rstrip("/") + "/" + LOCK_NAME
            if not fs.exists(target):
                return {"format": LOCK_FORMAT, "files": {}}
            with fs.open(target, "rb") as f:
                return _read_lock_text(f.read().decode("utf-8"))
        except (ImportError, OSError, ValueError) as exc:
            raise SetupError(f"models.cache {root}: cannot be read ({type(exc).__name__}: {exc})") from None
    p = Path(root) / LOCK_NAME
    return _read_lock_text(p.read_text(encoding="utf-8")) if p.is_file() else {"format": LOCK_FORMAT, "files": {}}


def _merge_records(data: dict[str, Any], records: Iterable[dict[str, Any]]) -> None:
    """Add ``records`` to a lock mapping; a file shared by several requirements lists them all."""
    for rec in records:
        entry = {k: v for k, v in rec.items() if k not in ("file", "requirement")}
        old = data["files"].get(rec["file"], {})
        needs = set(old.get("requirements", [])) | set(rec.get("requirements", []))
        if rec.get("requirement"):
            needs.add(rec["requirement"])
        entry["requirements"] = sorted(needs)
        data["files"][rec["file"]] = entry


def _update_lock(root: Path, records: Iterable[dict[str, Any]]) -> Path:
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    with FileLock(str(root / ".models.lock.json.lock")):
        data = read_lock(root)
        _merge_records(data, records)
        data["format"] = LOCK_FORMAT
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = path.with_name(f".{LOCK_NAME}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    return path


def _record(req: ModelRequirement, path: str | Path, source: str, root: Path, **extra: Any) -> dict[str, Any]:
    path = Path(path)
    try:
        key = str(path.relative_to(root))
    except ValueError:
        key = str(path)
    rec = {"file": key, "requirement": req.id, "kind": req.kind, "name": req.name, "source": source,
           "sha256": sha256_file(path), "size": path.stat().st_size,
           "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rec.update(extra)
    return rec


# --------------------------------------------------------------------------- fetching
def _hf_endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _hf_download(repo: str, filename: str, cache_dir: str | None) -> str | None:
    """Download one file of a Hugging Face repo into the hub cache; None when the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError

    quiet_library_handlers()
    try:
        path = hf_hub_download(repo, filename, cache_dir=cache_dir, endpoint=_hf_endpoint())
    except EntryNotFoundError:
        return None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 404:
            return None
        raise ModelDownloadError(f"Hugging Face {repo}/{filename}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ModelDownloadError(f"Hugging Face {repo}/{filename}: {type(exc).__name__}: {exc}") from None
    blob = os.path.realpath(path)
    etag = os.path.basename(blob)
    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
        digest = sha256_file(blob)
        if digest != etag:
            for p in {path, blob}:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise ModelDownloadError(
                f"Hugging Face {repo}/{filename}: checksum mismatch (sha256 {digest}, the hub says {etag}); "
                f"the file was deleted from the cache"
            )
    return path


def _hf_source(repo: str, path: str) -> tuple[str, str]:
    parts = Path(path).parts
    i = parts.index("snapshots") if "snapshots" in parts else -1
    commit = parts[i + 1] if i >= 0 else "main"
    name = "/".join(parts[i + 2:]) if i >= 0 else os.path.basename(path)
    endpoint = hf_endpoint()
    return f"{endpoint}/{repo}/resolve/{commit}/{name}", commit


def _hf_refs(path: str) -> list[Path]:
    """The ``refs/*`` files of the repo folder holding ``path`` (they map ``main`` to the snapshot)."""
    parts = Path(path).parts
    if "snapshots" not in parts:
        return []
    repo_dir = Path(*parts[: parts.index("snapshots")])
    return sorted(p for p in (repo_dir / "refs").glob("*") if p.is_file())


def _fetch_hf(req: ModelRequirement, root: Path) -> list[dict[str, Any]]:
    f = req.fetch
    for name in f["files"]:
        path = _hf_download(f["repo"], name, f["cache_dir"])
        if path:
            extra = [p for p in (_hf_download(f["repo"], n, f["cache_dir"]) for n in f.get("optional", ())
                                 if n != name) if p]
            return _hf_records(req, f["repo"], [path, *extra], root)
    raise ModelDownloadError(f"Hugging Face repo {f['repo']} has none of {', '.join(f['files'])}")


def _hf_records(req: ModelRequirement, repo: str, paths: list[str], root: Path) -> list[dict[str, Any]]:
    out, refs = [], set()
    for path in paths:
        source, commit = _hf_source(repo, path)
        out.append(_record(req, path, source, root, commit=commit))
        refs.update(_hf_refs(path))
    for ref in refs:
        out.append(_record(req, ref, f"hf://{repo}/refs/{ref.name}", root))
    return out


def _fetch_hf_st(req: ModelRequirement, root: Path) -> list[dict[str, Any]]:
    """A sentence-transformers repo: ``modules.json`` and the files of each module it lists."""
    repo, cache_dir = req.fetch["repo"], req.fetch["cache_dir"]
    modules = _hf_download(repo, "modules.json", cache_dir)
    if modules is None:
        raise ModelDownloadError(f"Hugging Face repo {repo} has no modules.json: not a sentence-transformers model")
    paths = [modules]
    required = [("config.json",), ("model.safetensors", "pytorch_model.bin")]
    optional = [(n,) for n in _ST_OPTIONAL]
    for module in json.loads(Path(modules).read_text(encoding="utf-8")):
        sub = str(module.get("path", "")).strip("/")
        if sub:
            optional += [(f"{sub}/config.json",), (f"{sub}/model.safetensors", f"{sub}/pytorch_model.bin")]
    for alts, needed in [(a, True) for a in required] + [(a, False) for a in optional]:
        got = next((p for p in (_hf_download(repo, n, cache_dir) for n in alts) if p), None)
        if got is None and needed:
            raise ModelDownloadError(f"Hugging Face repo {repo} has none of {', '.join(alts)}")
        if got and got not in paths:
            paths.append(got)
    return _hf_records(req, repo, paths, root)


def _download_first(urls: list[str], dest: Path, *, sha256: str, cfg: Config, progress: bool):
    last: Exception | None = None
    for url in urls:
        try:
            return download_url(url, dest, expected_sha256=sha256, attempts=cfg.models.download_retries,
                                timeout=cfg.models.download_timeout_s, progress=progress)
        except HTTPStatusError as exc:
            log.info("%s: %s; trying the next source", url, exc)
            last = exc
    raise ModelDownloadError(f"no source answered for {dest.name}: {last}")


def _fetch_url(req: ModelRequirement, root: Path, cfg: Config, progress: bool) -> list[dict[str, Any]]:
    got = _download_first(req.fetch["urls"], Path(req.fetch["dest"]), sha256=req.sha256, cfg=cfg, progress=progress)
    return [_record(req, got.path, got.url, root)]


def _fetch_release(req: ModelRequirement, root: Path, layout: CacheLayout, cfg: Config,
                   progress: bool) -> list[dict[str, Any]]:
    rel = RELEASES[req.fetch["release"]]
    dest = layout.release_path(rel.name)
    folder = dest.parent
    if not rel.convert:
        got = _download_first(req.fetch["urls"], dest, sha256=rel.sha256, cfg=cfg, progress=progress)
        return [_record(req, got.path, got.url, root)]
    source_dir = folder / "source"
    got = None
    last: Exception | None = None
    for url in req.fetch["urls"]:
        try:
            got = download_url(url, source_dir / url.rsplit("/", 1)[-1], expected_sha256=rel.sha256,
                               attempts=cfg.models.download_retries, timeout=cfg.models.download_timeout_s,
                               progress=progress)
            break
        except HTTPStatusError as exc:
            log.info("%s: %s; trying the next source", url, exc)
            last = exc
    if got is None:
        raise ModelDownloadError(f"no source answered for {rel.name}: {last}")
    tmp = folder / f".{dest.name}.converting"
    from . import convert

    try:
        if rel.convert == "nsfw-head":
            convert.convert_nsfw_head(got.path, tmp, clip_model=rel.clip_model, name=rel.name)
        elif rel.convert == "watermark":
            convert.convert_laion_watermark(got.path, tmp, name=rel.name)
        else:  # pragma: no cover - the table only names the converters above
            raise ModelDownloadError(f"{rel.name}: unknown converter {rel.convert}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("converted %s -> %s", got.path.name, dest)
    return [_record(req, got.path, got.url, root, role="original"),
            _record(req, dest, f"converted from {got.path.name}", root, converted_from=got.sha256)]


def _probe_timeout(cfg: Config) -> float:
    return min(HOST_PROBE_TIMEOUT_S, cfg.models.download_timeout_s)


def _fetch_one(req: ModelRequirement, layout: CacheLayout, cfg: Config, progress: bool) -> list[dict[str, Any]]:
    kind = req.fetch["type"]
    if kind == "hf":
        return _fetch_hf(req, layout.root)
    if kind == "hf-st":
        return _fetch_hf_st(req, layout.root)
    if kind == "url":
        return _fetch_url(req, layout.root, cfg, progress)
    if kind == "release":
        return _fetch_release(req, layout.root, layout, cfg, progress)
    raise ModelDownloadError(f"{req.name}: unknown source type {kind}")


def pull(cfg: Config, *, cache: str | None = None, progress: bool = True,
         requirements: list[ModelRequirement] | None = None) -> list[dict[str, Any]]:
    """Fetch every missing model file of ``cfg`` into its cache; returns the lock records written.

    Every missing file is tried (each host is first asked once whether it answers at all);
    when some fail, :class:`ModelDownloadError` (a ``SetupError``) names each of them with
    its reason. The files fetched stay in the cache and are recorded.
    """
    layout = cache_layout(cfg.models, cache)
    reqs = required_models(cfg, cache=cache) if requirements is None else requirements
    todo = [r for r in reqs if not r.present and r.fetch]
    down = unreachable_origins([r.fetch for r in todo], _probe_timeout(cfg))
    records: list[dict[str, Any]] = []
    failed: list[str] = []
    try:
        for req in todo:
            origins = source_origins(req.fetch)
            if origins and all(o in down for o in origins):
                reason = "; ".join(f"{o} is unreachable: {down[o]}" for o in origins)
                log.debug("cannot fetch %s (%s): %s", req.name, req.kind, reason)
                failed.append(f"{req.name} ({reason})")
                continue
            log.info("fetching %s (%s) from %s", req.name, req.kind, req.source)
            try:
                records += _fetch_one(req, layout, cfg, progress)
            except ModelDownloadError as exc:
                log.debug("cannot fetch %s (%s): %s", req.name, req.kind, exc)
                failed.append(f"{req.name} ({exc})")
    finally:
        if records:
            _update_lock(layout.root, records)
            if layout.copy:
                _upload(layout, records)
    if failed:
        raise ModelDownloadError(f"{len(failed)} of {len(todo)} missing model file(s) could not be fetched: "
                                 + "; ".join(failed))
    return records


# --------------------------------------------------------------------------- cluster cache
def _upload(layout: CacheLayout, records: list[dict[str, Any]]) -> None:
    """Copy fetched files (those under the local root) to the cache, then its updated record."""
    fs, base = open_fs(layout.cache)
    remote_lock = read_lock(layout.cache)
    for rec in records:
        if os.path.isabs(rec["file"]):
            continue
        target = f"{base}/{rec['file']}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(layout.root / rec["file"]), target)
    _merge_records(remote_lock, [r for r in records if not os.path.isabs(r["file"])])
    remote_lock["format"] = LOCK_FORMAT
    remote_lock["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with fs.open(f"{base}/{LOCK_NAME}", "wb") as f:
        f.write(json.dumps(remote_lock, indent=1, sort_keys=True).encode("utf-8"))
    log.info("uploaded %d file(s) to %s", sum(not os.path.isabs(r["file"]) for r in records), layout.cache)


def localize_files(cfg: Config) -> dict[str, list[str]]:
    """Copy the cache's files that ``cfg`` needs onto this node's ``models.local_dir``, once per node.

    Only files recorded in the cache's ``models.lock.json`` are copied, each verified
    against its recorded sha256 and renamed into place. A node-wide file lock makes
    concurrent callers (several actors on one node) wait for the first, which copies;
    the others find the files there. Returns ``{"copied": [...], "reused": [...]}``.
    """
    layout = cache_layout(cfg.models)
    out: dict[str, list[str]] = {"copied": [], "reused": []}
    if not layout.copy:
        return out
    reqs = required_models(cfg)
    wanted = {r.id for r in reqs}
    # a config already made local names released files by path: match those by path too
    wanted_paths = set()
    for r in reqs:
        try:
            wanted_paths.add(str(Path(r.path).relative_to(layout.root)))
        except ValueError:
            pass
    lock = read_lock(layout.cache)
    todo = {k: v for k, v in lock["files"].items()
            if not os.path.isabs(k) and v.get("role") != "original"
            and (wanted.intersection(v.get("requirements", [])) or k in wanted_paths)}
    if not todo:
        return out
    from filelock import FileLock

    layout.root.mkdir(parents=True, exist_ok=True)
    fs, base = open_fs(layout.cache) if "://" in layout.cache else open_fs(Path(layout.cache).as_uri())
    with FileLock(str(layout.root / _NODE_LOCK)):
        for rel, rec in sorted(todo.items()):
            dst = layout.root / rel
            if dst.is_file() and dst.stat().st_size == rec.get("size"):
                out["reused"].append(rel)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            part = partial_path(dst)
            with fs.open(f"{base}/{rel}", "rb") as src, open(part, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
            digest = sha256_file(part)
            if rec.get("sha256") and digest != rec["sha256"]:
                part.unlink(missing_ok=True)
                raise ModelDownloadError(f"{layout.cache}/{rel}: sha256 {digest} differs from the recorded "
                                         f"{rec['sha256']}; pull it again")
            os.replace(part, dst)
            out["copied"].append(rel)
        if out["copied"]:
            _update_lock(layout.root, [{"file": k, **todo[k]} for k in out["copied"]])
    if out["copied"]:
        log.info("copied %d model file(s) from %s to %s", len(out["copied"]), layout.cache, layout.root)
    return out


def local_config(cfg: Config) -> Config:
    """``cfg`` with every model setting pointing at this node's files (no copying; see :func:`localize_models`).

    ``release:<name>`` values become the converted file's path; CLIP models without
    their own ``cache_dir`` read ``<root>/hub`` when ``models.cache`` is set.
    """
    layout = cache_layout(cfg.models)

    def release(value: str) -> str:
        value = (value or "").strip()
        if value.startswith(RELEASE_PREFIX) and value[len(RELEASE_PREFIX):] in RELEASES:
            return str(layout.release_path(value[len(RELEASE_PREFIX):]))
        return value

    models = dict(cfg.clip.models)
    if layout.own_hub:
        models = {s: (dataclasses.replace(m, cache_dir=str(layout.root / "hub")) if not m.cache_dir else m)
                  for s, m in models.items()}
    return dataclasses.replace(
        cfg,
        langid=dataclasses.replace(cfg.langid, model_path=release(cfg.langid.model_path)),
        clip=dataclasses.replace(cfg.clip, models=models),
        safety=dataclasses.replace(
            cfg.safety,
            punsafe_heads={k: release(v) for k, v in cfg.safety.punsafe_heads.items()},
            watermark_model=release(cfg.safety.watermark_model),
        ),
    )


def localize_models(cfg: Config) -> Config:
    """Make this node's copies of the cache's model files (once per node) and return the config using them.

    Call it where the stages are built: in each Ray actor's / task's constructor before
    ``ClipScorer`` / ``LanguageRouter`` are made, and pass the returned config to them.
    """
    localize_files(cfg)
    return local_config(cfg)


# --------------------------------------------------------------------------- run entry points
def _describe(reqs: list[ModelRequirement]) -> str:
    return "; ".join(f"{r.name} ({', '.join(r.used_by)}) expected at {r.path or r.source}" for r in reqs)


def ensure_models(cfg: Config, offline: bool = False, *, progress: bool = True) -> ModelsReport:
    """Driver-side, before the preflight: have every model file of ``cfg`` on this machine.

    Online (not ``offline``, ``models.offline`` false, HF_HUB_OFFLINE unset), missing
    files are pulled into the cache. Offline, a missing file that could be pulled raises
    :class:`~laionbuild.errors.ModelMissingError` naming each file (exit status 2).
    Files that cannot be pulled (a checkpoint path of the user's) are left to the
    preflight, which names them as before. ``report.config`` is the config with local
    paths: give it to the preflight and the stages.
    """
    offline = bool(offline or cfg.models.offline or env_offline())
    layout = cache_layout(cfg.models)
    if layout.copy:
        try:
            localize_files(cfg)
        except FileNotFoundError:
            pass  # an empty or new cache
    reqs = required_models(cfg)
    missing = [r for r in reqs if not r.present and r.fetch]
    report = ModelsReport(config=cfg, offline=offline, present=[r.path for r in reqs if r.present],
                          unfetchable=[r.path or r.name for r in reqs if not r.present and not r.fetch])
    if missing:
        if offline:
            raise ModelMissingError(
                f"{len(missing)} model file(s) are not in the local cache and downloads are disabled "
                f"(--offline, models.offline or HF_HUB_OFFLINE): {_describe(missing)}. Run "
                f"'laionbuild models pull -c CONFIG' on a machine with internet, or drop the offline setting"
            )
        down = unreachable_origins([r.fetch for r in missing], _probe_timeout(cfg))
        blocked = [r for r in missing if all(o in down for o in source_origins(r.fetch))]
        if blocked:
            hosts = "; ".join(f"{o} ({why})" for o, why in down.items())
            raise ModelMissingError(
                f"model host unreachable: {hosts}; {len(missing)} model file(s) missing: {_describe(missing)}. "
                f"Run 'laionbuild models pull -c CONFIG' where the host is reachable and share the cache "
                f"(models.cache), then run with --offline; or set HF_ENDPOINT to a reachable mirror"
            )
        report.pulled = pull(cfg, progress=progress, requirements=missing)
        still = [r for r in required_models(cfg) if not r.present and r.fetch]
        if still:
            raise ModelMissingError(f"model files still missing after the download: {_describe(still)}")
    report.config = local_config(cfg)
    return report


def model_provenance(cfg: Config) -> dict[str, Any]:
    """``{"cache": ..., "models": [...]}`` for provenance.json: every model file the run uses.

    Each entry has kind, name, used_by, path, source, size and sha256. The sha256 comes
    from ``models.lock.json`` when the file was fetched by ``models pull`` (and its size
    still matches); otherwise it is computed from the file.
    """
    layout = cache_layout(cfg.models)
    lock = read_lock(layout.root)["files"]
    by_path = {}
    for key, rec in lock.items():
        by_path[str(Path(key) if os.path.isabs(key) else layout.root / key)] = rec
    entries = []
    for req in required_models(cfg):
        entry = {"kind": req.kind, "name": req.name, "used_by": req.used_by, "path": req.path,
                 "present": req.present, "source": req.source, "size": req.size, "sha256": None}
        if req.present and os.path.isfile(req.path):
            rec = by_path.get(req.path) or by_path.get(os.path.realpath(req.path))
            if rec and rec.get("size") == req.size:
                entry.update(sha256=rec["sha256"], source=rec.get("source", req.source), fetched=rec.get("fetched"))
            else:
                entry["sha256"] = sha256_file(req.path)
        entries.append(entry)
    return {"cache": layout.cache, "local_root": str(layout.root), "models": entries}
