"""Writing rows as parquet files, atomically, through fsspec.

Work files are written under a unique name and only count once the marker of
their unit lists them (see :mod:`laionbuild.output.layout`); anything not listed
is a leftover of an interrupted run and is removed on resume. The output folder
may live on a remote filesystem; there the marker, written last, is the commit.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import shutil
import tarfile
import uuid
from typing import Any, BinaryIO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import schema as S
from ..output.fs import has_folders, is_local

EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")
#: optional float32 safety score columns (stages.safety), published when present
SAFETY_COLUMNS = (S.PUNSAFE, S.PWATERMARK)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers never see a partial file (:func:`write_file_atomic`)."""
    write_file_atomic(fs, path, io.BytesIO(data))


def write_file_atomic(fs: fsspec.AbstractFileSystem, path: str, fh: BinaryIO) -> None:
    """Write the contents of the file object ``fh`` (from its start, copied a MiB at a time, never
    held whole) so that readers never see a partial file.

    On a local filesystem a temporary name is renamed into place; on object
    stores a single PUT, or a multipart upload completed at close, is already all-or-nothing.
    """
    parent = posixpath.dirname(path)
    if parent and has_folders(fs):
        fs.makedirs(parent, exist_ok=True)
    fh.seek(0)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if is_local(fs) else None
    try:
        with fs.open(tmp or path, "wb") as out:
            shutil.copyfileobj(fh, out, 1 << 20)
        if tmp:
            fs.mv(tmp, path)
    except OSError as exc:
        if tmp:  # a half-written file takes no space and no name
            with contextlib.suppress(OSError):
                fs.rm(tmp)
        if exc.errno and not exc.filename:  # a full disk says so at a write, without the file's name
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        raise


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the JSON bytes every marker and pointer of an output is written in."""
    return json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True).encode("utf-8")


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, json_bytes(obj))


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read().decode("utf-8"))


def read_json_object(fs: fsspec.AbstractFileSystem, path: str, shown: str = "") -> dict[str, Any]:
    """A JSON file that must hold an object (``stats.json``, ``provenance.json``); one that does
    not is a :class:`~laionbuild.errors.SetupError` naming the file (``shown``, else ``path``)."""
    from ..errors import SetupError

    try:
        data = read_json(fs, path)
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise SetupError(f"{shown or path} is not valid JSON ({exc}); restore it or rerun the run that wrote it") \
            from None
    if not isinstance(data, dict):
        raise SetupError(f"{shown or path} holds a JSON {type(data).__name__}, not an object; restore it or rerun "
                         "the run that wrote it")
    return data


def table_to_bytes(table: pa.Table, compression: str, row_group_size: int | None = None) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression, row_group_size=row_group_size)
    return sink.getvalue()


def output_table(batch: dict[str, np.ndarray], mask: np.ndarray) -> pa.Table:
    """The published columns (LAION-5B first, then our extras) of the rows in ``mask``."""
    arrays = []
    for internal, published in S.OUTPUT_COLUMNS.items():
        typ = S.OUTPUT_SCHEMA.field(published).type
        if internal not in batch and internal in S.OUTPUT_DEFAULTS:
            arrays.append(pa.array([S.OUTPUT_DEFAULTS[internal]] * int(np.count_nonzero(mask)), type=typ))
            continue
        values = batch[internal][mask]
        if pa.types.is_string(typ):
            values = ["" if v is None else str(v) for v in values]
        arrays.append(pa.array(values, type=typ))
    keys = S.row_keys(batch, mask)
    arrays.append(pa.array(keys, type=pa.string()))
    table = pa.Table.from_arrays(arrays, schema=S.OUTPUT_SCHEMA)
    if S.NSFW in batch:
        table = table.append_column("NSFW", pa.array([str(v) for v in batch[S.NSFW][mask]], pa.string()))
    for name in SAFETY_COLUMNS:
        if name in batch:
            table = table.append_column(name, pa.array(np.asarray(batch[name][mask], dtype=np.float32), pa.float32()))
    for name in EMBEDDING_COLUMNS:
        if name in batch:
            emb = np.asarray(batch[name][mask], dtype=np.float16)
            dim = emb.shape[1] if emb.ndim == 2 else 0
            flat = pa.array(emb.reshape(-1), type=pa.float16())
            table = table.append_column(name, pa.FixedSizeListArray.from_arrays(flat, dim))
    return table


def safe_view(table: pa.Table, punsafe_max: float | None, pwatermark_max: float | None) -> tuple[pa.Table, dict]:
    """Rows of a published table whose set bounds hold (``punsafe < punsafe_max``, ``pwatermark < pwatermark_max``).

    A row lacking a bounded score (no column, null or NaN) never passes. Returns the
    filtered table and why the other rows were left out: ``unscored``, else
    ``unsafe``, else ``watermark`` (one reason per row, in that order).
    """
    n = table.num_rows
    keep = np.ones(n, dtype=bool)
    unscored = np.zeros(n, dtype=bool)
    failed = {}
    for column, bound, reason in ((S.PUNSAFE, punsafe_max, "unsafe"), (S.PWATERMARK, pwatermark_max, "watermark")):
        if bound is None:
            continue
        if column in table.column_names:
            values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
        else:
            values = np.full(n, np.nan)
        missing = np.isnan(values)
        unscored |= missing
        with np.errstate(invalid="ignore"):
            failed[reason] = ~missing & ~(values < float(bound))
        keep &= ~missing & (values < float(bound))
    reasons = {"unscored": int(unscored.sum())}
    left = ~unscored
    for reason, bad in failed.items():
        reasons[reason] = int((bad & left).sum())
        left &= ~bad
    return table.filter(pa.array(keep)), reasons




def images_tar(batch: dict[str, np.ndarray], mask: np.ndarray) -> bytes:
    """webdataset-style tar: ``<key>.jpg`` + ``<key>.txt`` + ``<key>.json`` per kept row."""
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as tar:
        rows = np.flatnonzero(mask)
        for i, key in zip(rows, S.row_keys(batch, rows)):
            data = batch[S.IMAGE_BYTES][i] or b""
            ext = "png" if data[:4] == b"\x89PNG" else "jpg"
            meta = {"url": batch[S.URL][i], "caption": batch[S.ALT_TEXT][i], "key": key,
                    "width": int(batch[S.WIDTH][i]), "height": int(batch[S.HEIGHT][i])}
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", batch[S.ALT_TEXT][i].encode("utf-8")),
                                  (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return sink.getvalue()
