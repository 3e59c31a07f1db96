#!/usr/bin/env python
"""Benchmark WARC -> candidates extraction against bare parsing baselines.

The real Common Crawl samples are concatenated (gzip members concatenate) and
repeated into one temporary WARC of at least ``--mb`` MB. On that file, in the
same process and run, we time:

* ``bare_warcio``: warcio iteration (HTTP headers parsed by warcio), lexbor
  parse of the raw payload bytes and a walk over ``<img>`` reading ``src`` and
  ``alt`` - nothing else;
* ``bare_fastwarc``: the same with fastwarc (HTTP parsed by fastwarc);
* ``ours_warcio`` / ``ours_fastwarc``: :func:`laionbuild.stages.candidates.extract_file`
  with ``extract.reader`` set accordingly (charset handling, URL resolution,
  all filters, normalisation, hashing, row building).

Rates are per core: HTML pages and compressed MB per second of *CPU time* of
this process (the machine may be shared). Each variant runs ``--passes``
times, interleaved, and the fastest pass counts. Prints JSON.

``--wat`` compares the two inputs LAION-5B could have read instead: the
repeated WARC and a WAT file made from it in Common Crawl's layout (one JSON
``metadata`` record per WARC record: WARC and HTTP headers, and for HTML pages
the title, ``<meta>``, ``<link>``, ``<script>`` entries and the ``Links`` with
``path``, ``url`` and ``alt``; anchor texts are left out, so the WAT is, if
anything, smaller than Common Crawl's). Both are read with ``--config``
(default ``configs/laion5b.yaml``): candidates per input MB and per CPU-second.

Usage::

    python scripts/bench_extract.py              # >= 100 MB
    python scripts/bench_extract.py --mb 10      # quick run
    python scripts/bench_extract.py --repeat 20  # explicit repeat count
    python scripts/bench_extract.py --mb 10 --config configs/laion5b.yaml  # LAION-5B's rules
    python scripts/bench_extract.py --mb 20 --wat                # WAT against WARC input
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = REPO.parent / "shared" / "data" / "warc"


def build_input(samples: list[Path], target_mb: float, repeat: int | None, out_dir: Path) -> tuple[Path, int]:
    blob = b"".join(p.read_bytes() for p in samples)
    n = repeat if repeat else max(1, math.ceil(target_mb * 1e6 / len(blob)))
    path = out_dir / "bench.warc.gz"
    with open(path, "wb") as fh:
        for _ in range(n):
            fh.write(blob)
    return path, n


def bare_warcio(path: Path) -> tuple[int, int]:
    from selectolax.lexbor import LexborHTMLParser
    from warcio.archiveiterator import ArchiveIterator

    pages = imgs = 0
    with open(path, "rb") as fh:
        for record in ArchiveIterator(fh):
            if record.rec_type != "response" or record.http_headers is None:
                continue
            ctype = (record.http_headers.get_header("Content-Type") or "").split(";")[0].strip().lower()
            if ctype not in ("text/html", "application/xhtml+xml"):
                continue
            html = record.content_stream().read()
            pages += 1
            for img in LexborHTMLParser(html).css("img"):
                attrs = img.attrs
                attrs.get("src")
                attrs.get("alt")
                imgs += 1
    return pages, imgs


def bare_fastwarc(path: Path) -> tuple[int, int]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    from selectolax.lexbor import LexborHTMLParser

    pages = imgs = 0
    for record in ArchiveIterator(str(path), record_types=WarcRecordType.response, parse_http=True):
        ctype = (record.http_content_type or "").lower()
        if ctype not in ("text/html", "application/xhtml+xml"):
            continue
        html = record.reader.read()
        pages += 1
        for img in LexborHTMLParser(html).css("img"):
            attrs = img.attrs
            attrs.get("src")
            attrs.get("alt")
            imgs += 1
    return pages, imgs


def ours(path: Path, reader: str, dedup: bool, config: str | None = None) -> tuple[int, int, dict]:
    import dataclasses

    from laionbuild.config import load_config
    from laionbuild.stages.candidates import extract_file

    cfg = dataclasses.replace(load_config(config).extract, reader=reader, dedup_within_file=dedup)
    fe = extract_file(str(path), cfg)
    c = fe.counters
    return c.counts.get("html_responses", 0), c.counts.get("imgs", 0), {
        "candidates": len(fe.rows),
        "file_status": fe.file.status,
    }


def warc_to_wat(samples: list[Path], repeat: int, out_dir: Path) -> Path:
    """A WAT file of the samples' records (see the module text), repeated ``repeat`` times."""
    from laionbuild.stages.wat import write_wat_from_warc

    one = out_dir / "one.warc.wat.gz"
    write_wat_from_warc([str(p) for p in samples], str(one))
    blob = one.read_bytes()
    one.unlink()
    path = out_dir / "bench.warc.wat.gz"
    with open(path, "wb") as fh:
        for _ in range(repeat):
            fh.write(blob)
    return path


