"""Column names, pyarrow schemas and the row hash shared by every stage.

Rows travel between stages as *batches*: ``dict[str, numpy.ndarray]`` with one
entry per column, all of the same length (Ray Data's ``numpy`` batch format).

The published shards (``OUTPUT/{en,multi,nolang}/*.parquet``) carry the
LAION-5B columns first (``URL``, ``TEXT``, ``WIDTH``, ``HEIGHT``,
``similarity``, ``LANGUAGE``, ``hash``) and then our own extras.

``hash`` is computed exactly as LAION-5B's metadata did::

    mmh3.hash64((URL + TEXT).encode("utf-8"), signed=True)[0]

and :func:`pair_hash` is the only implementation in the package.
"""

from __future__ import annotations

import mmh3
import numpy as np
import pyarrow as pa

SUBSETS = ("en", "multi", "nolang")

#: ``LANGUAGE`` value of rows routed to ``nolang`` (ISO 639-2 "undetermined")
NOLANG_CODE = "und"

# candidate columns, produced by stages.candidates
URL = "url"
ALT_TEXT = "alt_text"
PAGE_URL = "page_url"
WARC_PATH = "warc_path"
WARC_RECORD_ID = "warc_record_id"
WARC_OFFSET = "warc_offset"
HASH = "hash"
#: LAION-5B's LICENSE: the page's first creativecommons.org/licenses/ link (80 chars), else "?"
LICENSE = "LICENSE"
#: LAION-5B's row number: the first number of the input (``ordinal * SAMPLE_ID_STRIDE``) plus the
#: candidate's position among the input's candidates (in link order, after the in-file de-dup)
SAMPLE_ID = "SAMPLE_ID"
#: numbers reserved per input (far above the candidates of one Common Crawl file)
SAMPLE_ID_STRIDE = 1 << 24
# language routing, produced by stages.langid
SUBSET = "subset"
LANGUAGE = "language"
LANGUAGE_SCORE = "language_score"
NOLANG_REASON = "nolang_reason"
#: the text language id reads when it is not ``ALT_TEXT``: LAION-5B identified the language of the
#: whole cleaned alt text and cut it to ``extract.max_alt_length`` after (a row field between the
#: extraction and the language stage only, never written)
LANGID_TEXT = "langid_text"
# fetch / resize, produced by stages.fetch + stages.resize
STATUS = "status"
ERROR_MESSAGE = "error_message"
WIDTH = "width"
HEIGHT = "height"
#: resized RGB pixels: raw uint8 bytes of an [S, S, 3] array from the fetch stage (None when
#: the fetch failed: no pixels travel for it), or a uint8 [N, S, S, 3] array; see image_rows
IMAGE = "image"
IMAGE_BYTES = "image_bytes"  # encoded resized image, only with output.save_images
# clip scoring
SIMILARITY = "similarity"
NSFW = "NSFW"
# safety scores (stages.safety): float32 probabilities, NaN when not scored
PUNSAFE = "punsafe"
PWATERMARK = "pwatermark"
# every stage: "" while the row is alive, else why it was dropped
DROP_REASON = "drop_reason"

STATUS_SUCCESS = "success"

CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field(URL, pa.string()),
        pa.field(ALT_TEXT, pa.string()),
        pa.field(PAGE_URL, pa.string()),
        pa.field(WARC_PATH, pa.string()),
        pa.field(WARC_RECORD_ID, pa.string()),
        pa.field(WARC_OFFSET, pa.int64()),
        pa.field(HASH, pa.int64()),
        pa.field(LICENSE, pa.string()),
    ]
)

ROUTED_SCHEMA = CANDIDATE_SCHEMA.append(pa.field(SUBSET, pa.string())) \
    .append(pa.field(LANGUAGE, pa.string())) \
    .append(pa.field(LANGUAGE_SCORE, pa.float32())) \
    .append(pa.field(NOLANG_REASON, pa.string())) \
    .append(pa.field(SAMPLE_ID, pa.int64()))

