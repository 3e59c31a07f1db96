"""``laionbuild demo``: the embedded default, end to end on this machine.

1. start a loopback HTTP server (127.0.0.1, a free port),
2. write the tiny sample WARCs whose image URLs point at it
   (:mod:`laionbuild.demo.sample_warc`),
3. run the whole pipeline with ``configs/smoke.yaml`` (tiny CLIP trained on
   coloured shapes, the real fastText lid.176, the real thresholds),
4. compare what was kept with what the sample says should be kept.

The demo runs on a Ray instance of its own, in a temp folder of its own, and never
joins a cluster running on the machine (its images are served on this machine's
loopback only); ``--set ray.address=HOST:PORT`` points it at a cluster all the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..config import load_config
from ..errors import SetupError
from .image_server import LoopbackServer
from .sample_warc import DemoSample, build_demo_sample

log = logging.getLogger(__name__)

SMOKE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@contextlib.contextmanager
def own_ray(address: str):
    """A Ray instance of the demo's own (``ray.local``) in a temp folder of its own, stopped and
    removed afterwards; nothing changes when an address is given or this process already uses Ray."""
    ray = sys.modules.get("ray")
    if address or (ray is not None and ray.is_initialized()):
        yield []
        return
    saved = os.environ.get("RAY_TMPDIR")
    # short: Ray's socket paths live under it
    folder = tempfile.mkdtemp(prefix="lbd-", dir="/tmp" if os.name == "posix" else None)
    os.environ["RAY_TMPDIR"] = folder
    try:
        yield ["ray.local=true"]
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(folder, ignore_errors=True)


def demo_overrides(sample: DemoSample, output: str, progress: bool = True) -> list[str]:
    return [
        f"run.inputs={json.dumps(sample.warc_paths)}",
        f"run.output={output}",
        f"run.progress={'true' if progress else 'false'}",
        *sample.config_overrides("127.0.0.1"),
    ]


def compare_with_expectations(output: str, sample: DemoSample) -> dict[str, dict[str, int]]:
    """Per subset: expected kept, kept, kept as expected, kept although not expected."""
    import pyarrow.parquet as pq

    from ..output.layout import OutputLayout

    layout = OutputLayout(output)
    pointer = layout.published()
    report = {}
    for subset in ("en", "multi", "nolang"):
        got = set()
        for f in layout.published_files(subset, pointer=pointer):
            with layout.fs.open(f, "rb") as fh:
                t = pq.read_table(fh, columns=["URL", "TEXT"])
            got |= set(zip(t.column("URL").to_pylist(), t.column("TEXT").to_pylist()))
        want = {(e.url, e.alt_text) for e in sample.kept(subset)}
        report[subset] = {
            "expected": len(want),
            "kept": len(got),
            "kept_as_expected": len(got & want),
            "missing": len(want - got),
            "unexpected": len(got - want),
        }
    return report


#: folders inside the demo output that a rerun keeps (written by `laionbuild report` and `compare`)
KEPT_ON_RERUN = ("report", "compare")


#: written into the demo's output folder before anything else: the folder is the demo's to empty
DEMO_MARK = "_demo_output"


def _made_by_the_demo(out: Path) -> bool:
    return (out / DEMO_MARK).exists() or (out / "demo_check.json").exists()  # the latter: older demos


def clear_for_rerun(out: Path) -> None:
    """Empty a previous demo output (its sample had another port) but keep :data:`KEPT_ON_RERUN`.

    Anything at ``out`` that is not a folder is refused, never deleted; so is a folder that holds
    files the demo did not write (a run's output given to the demo by mistake), and one that a
    run holds (its lease, :mod:`laionbuild.output.lease`), which stays held while it is emptied.
    """
    from ..output.layout import OutputLayout
    from ..output.lease import LOCK, RunLease

    if out.exists() and not out.is_dir():
        raise SetupError(f"output {out} exists and is not a folder; give a folder with --output")
    if not out.is_dir():
        return
    children = [c for c in out.iterdir() if c.name not in (*KEPT_ON_RERUN, LOCK, DEMO_MARK)]
    if children and not _made_by_the_demo(out):
        raise SetupError(f"output {out} holds files that the demo did not write; give the demo a new or "
                         "empty folder with --output")
    with RunLease(OutputLayout(str(out)), expiry_s=60.0, heartbeat_s=30.0):  # refuses a folder in use
        for child in children:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def _check_sample(sample_dir: Path) -> None:
    """Refuse a folder where the demo writes its sample that is not an earlier demo's sample."""
    from .sample_warc import MANIFEST_NAME

    if sample_dir.exists() and (not sample_dir.is_dir() or not (sample_dir / MANIFEST_NAME).is_file()):
        raise SetupError(f"{sample_dir} exists and is not a demo sample (the demo writes its sample there); "
                         "move it or give the demo another --output")


def run_demo(output: str = "demo-output", *, config: str | None = None, overrides: list[str] | None = None,
             progress: bool = True):
    from ..runner.run import run

    out = Path(output)
    load_config(config or SMOKE_CONFIG, [*(overrides or [])])  # a bad --set stops here, before anything is built
    sample_dir = Path(f"{output.rstrip('/')}-sample")
    _check_sample(sample_dir)
    clear_for_rerun(out)
    if sample_dir.exists():
        shutil.rmtree(sample_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text("written by `laionbuild demo`: a rerun of the demo empties this folder\n")
    with LoopbackServer("127.0.0.1") as server:
        sample = build_demo_sample(str(sample_dir), image_base=f"http://images.demo.test:{server.port}")
        sample.register(server)
        log.info("demo sample: %d WARC file(s), %d <img> cases, images served at %s",
                 len(sample.warc_paths), len(sample.expectations), server.base_url)
        cfg = load_config(config or SMOKE_CONFIG, [*demo_overrides(sample, str(out), progress), *(overrides or [])])
        with own_ray(cfg.ray.address) as isolation:
            if isolation:
                cfg = load_config(config or SMOKE_CONFIG,
                                  [*demo_overrides(sample, str(out), progress), *(overrides or []), *isolation])
            result = run(cfg)
        log.info("image server answered %d requests", server.request_count())
    check = compare_with_expectations(str(out), sample)
    (out / "demo_check.json").write_text(json.dumps(check, indent=1))
    for subset, row in check.items():
        log.info("demo %-6s expected %2d kept %2d (as expected %2d, missing %d, unexpected %d)", subset,
                 row["expected"], row["kept"], row["kept_as_expected"], row["missing"], row["unexpected"])
    return result