def wat_vs_warc(samples: list[Path], args) -> dict:
    """Candidates per input byte and per CPU-second, WARC against WAT of the same pages."""
    config = args.config or str(REPO / "configs" / "laion5b.yaml")
    with tempfile.TemporaryDirectory(dir=args.tmp or None) as tmp:
        warc, n = build_input(samples, args.mb, args.repeat or None, Path(tmp))
        wat = warc_to_wat(samples, n, Path(tmp))
        sizes = {"warc": warc.stat().st_size, "wat": wat.stat().st_size}
        best: dict[str, dict] = {}
        for _ in range(max(1, args.passes)):
            for name, path in (("warc", warc), ("wat", wat)):
                cpu, wall, out = timed(ours, path, "fastwarc", args.dedup, config)
                row = {
                    "input_mb": round(sizes[name] / 1e6, 3),
                    "candidates": out[2]["candidates"],
                    "file_status": out[2]["file_status"],
                    "cpu_s": round(cpu, 3),
                    "wall_s": round(wall, 3),
                    "candidates_per_input_mb": round(out[2]["candidates"] / (sizes[name] / 1e6), 1),
                    "candidates_per_cpu_s": round(out[2]["candidates"] / cpu, 1) if cpu else None,
                }
                if name not in best or cpu < best[name]["cpu_s"]:
                    best[name] = row
    w, t = best["warc"], best["wat"]
    per_byte = round(t["candidates_per_input_mb"] / w["candidates_per_input_mb"], 2) if w["candidates"] else None
    per_cpu = round(t["candidates_per_cpu_s"] / w["candidates_per_cpu_s"], 2) if w["candidates_per_cpu_s"] else None
    return {
        "input": {"samples": [p.name for p in samples], "repeat": n, "wat_bytes_over_warc_bytes":
                  round(sizes["wat"] / sizes["warc"], 3)},
        "config": config,
        "dedup_within_file": args.dedup,
        "passes": args.passes,
        "results": best,
        "wat_over_warc": {"candidates_per_input_byte": per_byte, "candidates_per_cpu_s": per_cpu},
        "target": "WAT >= 3 x WARC candidates per input byte",
        "target_met": per_byte is not None and per_byte >= 3.0,
        "same_candidates": w["candidates"] == t["candidates"],
    }


