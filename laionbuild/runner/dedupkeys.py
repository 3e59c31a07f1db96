"""The files of the de-dup phase: keys per input, winners and index per hash range (no Ray here).

Phase 1 writes, next to each input's candidate table, its *key file*: one fixed-width record per
candidate, sorted by key hash, preceded by a prefix index so that the records of any hash range
are one contiguous slice (one ranged read)::

    "LBKEYS01"  u32 bits  u32 rows  u32 offsets[2**bits + 1]  KEY_RECORD[rows]

``KEY_RECORD`` (20 bytes): ``h1`` (u64) and ``h2`` (u32), a 96-bit hash of the de-dup key;
``rank`` (u32), the row's position in its input ordered by ``(warc_path, warc_offset, TEXT)``;
``row`` (u32), the row's index in the candidate table. Inputs are numbered in the order of their
first ``warc_path``, so ``(input, rank)`` compared as integers is today's tie-break: among the rows
of one key, the smallest ``(warc_path, warc_offset, TEXT)`` wins.

A hash range ``r`` of ``R`` is the interval ``[r * 2**64 // R, (r + 1) * 2**64 // R)`` of ``h1``.
Per generation and range, phase 2 writes the winners (locators ``(input, row)`` sorted, with an
offset per group of inputs, so that a group's slice is one read) and the range's *index*: the
sorted keys ``(h1, h2)`` of every row the output holds up to that generation.
"""

from __future__ import annotations

import math
import struct

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import schema as S

KEY_MAGIC = b"LBKEYS01"
WINNERS_MAGIC = b"LBWINS01"
#: one record per candidate in a key file (20 bytes)
KEY_RECORD = np.dtype([("h1", "<u8"), ("h2", "<u4"), ("rank", "<u4"), ("row", "<u4")])
#: one record per winner: its input (in the generation's order) and its row there (8 bytes)
LOCATOR = np.dtype([("input", "<u4"), ("row", "<u4")])
#: one record per key the output holds (12 bytes)
INDEX_RECORD = np.dtype([("h1", "<u8"), ("h2", "<u4")])
_KEY_HEADER = struct.Struct("<8sII")
_WINNERS_HEADER = struct.Struct("<8sII")
#: about this many records per prefix of a key file's index
ROWS_PER_PREFIX = 64
#: at most 2**MAX_PREFIX_BITS prefixes (a 4 MiB index) per key file
MAX_PREFIX_BITS = 20
HASH_SPACE = 1 << 64
_KEY_SEPARATOR = b"\x00"
#: a NUL inside a URL, in a URL + TEXT key: written as the request sends it (``%00``), so that the
#: separator is the key's first NUL and two pairs never share a key ((``a\x00b``, ``c``) and
#: (``a``, ``b\x00c``) did)
URL_NUL = "%00"


