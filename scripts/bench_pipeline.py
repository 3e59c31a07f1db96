#!/usr/bin/env python
"""End-to-end benchmark: pairs/s and candidates/s per core, peak memory, 1 -> 2 CPU scaling,
and where the time goes by stage.

The input is the demo sample (its pages copied into many WARC files, so that
the images repeat but every file is parsed), served by a loopback image
server. Each configuration runs the real CLI in a fresh process (its own
local Ray) and is timed from outside; the per-stage split is measured in
process with the same stage objects the pipeline uses, on one copy of the
sample. Prints JSON.

    python scripts/bench_pipeline.py --copies 200 --cpus 1 2
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from laionbuild.config import load_config  # noqa: E402
from laionbuild.demo.image_server import LoopbackServer  # noqa: E402
from laionbuild.demo.sample_warc import build_demo_sample  # noqa: E402


def _serve(server: LoopbackServer, sample) -> None:
    image_dir = Path(sample.image_dir)
    for f in sorted(image_dir.rglob("*")):
        if f.is_file():
            server.add("/" + f.relative_to(image_dir).as_posix(), f.read_bytes(),
                       content_type=mimetypes.guess_type(f.name)[0] or "application/octet-stream")
    sample.register(server)


def _run_cli(sample, inputs: Path, out: Path, cpus: int) -> dict:
    cmd = [sys.executable, "-m", "laionbuild", "run", "-c", str(REPO / "configs" / "smoke.yaml"),
           "-i", str(inputs), "-o", str(out), "--no-progress", "--set", f"ray.num_cpus={cpus}",
           "--set", "run.global_dedup=true",
           # one download actor per CPU: downloading + decoding is the costly CPU stage
           "--set", f"ray.fetch_actors={cpus}"]
    for s in sample.config_overrides("127.0.0.1"):
        cmd += ["--set", s]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    cand = stats["stages"]["extract"]["kept"]
    scored = sum(stats["stages"]["clip"]["dropped_by_reason"].values()) + stats["stages"]["clip"]["kept"]
    return {
        "cpus": cpus,
        "wall_s": round(wall, 2),
        "pipeline_wall_s": stats.get("wall_seconds"),
        "phase_seconds": stats.get("phase_seconds"),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
        "candidates": cand,
        "pairs_scored": scored,
        "pairs_kept_before_dedup": stats["stages"]["clip"]["kept"],
        "candidates_per_s": round(cand / wall, 1),
        "pairs_per_s": round(scored / wall, 1),
        "candidates_per_s_per_core": round(cand / wall / cpus, 1),
        # the largest single child process (ru_maxrss is the max over children, in KiB on Linux)
        "peak_rss_mb_largest_process": round(after.ru_maxrss / 1024, 1),
    }


def _stage_split(sample, copies_dir: Path) -> dict:
    """Seconds per stage on one WARC, same objects as the pipeline, no Ray."""
    import numpy as np

    from laionbuild import schema as S
    from laionbuild.stages.candidates import extract_file
    from laionbuild.stages.clip_score import ClipScorer
    from laionbuild.stages.fetch import ImageFetcher
    from laionbuild.stages.langid import LanguageRouter

    cfg = load_config(REPO / "configs" / "smoke.yaml", sample.config_overrides("127.0.0.1"))
    warc = str(sorted(copies_dir.glob("*.warc.gz"))[0])
    out: dict[str, float] = {}
    t = time.perf_counter()
    ext = extract_file(warc, cfg.extract)
    out["extract_s"] = time.perf_counter() - t
    batch = S.rows_to_batch(ext.rows, S.CANDIDATE_SCHEMA)
    batch[S.DROP_REASON] = np.array([""] * len(ext.rows), dtype=object)
    router = LanguageRouter(cfg.langid)
    t = time.perf_counter()
    batch = router(batch)
    out["langid_s"] = time.perf_counter() - t
    fetcher = ImageFetcher(cfg.fetch, cfg.resize)
    t = time.perf_counter()
    batch = fetcher(batch)
    out["fetch_resize_s"] = time.perf_counter() - t
    fetcher.close()
    scorer = ClipScorer(cfg.clip, cfg.resize.image_size)
    t = time.perf_counter()
    scorer(batch)
    out["clip_s"] = time.perf_counter() - t
    total = sum(out.values())
    return {"rows": len(ext.rows), **{k: round(v, 4) for k, v in out.items()},
            "share": {k: round(v / total, 3) for k, v in out.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=40, help="WARC files made from the sample (default 40)")
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray CPU counts to compare")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        with LoopbackServer("127.0.0.1") as server:
            sample = build_demo_sample(str(work / "sample"), image_base=f"http://images.demo.test:{server.port}")
            _serve(server, sample)
            inputs = work / "inputs"
            inputs.mkdir()
            for i in range(args.copies):
                for j, w in enumerate(sample.warc_paths):
                    shutil.copy(w, inputs / f"copy-{i:05d}-{j}.warc.gz")
            mb = sum(p.stat().st_size for p in inputs.iterdir()) / 1e6
            split = _stage_split(sample, inputs)
            runs = [_run_cli(sample, inputs, work / f"out-{c}", c) for c in args.cpus]
        result = {
            "benchmark": "pipeline_end_to_end",
            "input_files": args.copies * len(sample.warc_paths),
            "input_mb": round(mb, 2),
            "runs": runs,
            "stage_split_one_file": split,
        }
        if len(runs) >= 2:
            result["scaling_ratio"] = round(runs[-1]["pairs_per_s"] / runs[0]["pairs_per_s"], 3)
            result["scaling_note"] = f"pairs/s with {runs[-1]['cpus']} CPUs divided by pairs/s with {runs[0]['cpus']}"
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