def timed(fn, *args):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    return time.process_time() - c0, time.perf_counter() - w0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", default=str(DEFAULT_SAMPLES), help="folder with *.warc.gz samples")
    ap.add_argument("--mb", type=float, default=100.0, help="minimum size of the repeated input (MB)")
    ap.add_argument("--repeat", type=int, default=0, help="repeat count (overrides --mb)")
    ap.add_argument("--passes", type=int, default=1, help="runs per variant; the fastest counts")
    ap.add_argument("--readers", default="warcio,fastwarc", help="comma-separated reader engines")
    ap.add_argument("--dedup", action="store_true",
                    help="keep within-file de-duplication on (off by default: the repeated input would "
                         "turn nearly every candidate into a duplicate and skip row building)")
    ap.add_argument("--config", default=None,
                    help="YAML config whose extract settings 'ours' uses (default: the package defaults)")
    ap.add_argument("--tmp", default="", help="folder for the temporary input (default: system temp)")
    ap.add_argument("--wat", action="store_true", help="compare WAT input with WARC input (see above)")
    args = ap.parse_args(argv)

    samples = sorted(Path(args.samples).glob("*.warc.gz"))
    if not samples:
        print(json.dumps({"error": f"no *.warc.gz under {args.samples}"}))
        return 2
    if args.wat:
        import laionbuild.stages.candidates  # noqa: F401 - imported before timing

        result = wat_vs_warc(samples, args)
        result["machine"] = {"python": sys.version.split()[0], "platform": platform.platform(),
                             "cpus": os.cpu_count(), "note": "rates use process CPU time; the machine may be shared"}
        print(json.dumps(result, indent=2))
        return 0
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    # import everything before timing so no variant pays for imports
    import fastwarc.warc  # noqa: F401
    import selectolax.lexbor  # noqa: F401
    import warcio.archiveiterator  # noqa: F401

    import laionbuild.stages.candidates  # noqa: F401
    with tempfile.TemporaryDirectory(dir=args.tmp or None) as tmp:
        path, n = build_input(samples, args.mb, args.repeat or None, Path(tmp))
        size_mb = path.stat().st_size / 1e6
        variants = []
        for r in readers:
            variants.append((f"bare_{r}", bare_warcio if r == "warcio" else bare_fastwarc, (path,)))
            variants.append((f"ours_{r}", ours, (path, r, args.dedup, args.config)))
        best: dict[str, dict] = {}
        for _ in range(max(1, args.passes)):
            for name, fn, fargs in variants:
                cpu, wall, out = timed(fn, *fargs)
                pages, imgs = out[0], out[1]
                row = {
                    "html_pages": pages,
                    "imgs": imgs,
                    "cpu_s": round(cpu, 3),
                    "wall_s": round(wall, 3),
                    "pages_per_s_per_core": round(pages / cpu, 1) if cpu else None,
                    "compressed_mb_per_s_per_core": round(size_mb / cpu, 2) if cpu else None,
                }
                if len(out) > 2:
                    row.update(out[2])
                if name not in best or cpu < best[name]["cpu_s"]:
                    best[name] = row
        ratios = {}
        for r in readers:
            b, o = best.get(f"bare_{r}"), best.get(f"ours_{r}")
            if b and o and o["cpu_s"]:
                ratios[f"ours_{r}_vs_bare_{r}"] = round(b["cpu_s"] / o["cpu_s"], 3)
        if "ours_fastwarc" in best and "bare_warcio" in best:
            ratios["ours_fastwarc_vs_bare_warcio"] = round(
                best["bare_warcio"]["cpu_s"] / best["ours_fastwarc"]["cpu_s"], 3
            )
        result = {
            "input": {
                "samples": [p.name for p in samples],
                "repeat": n,
                "compressed_mb": round(size_mb, 2),
            },
            "dedup_within_file": args.dedup,
            "config": args.config or "<defaults>",
            "passes": args.passes,
            "results": best,
            "ratios_speed_ours_over_bare": ratios,
            "target": "ours >= 0.7 x bare of the same reader",
            "target_met": {k: v >= 0.7 for k, v in ratios.items() if k.endswith(("bare_warcio", "bare_fastwarc"))
                           and k.split("_vs_")[0].split("_", 1)[1] == k.split("_vs_")[1].split("_", 1)[1]},
            "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "cpus": os.cpu_count(), "note": "rates use process CPU time; the machine may be shared"},
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