# --------------------------------------------------------------------------- keys
def key_hashes(urls: list[str], texts: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """96-bit hash (``h1`` u64, ``h2`` u32) of each key: the URL, or URL + TEXT when ``texts``."""
    n = len(urls)
    h1 = np.empty(n, dtype=np.uint64)
    h2 = np.empty(n, dtype=np.uint32)
    mask = 0xFFFFFFFF
    if texts is None:
        keys = (u.encode("utf-8") for u in urls)
    else:
        keys = (u.replace("\x00", URL_NUL).encode("utf-8") + _KEY_SEPARATOR + t.encode("utf-8")
                for u, t in zip(urls, texts))
    for i, k in enumerate(keys):
        a, b = mmh3.hash64(k, signed=False)
        h1[i] = a
        h2[i] = b & mask
    return h1, h2


def prefix_bits(rows: int) -> int:
    if rows <= ROWS_PER_PREFIX:
        return 0
    return min(MAX_PREFIX_BITS, math.ceil(math.log2(rows / ROWS_PER_PREFIX)))


def encode_key_records(h1: np.ndarray, h2: np.ndarray, rank: np.ndarray) -> bytes:
    """A key file from the hashes and tie-break ranks of one input's rows (in table order)."""
    n = len(h1)
    rec = np.empty(n, dtype=KEY_RECORD)
    rec["h1"], rec["h2"], rec["rank"], rec["row"] = h1, h2, rank, np.arange(n, dtype=np.uint32)
    rec = rec[np.lexsort((rec["rank"], rec["h2"], rec["h1"]))]
    bits = prefix_bits(n)
    prefixes = rec["h1"] >> np.uint64(64 - bits) if bits else np.zeros(n, dtype=np.uint64)
    offsets = np.searchsorted(prefixes, np.arange((1 << bits) + 1, dtype=np.uint64), side="left").astype("<u4")
    return _KEY_HEADER.pack(KEY_MAGIC, bits, n) + offsets.tobytes() + rec.tobytes()


def tie_break_ranks(table: pa.Table) -> np.ndarray:
    """Each row's position in its table ordered by ``(warc_path, warc_offset, TEXT)`` (stable)."""
    order = pc.sort_indices(table, sort_keys=[(S.WARC_PATH, "ascending"), ("warc_offset", "ascending"),
                                              ("TEXT", "ascending")]).to_numpy()
    rank = np.empty(len(order), dtype=np.uint32)
    rank[order] = np.arange(len(order), dtype=np.uint32)
    return rank


def encode_keys(table: pa.Table, key: str) -> tuple[bytes, dict]:
    """The key file of one input's candidate table and what the driver needs of it (its marker)."""
    urls = table.column("URL").to_pylist()
    texts = table.column("TEXT").to_pylist() if key == "url_text" else None
    h1, h2 = key_hashes(urls, texts)
    data = encode_key_records(h1, h2, tie_break_ranks(table))
    paths = table.column(S.WARC_PATH)
    first = pc.min(paths).as_py() if table.num_rows else ""
    return data, {"key": key, "rows": table.num_rows, "bits": prefix_bits(table.num_rows),
                  "first_warc_path": first or "", "bytes": len(data)}


def range_bounds(r: int, n_ranges: int) -> tuple[int, int]:
    """``[lo, hi)`` of ``h1`` in hash range ``r`` of ``n_ranges`` (Python ints; ``hi`` may be 2**64)."""
    return r * HASH_SPACE // n_ranges, (r + 1) * HASH_SPACE // n_ranges


def in_bounds(h1: np.ndarray, lo: int, hi: int) -> np.ndarray:
    keep = h1 >= np.uint64(lo)
    if hi < HASH_SPACE:
        keep &= h1 < np.uint64(hi)
    return keep


def read_key_slice(fs, path: str, bits: int, lo: int, hi: int) -> tuple[np.ndarray, int]:
    """The records of ``[lo, hi)`` in one key file, and the bytes read (two ranged reads)."""
    shift = 64 - bits
    p0 = lo >> shift
    p1 = min(1 << bits, (hi + (1 << shift) - 1) >> shift)
    base = _KEY_HEADER.size
    raw = fs.cat_file(path, start=base + 4 * p0, end=base + 4 * (p1 + 1))
    offsets = np.frombuffer(raw, dtype="<u4")
    first, last = int(offsets[0]), int(offsets[-1])
    moved = len(raw)
    if last <= first:
        return np.zeros(0, dtype=KEY_RECORD), moved
    start = base + 4 * ((1 << bits) + 1) + first * KEY_RECORD.itemsize
    body = fs.cat_file(path, start=start, end=start + (last - first) * KEY_RECORD.itemsize)
    rec = np.frombuffer(body, dtype=KEY_RECORD)
    return rec[in_bounds(rec["h1"], lo, hi)], moved + len(body)


def check_key_file(data: bytes) -> tuple[int, int]:
    magic, bits, rows = _KEY_HEADER.unpack_from(data)
    if magic != KEY_MAGIC:
        raise ValueError("not a key file")
    return bits, rows


# --------------------------------------------------------------------------- winners
def encode_winners(loc: np.ndarray, group_starts: np.ndarray) -> bytes:
    """Winners of one range (sorted by input, row) with the offset of each group of inputs.

    ``group_starts``: the first input of each group, then the number of inputs."""
    offsets = np.searchsorted(loc["input"], group_starts.astype(np.uint32), side="left").astype("<u8")
    return _WINNERS_HEADER.pack(WINNERS_MAGIC, len(group_starts) - 1, len(loc)) + offsets.tobytes() + loc.tobytes()


def read_winners_group(fs, path: str, n_groups: int, group: int) -> tuple[np.ndarray, int]:
    """The locators of one group of inputs in one range's winners file (two ranged reads)."""
    base = _WINNERS_HEADER.size
    raw = fs.cat_file(path, start=base + 8 * group, end=base + 8 * (group + 2))
    first, last = (int(x) for x in np.frombuffer(raw, dtype="<u8"))
    if last <= first:
        return np.zeros(0, dtype=LOCATOR), len(raw)
    start = base + 8 * (n_groups + 1) + first * LOCATOR.itemsize
    body = fs.cat_file(path, start=start, end=start + (last - first) * LOCATOR.itemsize)
    return np.frombuffer(body, dtype=LOCATOR), len(raw) + len(body)


# --------------------------------------------------------------------------- index
def read_index(fs, path: str) -> np.ndarray:
    return np.frombuffer(fs.cat_file(path), dtype=INDEX_RECORD)


def merge_index(prev: np.ndarray, new_h1: np.ndarray, new_h2: np.ndarray) -> np.ndarray:
    out = np.empty(len(prev) + len(new_h1), dtype=INDEX_RECORD)
    out["h1"] = np.concatenate([prev["h1"], new_h1])
    out["h2"] = np.concatenate([prev["h2"], new_h2])
    out = out[np.lexsort((out["h2"], out["h1"]))]
    if len(out) > 1:
        same = (out["h1"][1:] == out["h1"][:-1]) & (out["h2"][1:] == out["h2"][:-1])
        out = out[np.concatenate([[True], ~same])]
    return out


def held(index: np.ndarray, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """Which keys ``(h1, h2)`` the sorted ``index`` holds."""
    if len(index) == 0 or len(h1) == 0:
        return np.zeros(len(h1), dtype=bool)
    lo = np.searchsorted(index["h1"], h1, side="left")
    hi = np.searchsorted(index["h1"], h1, side="right")
    out = np.zeros(len(h1), dtype=bool)
    one = hi - lo == 1
    out[one] = index["h2"][lo[one]] == h2[one]
    for i in np.nonzero(hi - lo > 1)[0]:  # two keys with the same h1: rare, a short scan
        out[i] = bool((index["h2"][lo[i]:hi[i]] == h2[i]).any())
    return out


__all__ = ["INDEX_RECORD", "KEY_RECORD", "LOCATOR", "encode_keys", "encode_winners", "held", "merge_index",
           "range_bounds", "read_index", "read_key_slice", "read_winners_group", "tie_break_ranks"]
