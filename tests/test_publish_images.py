"""Publishing the scored image tars: each tar once to its published name, without the rows a list
names, many at once (threads of the driver for a small run, Ray tasks on the engine)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from laionbuild import schema as S
from laionbuild.config import BlocklistConfig
from laionbuild.output.layout import OutputLayout
from laionbuild.runner.publish import PublishFilter, _publish_images
from laionbuild.stages.shards import images_tar


def _scored_tars(out, n_tars: int, rows: int) -> tuple[list[dict], list[str]]:
    """``n_tars`` scored tars of ``rows`` rows each under ``out/scored``; the markers and every URL."""
    layout = OutputLayout(str(out))
    markers, urls = [], []
    for t in range(n_tars):
        u = [f"http://img.test/{t}/{i}.jpg" for i in range(rows)]
        batch = {S.WARC_PATH: np.array(["w.warc.gz"] * rows, dtype=object),
                 S.WARC_OFFSET: np.arange(rows) + 1000 * t, S.URL: np.array(u, dtype=object),
                 S.IMAGE_BYTES: np.array([b"\xff\xd8jpeg%d" % i for i in range(rows)], dtype=object),
                 S.ALT_TEXT: np.array([f"caption {t} {i}" for i in range(rows)], dtype=object),
                 S.WIDTH: np.full(rows, 8), S.HEIGHT: np.full(rows, 8)}
        path = layout.path("scored", f"g0000-s{t:05d}-000", "images-abc.tar")
        layout.fs.makedirs(layout.path("scored", f"g0000-s{t:05d}-000"), exist_ok=True)
        with layout.fs.open(path, "wb") as fh:
            fh.write(images_tar(batch, np.ones(rows, bool)))
        markers.append({"parts": [path]})
        urls += u
    return markers, urls


def _urls_in(paths: list[str]) -> list[str]:
    urls = []
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    urls.append(json.loads(tar.extractfile(m).read())["url"])
    return sorted(urls)


def _publish(tmp_path, on_engine: bool):
    out = tmp_path / "out"
    markers, urls = _scored_tars(out, n_tars=20, rows=3)
    blocked = tmp_path / "blocked.txt"
    blocked.write_text(urls[0] + "\n" + urls[7] + "\n")
    row_filter = PublishFilter(BlocklistConfig(url_files=(str(blocked),)), str(out))
    written = _publish_images(OutputLayout(str(out)), markers, row_filter, generation=3, on_engine=on_engine)
    return out, urls, written


@pytest.mark.parametrize("on_engine", [False, pytest.param(True, marks=pytest.mark.ray)])
def test_every_tar_published_once_without_the_listed_rows(tmp_path, on_engine, request):
    if on_engine:
        request.getfixturevalue("ray_session")
    out, urls, written = _publish(tmp_path, on_engine)
    assert len(written) == 20 and len(set(written)) == 20
    assert all("/images/part-g0003-" in w for w in written)
    assert _urls_in(written) == sorted(set(urls) - {urls[0], urls[7]})
    # the scored tars are untouched
    assert _urls_in(sorted(str(p) for p in (out / "scored").glob("*/images-abc.tar"))) == sorted(urls)
    # a tar without a listed row is the same bytes as its scored tar
    src = sorted((out / "scored").glob("*/images-abc.tar"))
    same = [w for s, w in zip(src, written) if s.read_bytes() == open(w, "rb").read()]
    assert len(same) == 20 - 2 or len(same) == 20 - 1  # the two listed rows sit in one or two tars


def test_filter_image_tar_in_place_and_by_key(tmp_path):
    from laionbuild.stages.blocklist import filter_image_tar

    out = tmp_path / "out"
    markers, urls = _scored_tars(out, n_tars=1, rows=4)
    layout = OutputLayout(str(out))
    path = markers[0]["parts"][0]
    with tarfile.open(path) as tar:
        keys = sorted({m.name.rsplit(".", 1)[0] for m in tar.getmembers()})
    assert filter_image_tar(layout.fs, path, [], keys=[keys[1]]) == 1
    with tarfile.open(path) as tar:
        assert sorted({m.name.rsplit(".", 1)[0] for m in tar.getmembers()}) == [keys[0], *keys[2:]]
        assert len(tar.getmembers()) == 9  # image, caption and json of the three rows left
    assert filter_image_tar(layout.fs, path, [], keys=[]) == 0
    assert io.BytesIO(open(path, "rb").read()).getbuffer().nbytes > 0


def test_row_keys_are_unique_and_the_same_in_shards_and_tars():
    """Rows that share the page and the URL (two <img> of one URL with other alts, records of
    one gzip member at one offset, an image repeated on a page) get keys of their own, and the
    published shard names a row's image by the same key."""
    from laionbuild.stages.shards import output_table

    rows = 5
    batch = {S.WARC_PATH: np.array(["w.warc.gz"] * rows, dtype=object),
             S.WARC_OFFSET: np.array([0, 0, 0, 0, 0]),
             S.WARC_RECORD_ID: np.array(["<urn:a>", "<urn:a>", "<urn:b>", "<urn:a>", "<urn:a>"], dtype=object),
             S.URL: np.array(["http://img.test/logo.jpg"] * rows, dtype=object),
             S.ALT_TEXT: np.array(["Company logo blue", "Company logo red", "Company logo blue",
                                   "Company logo green", "Company logo green"], dtype=object),
             S.SAMPLE_ID: np.arange(rows, dtype=np.int64),
             S.IMAGE_BYTES: np.array([b"\xff\xd8jpeg"] * rows, dtype=object),
             S.WIDTH: np.full(rows, 8), S.HEIGHT: np.full(rows, 8)}
    for col in (S.PAGE_URL, S.LICENSE, S.LANGUAGE):
        batch[col] = np.array([""] * rows, dtype=object)
    for col in (S.HASH,):
        batch[col] = np.zeros(rows, np.int64)
    batch[S.SIMILARITY] = np.zeros(rows, np.float32)
    batch[S.LANGUAGE_SCORE] = np.zeros(rows, np.float32)
    mask = np.ones(rows, bool)
    keys = output_table(batch, mask).column("key").to_pylist()
    assert len(set(keys)) == rows
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in keys)
    with tarfile.open(fileobj=io.BytesIO(images_tar(batch, mask))) as tar:
        names = [m.name for m in tar.getmembers()]
    assert sorted(n.rsplit(".", 1)[0] for n in names if n.endswith(".json")) == sorted(keys)
    # a subset of the rows keeps its keys
    assert output_table(batch, np.array([False, True, False, True, False])).column("key").to_pylist() \
        == [keys[1], keys[3]]
