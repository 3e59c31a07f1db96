"""LAION-5B's de-duplication after download: one row per (final ``URL``, ``TEXT``).

With the ``URL`` column written as the downloader reported it (after redirects,
``fetch.url_form: laion``), two candidates linked under different URLs can end
as the same pair; LAION-5B's scored-pairs filter kept the pair once.
:func:`drop_repeated_pairs` keeps, per (``URL``, ``TEXT``), the row that comes
first by (``warc_path``, ``warc_offset``) — the same order-independent rule as
the de-duplication before download. Rows with equal pairs have equal ``hash``
(computed from the final URL), so the publish phase, which groups rows by
``hash``, sees every copy of a pair in one group (``run.dedup_after_download``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

#: columns that order the copies of a pair (the first is kept), when present
ORDER_COLUMNS = ("warc_path", "warc_offset")


def drop_repeated_pairs(table: pa.Table, url: str = "URL", text: str = "TEXT") -> tuple[pa.Table, int]:
    """``table`` with one row per (``url``, ``text``) and the number of rows dropped."""
    if table.num_rows < 2:
        return table, 0
    order = [(url, "ascending"), (text, "ascending")]
    order += [(c, "ascending") for c in ORDER_COLUMNS if c in table.column_names]
    ranked = table.sort_by(order)
    urls = np.asarray(ranked.column(url).to_pylist(), dtype=object)
    texts = np.asarray(ranked.column(text).to_pylist(), dtype=object)
    first = np.ones(len(urls), dtype=bool)
    first[1:] = (urls[1:] != urls[:-1]) | (texts[1:] != texts[:-1])
    dropped = int((~first).sum())
    if not dropped:
        return table, 0
    return ranked.filter(pa.array(first)), dropped


__all__ = ["drop_repeated_pairs"]