#: schema of the published shards; LAION-5B's columns first
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("SAMPLE_ID", pa.int64()),
        pa.field("URL", pa.string()),
        pa.field("TEXT", pa.string()),
        pa.field("WIDTH", pa.int32()),
        pa.field("HEIGHT", pa.int32()),
        pa.field("similarity", pa.float32()),
        pa.field("LANGUAGE", pa.string()),
        pa.field("hash", pa.int64()),
        pa.field("LICENSE", pa.string()),
        pa.field("language_score", pa.float32()),
        pa.field("page_url", pa.string()),
        pa.field("warc_path", pa.string()),
        pa.field("warc_record_id", pa.string()),
        pa.field("warc_offset", pa.int64()),
        pa.field("key", pa.string()),
    ]
)

#: internal column -> published column
OUTPUT_COLUMNS = {
    SAMPLE_ID: "SAMPLE_ID",
    URL: "URL",
    ALT_TEXT: "TEXT",
    WIDTH: "WIDTH",
    HEIGHT: "HEIGHT",
    SIMILARITY: "similarity",
    LANGUAGE: "LANGUAGE",
    HASH: "hash",
    LICENSE: "LICENSE",
    LANGUAGE_SCORE: "language_score",
    PAGE_URL: "page_url",
    WARC_PATH: "warc_path",
    WARC_RECORD_ID: "warc_record_id",
    WARC_OFFSET: "warc_offset",
}


#: candidate columns whose name in files (candidates, work shards, fates) is the published one;
#: every other candidate column keeps its name
CANDIDATE_FILE_NAMES = {URL: "URL", ALT_TEXT: "TEXT", LANGUAGE: "LANGUAGE"}


def candidate_file_schema() -> pa.Schema:
    """Schema of the candidate and work-shard files: :data:`ROUTED_SCHEMA` under the published names."""
    return pa.schema([pa.field(CANDIDATE_FILE_NAMES.get(f.name, f.name), f.type) for f in ROUTED_SCHEMA])


def batch_to_candidate_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A routed batch as a candidate-file table (published column names)."""
    arrays = []
    for f in ROUTED_SCHEMA:
        values = batch[f.name]
        if pa.types.is_string(f.type):
            values = ["" if v is None else str(v) for v in values]
        arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=candidate_file_schema())


def candidate_table_to_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A candidate-file table as a batch with the internal column names, every row alive."""
    back = {v: k for k, v in CANDIDATE_FILE_NAMES.items()}
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type):
            out[back.get(name, name)] = np.array(col.to_pylist(), dtype=object)
        else:
            out[back.get(name, name)] = col.to_numpy(zero_copy_only=False)
    out[DROP_REASON] = np.full(table.num_rows, "", dtype=object)
    return out


def url_hash(url: str) -> int:
    """Signed 64-bit murmur3 of the URL alone (buckets of the URL de-dup key)."""
    return mmh3.hash64(url.encode("utf-8"), signed=True)[0]


#: value of an output column whose internal column a batch lacks (rows made before it existed)
OUTPUT_DEFAULTS = {LICENSE: "?", SAMPLE_ID: None}


def sample_ids(ordinal: int, n: int) -> np.ndarray:
    """``SAMPLE_ID`` of the ``n`` candidates of the input numbered ``ordinal``."""
    if n > SAMPLE_ID_STRIDE:
        raise ValueError(f"{n} candidates in one input: more than the {SAMPLE_ID_STRIDE} numbers each input has")
    return np.arange(n, dtype=np.int64) + np.int64(ordinal) * SAMPLE_ID_STRIDE


def pair_hash(url: str, text: str) -> int:
    """LAION-5B's ``hash`` column: signed 64-bit murmur3 of URL + TEXT."""
    return mmh3.hash64((url + text).encode("utf-8"), signed=True)[0]


