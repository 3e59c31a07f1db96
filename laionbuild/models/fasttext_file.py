"""Check a fastText model file's structure before fastText reads it.

fastText's loader trusts the file: a dictionary cut short makes it read past the end for ever
(a word is read up to its terminating zero byte, and the end of the file is never one), so a
truncated ``lid.176.bin`` / ``.ftz`` hangs the process that loads it. :func:`check_fasttext_file`
walks the sections of the binary format (``Args``, ``Dictionary``, the input and output matrices,
dense or product-quantized) by their sizes and returns the byte count they take; a file that ends
early, holds more, or announces impossible sizes raises :class:`FastTextFileError` with the reason.
The matrices are not read, only their sizes: the check costs one pass over the dictionary.
"""

from __future__ import annotations

import mmap
import struct

#: the file's first int32 (``FASTTEXT_FILEFORMAT_MAGIC_INT32``) and the newest version it may carry
MAGIC = 793712314
MAX_VERSION = 12
#: ``Args``: twelve int32 (dim, ws, epoch, minCount, neg, wordNgrams, loss, model, bucket, minn,
#: maxn, lrUpdateRate) and a double (t)
_ARGS = struct.Struct("<12id")
#: ``Dictionary`` header: size, nwords, nlabels (int32), ntokens, pruneidx_size (int64)
_DICT = struct.Struct("<3i2q")
#: a dictionary entry after its zero-terminated word: count (int64), type (int8)
_ENTRY_TAIL = 9
#: centroids per sub-quantizer of a product quantizer (8 bits)
_KSUB = 256
_FLOAT = 4


class FastTextFileError(ValueError):
    """The file is not a complete fastText model; the message says what is wrong."""


class _Reader:
    def __init__(self, data, size: int):
        self.data, self.size, self.pos = data, size, 0

    def take(self, n: int, what: str) -> int:
        if n < 0:
            raise FastTextFileError(f"{what}: a negative size ({n})")
        if self.pos + n > self.size:
            raise FastTextFileError(f"the file ends inside {what} (at byte {self.size}, {what} needs "
                                    f"{self.pos + n}): an incomplete download or copy")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack_from(self.data, self.take(fmt.size, what))

    def product_quantizer(self, what: str) -> None:
        dim, nsubq, dsub, lastdsub = self.unpack(struct.Struct("<4i"), what)
        if dim < 0 or nsubq < 0:
            raise FastTextFileError(f"{what}: impossible sizes (dim {dim}, {nsubq} sub-quantizers)")
        self.take(dim * _KSUB * _FLOAT, f"{what} centroids")

    def matrix(self, quantized: bool, what: str) -> None:
        if not quantized:
            m, n = self.unpack(struct.Struct("<2q"), what)
            if m < 0 or n < 0:
                raise FastTextFileError(f"{what}: impossible shape {m} x {n}")
            self.take(m * n * _FLOAT, f"{what} values")
            return
        (qnorm,) = self.unpack(struct.Struct("<?"), what)
        m, n, codesize = self.unpack(struct.Struct("<2qi"), what)
        if m < 0 or n < 0:
            raise FastTextFileError(f"{what}: impossible shape {m} x {n}")
        self.take(codesize, f"{what} codes")
        self.product_quantizer(f"{what} quantizer")
        if qnorm:
            self.take(m, f"{what} norm codes")
            self.product_quantizer(f"{what} norm quantizer")


def check_fasttext_file(path: str) -> int:
    """The bytes of the fastText model at ``path``, once its structure checks out; raises
    :class:`FastTextFileError` for a file fastText would misread or hang on, ``OSError`` when it
    cannot be read."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise FastTextFileError("the file is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            r = _Reader(data, size)
            magic, version = r.unpack(struct.Struct("<2i"), "the header")
            if magic != MAGIC:
                raise FastTextFileError("not a fastText model (its first bytes are not fastText's mark)")
            if version > MAX_VERSION:
                raise FastTextFileError(f"fastText file version {version}, newer than {MAX_VERSION}")
            r.unpack(_ARGS, "the training arguments")
            n_entries, _, _, _, n_pruned = r.unpack(_DICT, "the dictionary header")
            if n_entries < 0 or n_pruned < -1:
                raise FastTextFileError(f"the dictionary: impossible sizes ({n_entries} words)")
            for i in range(n_entries):
                end = data.find(b"\0", r.pos)
                if end < 0:
                    raise FastTextFileError(f"the file ends inside the dictionary (word {i + 1} of {n_entries}): "
                                            "an incomplete download or copy")
                r.pos = end + 1
                r.take(_ENTRY_TAIL, "the dictionary")
            r.take(max(0, n_pruned) * 8, "the dictionary's pruned index")
            (quantized_input,) = r.unpack(struct.Struct("<?"), "the input matrix")
            r.matrix(quantized_input, "the input matrix")
            (quantized_output,) = r.unpack(struct.Struct("<?"), "the output matrix")
            r.matrix(quantized_input and quantized_output, "the output matrix")
            if r.pos != size:
                raise FastTextFileError(f"{size - r.pos} bytes after the model's end: not one fastText model")
            return size


__all__ = ["FastTextFileError", "check_fasttext_file"]
