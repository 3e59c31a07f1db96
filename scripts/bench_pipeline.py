#!/usr/bin/env python
"""End-to-end benchmark of ``laionbuild run``: time per phase, and the end-to-end rate as a
fraction of what the stages' own in-process costs allow.

The input is a synthetic crawl (``laionbuild.demo.crawl``: WARC files of English
pages with images, 30% of pages re-crawled across files) whose images a
loopback server answers. Baseline measured in the same run: the same stage
objects the runner uses, called in this process without Ray on the rows of a
few files, give the CPU seconds per candidate (extract + language) and per
unique pair (fetch + resize, CLIP). With ``C`` CPUs a perfect runner would take
``(candidates * c_candidate + unique * c_pair) / C`` seconds; the ratio of that to
the measured wall time is the efficiency reported, whole and per phase.
Each configuration runs the real CLI in a fresh process (its own local Ray). Prints JSON.

    python scripts/bench_pipeline.py --files 48 --cpus 1 2
"""

from __future__ import annotations

import argparse
import json
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
from laionbuild.demo.crawl import build_crawl  # noqa: E402
from laionbuild.demo.image_server import LoopbackServer  # noqa: E402


def _run_cli(crawl, inputs: Path, out: Path, cpus: int, sets: list[str], address: str = "") -> dict:
    """One run of the CLI: on a Ray instance of its own (``--local``, in its own temp folder), never a
    cluster that runs on the machine, unless ``address`` names one."""
    cmd = [sys.executable, "-m", "laionbuild", "run", "-c", str(REPO / "configs" / "smoke.yaml"),
           "-i", str(inputs), "-o", str(out), "--no-progress", "--set", f"ray.num_cpus={cpus}",
           "--set", f"ray.fetch_actors={cpus}", *(["--address", address] if address else ["--local"])]
    for s in [*crawl.config_overrides("127.0.0.1"), *sets]:
        cmd += ["--set", s]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if not address:
        env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="lbb-", dir="/tmp")  # short: Ray's socket paths
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not address:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    st = stats["stages"]
    return {
        "cpus": cpus,
        "wall_s": round(wall, 2),
        "phase_seconds": stats.get("phase_seconds"),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
        "candidates": st["extract"]["kept"],
        "unique_pairs": st["dedup"]["kept"],
        "pairs_kept": stats["kept_total"],
        "work_shards": stats["work_shards"]["total"],
        "pairs_per_s": round(st["dedup"]["kept"] / wall, 1),
        "peak_rss_mb_largest_process": round(after.ru_maxrss / 1024, 1),
    }


def _stage_costs(crawl, files: list[str], sets: list[str]) -> dict:
    """CPU seconds per row of each stage: same objects as the runner, in this process, no Ray."""
    import numpy as np

    from laionbuild import schema as S
    from laionbuild.runner.dedup import dedup_rows
    from laionbuild.runner.score import FetchStage, clip_stage
    from laionbuild.stages.candidates import extract_file
    from laionbuild.stages.langid import LanguageRouter

    cfg = load_config(REPO / "configs" / "smoke.yaml", [*crawl.config_overrides("127.0.0.1"), *sets])
    router = LanguageRouter(cfg.langid)
    fetch, clip = FetchStage(cfg), clip_stage(cfg)
    clip(fetch(S.candidate_table_to_batch(S.batch_to_candidate_table(router(
        {**S.rows_to_batch(extract_file(files[0], cfg.extract).rows[:8], S.CANDIDATE_SCHEMA),
         S.DROP_REASON: np.full(8, "", dtype=object)})))))  # warm-up
    t = {"candidate": 0.0, "fetch": 0.0, "clip": 0.0}
    n_cand = n_pairs = 0
    tables = []
    for path in files:
        c0 = time.process_time()
        rows = extract_file(path, cfg.extract).rows
        batch = S.rows_to_batch(rows, S.CANDIDATE_SCHEMA)
        batch[S.DROP_REASON] = np.full(len(rows), "", dtype=object)
        tables.append(S.batch_to_candidate_table(router(batch)))
        t["candidate"] += time.process_time() - c0
        n_cand += len(rows)
    import pyarrow as pa

    unique, _ = dedup_rows(pa.concat_tables(tables), None, cfg.run.dedup_key)
    batch = S.candidate_table_to_batch(unique)
    for start in range(0, unique.num_rows, cfg.fetch.batch_size):
        sub = {k: v[start:start + cfg.fetch.batch_size] for k, v in batch.items()}
        w0, c0 = time.perf_counter(), time.process_time()
        sub = fetch(sub)
        # downloads wait on the server: count the larger of CPU time and wall time / threads
        t["fetch"] += max(time.process_time() - c0, (time.perf_counter() - w0))
        c0 = time.process_time()
        clip(sub)
        t["clip"] += time.process_time() - c0
        n_pairs += S.batch_len(sub)
    return {"candidates": n_cand, "unique_pairs": n_pairs,
            "s_per_candidate": t["candidate"] / max(1, n_cand),
            "s_per_pair_fetch": t["fetch"] / max(1, n_pairs), "s_per_pair_clip": t["clip"] / max(1, n_pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=48, help="WARC files of the synthetic crawl (default 48)")
    ap.add_argument("--pages", type=int, default=12, help="pages per file (default 12)")
    ap.add_argument("--images", type=int, default=10, help="images per page (default 10)")
    ap.add_argument("--cpus", type=int, nargs="+", default=[2], help="Ray CPU counts to compare")
    ap.add_argument("--shard-rows", type=int, default=2000, help="run.work_shard_rows (default 2000)")
    ap.add_argument("--address", default="", help="run on this Ray cluster (default: a Ray instance of its own)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    sets = [f"run.work_shard_rows={args.shard_rows}", "fetch.threads=16", "fetch.per_host_concurrency=16"]
    try:
        with LoopbackServer("127.0.0.1") as server:
            crawl = build_crawl(str(work / "inputs"), n_files=args.files, pages_per_file=args.pages,
                                images_per_page=args.images, image_base=f"http://images.crawl.test:{server.port}")
            crawl.register(server)
            mb = sum(Path(p).stat().st_size for p in crawl.warc_paths) / 1e6
            costs = _stage_costs(crawl, crawl.warc_paths[: max(1, args.files // 6)], sets)
            runs = [_run_cli(crawl, work / "inputs", work / f"out-{c}", c, sets, args.address) for c in args.cpus]
        for r in runs:
            ideal = {"candidates": r["candidates"] * costs["s_per_candidate"] / r["cpus"],
                     "score": r["unique_pairs"] * (costs["s_per_pair_fetch"] + costs["s_per_pair_clip"]) / r["cpus"]}
            ph = r["phase_seconds"] or {}
            r["ideal_seconds"] = {k: round(v, 2) for k, v in ideal.items()}
            r["efficiency"] = {
                "end_to_end": round(sum(ideal.values()) / r["wall_s"], 3),
                "candidates_phase": round(ideal["candidates"] / max(1e-9, ph.get("candidates", 0)), 3),
                "score_phase": round(ideal["score"] / max(1e-9, ph.get("score", 0)), 3),
                "excluding_start_up": round(sum(ideal.values()) / max(1e-9, r["wall_s"] - ph.get("start", 0)), 3),
            }
        print(json.dumps({
            "benchmark": "pipeline_end_to_end",
            "input_files": args.files, "input_mb": round(mb, 2),
            "baseline_in_process": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in costs.items()},
            "runs": runs,
        }, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