def pair_hashes(urls, texts) -> np.ndarray:
    return np.fromiter((pair_hash(u, t) for u, t in zip(urls, texts)), dtype=np.int64, count=len(urls))


def row_key(warc_path: str, warc_offset: int, record_id: str, url: str, text: str, sample_id=None) -> str:
    """Per-row key of a published row (names saved images and joins embedding rows): 16 hex
    digits of the unsigned 64-bit murmur3 of ``warc_path|warc_offset|warc_record_id|URL|TEXT|SAMPLE_ID``.

    Two rows differ in at least one of these: two ``<img>`` of one URL with other alt texts
    differ in TEXT, records of one gzip member in ``warc_record_id``, and ``SAMPLE_ID`` (the
    row's number in the run, empty for rows made before it existed) tells apart even rows
    equal in all the rest (an image repeated on a page with ``dedup_within_file`` off)."""
    sid = "" if sample_id is None else str(int(sample_id))
    h = mmh3.hash64(f"{warc_path}|{warc_offset}|{record_id}|{url}|{text}|{sid}".encode("utf-8"), signed=False)[0]
    return f"{h:016x}"


def row_keys(batch: dict[str, np.ndarray], idx) -> list[str]:
    """:func:`row_key` of the rows ``idx`` (indices or a mask) of a batch: the only way the
    published ``key`` column is computed."""
    rows = np.flatnonzero(idx) if getattr(idx, "dtype", None) == bool else np.asarray(idx, dtype=np.int64)
    ids = batch.get(SAMPLE_ID)
    records = batch.get(WARC_RECORD_ID)
    out = []
    for i in rows:
        sid = ids[i] if ids is not None else None
        out.append(row_key(batch[WARC_PATH][i], int(batch[WARC_OFFSET][i]),
                           "" if records is None or records[i] is None else str(records[i]),
                           batch[URL][i], batch[ALT_TEXT][i], sid))
    return out


def image_rows(images, idx: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[k, size, size, 3]`` of rows ``idx`` of an ``IMAGE`` column, and the mask of rows
    without a usable image. The column is a dense uint8 array or one value per row: raw
    bytes (the fetch stage's), an array, or None."""
    if images is not None and getattr(images, "dtype", None) != object and getattr(images, "ndim", 0) == 4:
        if images.shape[1:] != (size, size, 3):
            return np.zeros((len(idx), size, size, 3), np.uint8), np.ones(len(idx), bool)
        if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
            sel = images[idx[0]: idx[-1] + 1]  # a contiguous run: a view, no copy
        else:
            sel = images[idx]
        return (sel if sel.dtype == np.uint8 else np.clip(sel, 0, 255).astype(np.uint8)), np.zeros(len(idx), bool)
    out = np.zeros((len(idx), size, size, 3), np.uint8)
    bad = np.zeros(len(idx), bool)
    n_bytes = size * size * 3
    for j, i in enumerate(idx):
        value = images[i] if images is not None else None
        if isinstance(value, (bytes, bytearray, memoryview)):
            if len(value) != n_bytes:
                bad[j] = True
            else:
                out[j] = np.frombuffer(value, np.uint8).reshape(size, size, 3)
            continue
        a = np.asarray(value) if value is not None else None
        if a is None or a.shape != (size, size, 3):
            bad[j] = True
        else:
            out[j] = a
    return out, bad


def batch_len(batch: dict) -> int:
    for value in batch.values():
        return len(value)
    return 0


def rows_to_batch(rows: list[dict], schema: pa.Schema) -> dict[str, np.ndarray]:
    """Turn a list of row dicts into a numpy batch with the columns of ``schema``."""
    out: dict[str, np.ndarray] = {}
    for fld in schema:
        values = [r.get(fld.name) for r in rows]
        if pa.types.is_string(fld.type):
            out[fld.name] = np.array(["" if v is None else v for v in values], dtype=object)
        else:
            out[fld.name] = np.array(values, dtype=fld.type.to_pandas_dtype())
    return out
