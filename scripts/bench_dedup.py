#!/usr/bin/env python
"""Benchmark of the de-dup phase's hash-range units on the Ray engine: bytes moved per candidate,
wall time and driver memory as the crawl grows, and the cost of a rerun after a kill.

Input: synthetic candidates (``laionbuild.demo.candidates``, no WARC parsing): inputs of
``--rows-per-input`` candidates drawn from a pool of pairs (``--unique`` of the draws' count), written
as phase 1 writes them (key files + markers). For each size the phase's range units run in a fresh
process (its own local Ray, ``--cpus`` CPUs, ``ray.dedup_ranges`` = ``--ranges``), timed from the
generation's plan to the last range marker:

* full: an uninterrupted run;
* killed: the same in a second copy, SIGKILLed (with its Ray) once ``--kill-at`` of its ranges are
  committed, then run again: the rerun's time as a fraction of the full run's.

Ray's worker processes are started before the clock starts (as on a running cluster); the
imports and everything else the units need are timed.

Baselines measured in the same run: the smallest size (growth of wall time and driver peak RSS
with the row count), and the Arrow bytes of a whole candidate row (what a row shuffle moves per
candidate). Each kind of run is repeated ``--repeats`` times (the fastest counts: the machine may
be shared). ``--groups N`` also times the work-shard assembly (candidate tables written, rows
read by locator) on an N-row crawl. Prints JSON.

    python scripts/bench_dedup.py --sizes 1000000 4000000 16000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from laionbuild.demo.candidates import candidate_table, draw_pairs, write_inputs, write_key_files  # noqa: E402

READY = "phase2-start"
POLL_S = 0.01
#: rows of the candidate table whose Arrow size is the row-shuffle baseline
BASELINE_ROWS = 20_000


def _config(out: str, ranges: int, shard_rows: int) -> dict:
    return {"run": {"output": out, "work_shard_rows": shard_rows, "progress": False},
            "ray": {"dedup_ranges": ranges, "local_max_rows": 0}}


def _started() -> int:
    return os.getpid()


def _rss_mb(field: str) -> float:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``), MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def child(args) -> None:
    """One run of the phase's units in this process (a driver with its own local Ray: a temp folder
    of its own, on loopback, whatever else runs on the machine)."""
    from laionbuild.demo.run import own_ray
    from laionbuild.runner.connect import connect

    with own_ray(""):
        connect(local=True, num_cpus=args.cpus)
        _measure(args)


def _measure(args) -> None:
    import ray

    from laionbuild.config import config_from_dict
    from laionbuild.runner.dedup import begin_generation, run_groups, run_ranges
    from laionbuild.output.layout import OutputLayout

    # the worker processes started, as on a cluster that is already running; what they import
    # for the phase is timed with it
    t = time.perf_counter()
    ray.get([ray.remote(_started).remote() for _ in range(args.cpus)])
    workers_start = time.perf_counter() - t
    cfg = config_from_dict(_config(args.child, args.ranges, args.shard_rows))
    layout = OutputLayout(args.child)
    rss_ready = _rss_mb("VmRSS")
    print(READY, flush=True)
    t0 = time.perf_counter()
    plan = begin_generation(cfg, layout, layout.candidate_markers())
    ranges = run_ranges(cfg, layout, plan, "ray")
    t1 = time.perf_counter()
    out = {"ranges_s": round(t1 - t0, 3), "workers_start_s": round(workers_start, 2),
           "driver_rss_before_phase_mb": rss_ready,
           "candidates": sum(m["candidates"] for m in ranges.values()),
           "unique": sum(m["counters"]["kept"] for m in ranges.values()),
           "bytes_read": sum(m["bytes_read"] for m in ranges.values()),
           "bytes_written": sum(m["bytes_written"] for m in ranges.values()),
           "nodes": len({m["node"] for m in ranges.values()})}
    if args.with_groups:
        groups = run_groups(cfg, layout, plan, "ray")
        rows = [s["rows"] for m in groups.values() for s in m["shards"]]
        out.update(groups_s=round(time.perf_counter() - t1, 3), shards=len(rows),
                   shard_fill=round(sum(rows) / (len(rows) * args.shard_rows), 3) if rows else 0.0,
                   group_bytes_read=sum(m["bytes_read"] for m in groups.values()))
    out["driver_peak_rss_mb"] = _rss_mb("VmHWM")
    print(json.dumps(out), flush=True)


def _spawn(out: Path, args, with_groups: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", str(out), "--cpus", str(args.cpus), "--ranges", str(args.ranges),
           "--shard-rows", str(args.shard_rows)]
    if with_groups:
        cmd.append("--with-groups")
    # the child starts a Ray of its own (see child): no RAY_ADDRESS or recorded cluster is read
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> dict:
    lines = [line for line in proc.stdout if line.strip()]
    if proc.wait() != 0:
        raise SystemExit(f"phase run failed ({proc.returncode}): {lines[-3:]}")
    return json.loads(lines[-1])


def _wait_ready(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if line.strip() == READY:
            return
    raise SystemExit("phase run ended before it started")


def _kill_and_rerun(out: Path, args) -> tuple[int, float, dict]:
    """A run SIGKILLed (with its Ray) once ``kill_at`` of its ranges are committed, then run again."""
    proc = _spawn(out, args)
    _wait_ready(proc)
    t = time.perf_counter()
    done = out / "dedup" / "g0000" / "_done"
    while proc.poll() is None and len(list(done.glob("*.json"))) < args.kill_at * args.ranges:
        time.sleep(POLL_S)
    killed_after = time.perf_counter() - t
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list(done.glob("*.json")))
    proc = _spawn(out, args)
    _wait_ready(proc)
    return committed, killed_after, _finish(proc)


def measure(size: int, work: Path, args) -> dict:
    n_inputs = max(1, size // args.rows_per_input)
    full, killed = work / f"full-{size}", work / f"killed-{size}"
    t = time.perf_counter()
    write_key_files(str(full), draw_pairs(n_inputs, args.rows_per_input, args.unique, seed=size))
    made = time.perf_counter() - t
    shutil.copytree(full / "candidates", killed / "candidates")
    fulls, kills = [], []
    for _ in range(args.repeats):  # the machine may be shared: the fastest of a few runs
        shutil.rmtree(full / "dedup", ignore_errors=True)
        proc = _spawn(full, args)
        _wait_ready(proc)
        fulls.append(_finish(proc))
    for _ in range(args.repeats):
        shutil.rmtree(killed / "dedup", ignore_errors=True)
        committed, killed_after, rerun = _kill_and_rerun(killed, args)
        same = all((killed / "dedup" / "g0000" / p.name).read_bytes() == p.read_bytes()
                   for p in (full / "dedup" / "g0000").glob("*.bin"))
        kills.append({"ranges_committed_before_kill": committed, "killed_after_s": round(killed_after, 2),
                      "rerun_s": rerun["ranges_s"], "winners_and_index_identical": same})
    shutil.rmtree(full)
    shutil.rmtree(killed)
    res = min(fulls, key=lambda r: r["ranges_s"])
    rows = res["candidates"]
    best_rerun = min(k["rerun_s"] for k in kills)
    return {
        "candidates": rows, "inputs": n_inputs, "unique": res["unique"], "keys_written_s": round(made, 1),
        "phase2_ranges_s": res["ranges_s"], "phase2_ranges_s_all": [r["ranges_s"] for r in fulls],
        "bytes_read_per_candidate": round(res["bytes_read"] / rows, 2),
        "bytes_written_per_candidate": round(res["bytes_written"] / rows, 2),
        "driver_peak_rss_mb": max(r["driver_peak_rss_mb"] for r in fulls),
        "driver_rss_before_phase_mb": res["driver_rss_before_phase_mb"], "workers_start_s": res["workers_start_s"],
        "kill": {"at_fraction": args.kill_at, "runs": kills, "rerun_s": best_rerun,
                 "rerun_fraction": round(best_rerun / res["ranges_s"], 3),
                 "winners_and_index_identical": all(k["winners_and_index_identical"] for k in kills)},
    }


def groups_run(size: int, work: Path, args) -> dict:
    n_inputs = max(1, size // args.rows_per_input)
    out = work / f"groups-{size}"
    t = time.perf_counter()
    write_inputs(str(out), draw_pairs(n_inputs, args.rows_per_input, args.unique, seed=size), "url_text")
    made = time.perf_counter() - t
    proc = _spawn(out, args, with_groups=True)
    _wait_ready(proc)
    res = _finish(proc)
    shutil.rmtree(out)
    rows = res["candidates"]
    return {"candidates": rows, "inputs_written_s": round(made, 1), "phase2_ranges_s": res["ranges_s"],
            "phase2_groups_s": res["groups_s"], "work_shards": res["shards"], "shard_fill": res["shard_fill"],
            "locator_bytes_read_per_candidate": round(res["group_bytes_read"] / rows, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    ap.add_argument("--rows-per-input", type=int, default=50_000)
    ap.add_argument("--unique", type=float, default=0.6, help="pool of pairs / candidates drawn")
    ap.add_argument("--ranges", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--kill-at", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each kind; the fastest counts")
    ap.add_argument("--groups", type=int, default=0, help="also time work-shard assembly on this many rows")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--with-groups", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-dedup-", dir=args.workdir or None))
    try:
        runs = [measure(size, work, args) for size in sorted(args.sizes)]
        sample = candidate_table(draw_pairs(1, BASELINE_ROWS, 1.0, 0)[0], "crawl-data/CC-MAIN-2024-22/segments/"
                                 "1715971057494.65/warc/CC-MAIN-20240517201315-20240517231315-00000.warc.gz")
        base, last = runs[0], runs[-1]
        growth = last["candidates"] / base["candidates"]
        result = {
            "bench": "dedup", "cpus": args.cpus, "repeats": args.repeats, "ranges": args.ranges,
            "rows_per_input": args.rows_per_input,
            "unique_pool": args.unique, "runs": runs,
            "baseline": {"row_shuffle_bytes_per_candidate": round(sample.nbytes / sample.num_rows, 1),
                         "smallest_size": base["candidates"]},
            "growth": {"rows": round(growth, 2),
                       "phase2_wall": round(last["phase2_ranges_s"] / base["phase2_ranges_s"], 2),
                       "wall_per_row_vs_smallest": round(last["phase2_ranges_s"] / base["phase2_ranges_s"] / growth, 3),
                       "driver_peak_rss": round(last["driver_peak_rss_mb"] / base["driver_peak_rss_mb"], 3)},
        }
        if args.groups:
            result["assembly"] = groups_run(args.groups, work, args)
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
