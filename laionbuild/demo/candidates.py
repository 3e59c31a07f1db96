"""Synthetic phase-1 outputs (no WARC parsing): committed inputs for de-dup tests and benchmarks.

Each input holds ``rows`` candidates drawn from a pool of pairs: pair ``p`` is the image
``http://h<p mod hosts>.synthetic.test/<p // 2>.jpg`` with the alt text ``alt <p>``, so two pairs
share each URL (the ``url`` key merges them, ``url_text`` keeps both) and a pair drawn twice is a
duplicate. ``write_inputs`` writes candidate tables, key files and markers as phase 1 does;
``write_key_files`` writes key files and markers only (no rows: enough for the hash-range units).
"""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa

from .. import schema as S
from ..runner import dedupkeys as K
from ..output.layout import OutputLayout
from ..stages import shards

HOSTS = 1000
#: distance between two candidates' WARC offsets
OFFSET_STEP = 1000
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def pair_url(p: int) -> str:
    return f"http://h{p % HOSTS}.synthetic.test/{p // 2}.jpg"


def pair_text(p: int) -> str:
    return f"alt {p}"


def draw_pairs(n_inputs: int, rows: int, unique_fraction: float, seed: int) -> list[np.ndarray]:
    """Pair ids of each input: ``rows`` draws from a pool of ``n_inputs * rows * unique_fraction``."""
    rng = np.random.default_rng(seed)
    pool = max(1, int(n_inputs * rows * unique_fraction))
    return [rng.integers(0, pool, size=rows, dtype=np.int64) for _ in range(n_inputs)]


def candidate_table(pairs: np.ndarray, warc_path: str, ordinal: int = 0) -> pa.Table:
    urls = [pair_url(int(p)) for p in pairs]
    texts = [pair_text(int(p)) for p in pairs]
    n = len(pairs)
    return pa.table({
        "URL": urls, "TEXT": texts, "page_url": [f"{u}.html" for u in urls],
        "warc_path": [warc_path] * n, "warc_record_id": [""] * n,
        "warc_offset": pa.array(np.arange(n, dtype=np.int64) * OFFSET_STEP),
        "hash": pa.array(S.pair_hashes(urls, texts)), "LICENSE": ["?"] * n,
        "subset": ["en"] * n, "LANGUAGE": ["en"] * n, "language_score": pa.array(np.ones(n, np.float32)),
        "nolang_reason": [""] * n, "SAMPLE_ID": pa.array(S.sample_ids(ordinal, n)),
    })


def _marker(fid: str, path: str, rows: int, keys: dict, ordinal: int) -> dict:
    return {"path": path, "file_id": fid, "ordinal": ordinal, "n_candidates": rows, "node": "",
            "token": uuid.uuid4().hex[:12],
            "file": {"path": path, "status": "ok", "reason": "", "message": ""},
            "counters": {"extract": {"kept": rows}, "langid": {"kept": rows}}, "keys": keys}


def write_inputs(output: str, pairs: list[np.ndarray], key: str, first: int = 0) -> dict[str, dict]:
    """Candidate tables, key files and markers of inputs ``first, first + 1, ...``; ``{fid: marker}``."""
    layout = OutputLayout(output)
    out = {}
    for i, p in enumerate(pairs, start=first):
        fid, path = f"in{i:06d}", f"synthetic/{i:06d}.warc.gz"
        table = candidate_table(p, path, i)
        shards.write_bytes_atomic(layout.fs, layout.candidates_file(fid), shards.table_to_bytes(table, "zstd"))
        data, info = K.encode_keys(table, key)
        shards.write_bytes_atomic(layout.fs, layout.candidates_keys(fid), data)
        out[fid] = _marker(fid, path, table.num_rows, info, i)
        shards.write_json_atomic(layout.fs, layout.candidates_marker(fid), out[fid])
    return out


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast stand-in for the key hash of pair ids."""
    z = x.astype(np.uint64) + _MIX[0]
    z = (z ^ (z >> np.uint64(30))) * _MIX[1]
    z = (z ^ (z >> np.uint64(27))) * _MIX[2]
    return z ^ (z >> np.uint64(31))


def write_key_files(output: str, pairs: list[np.ndarray], key: str = "url_text") -> dict[str, dict]:
    """Key files and markers only (``h1, h2`` mixed from the pair ids); ``{fid: marker}``."""
    layout = OutputLayout(output)
    out = {}
    for i, p in enumerate(pairs):
        fid, path = f"in{i:06d}", f"synthetic/{i:06d}.warc.gz"
        ids = p // 2 if key == "url" else p
        h1 = _mix64(ids)
        h2 = (_mix64(h1) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        data = K.encode_key_records(h1, h2, np.arange(len(p), dtype=np.uint32))
        shards.write_bytes_atomic(layout.fs, layout.candidates_keys(fid), data)
        info = {"key": key, "rows": len(p), "bits": K.prefix_bits(len(p)), "first_warc_path": path,
                "bytes": len(data)}
        out[fid] = _marker(fid, path, len(p), info, i)
        shards.write_json_atomic(layout.fs, layout.candidates_marker(fid), out[fid])
    return out


__all__ = ["candidate_table", "draw_pairs", "write_inputs", "write_key_files"]
