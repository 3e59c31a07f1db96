"""WAT input through the whole pipeline (Ray, tiny models): the same published pairs as the WARC of the
same pages, with LAION-5B's link rules, URL form, image path and de-dup after download switched on."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionbuild.config import load_config
from laionbuild.demo.image_server import LoopbackServer
from laionbuild.demo.run import SMOKE_CONFIG, demo_overrides
from laionbuild.demo.sample_warc import build_demo_sample
from laionbuild.runner.run import run
from laionbuild.schema import pair_hash
from laionbuild.stages.wat import write_wat_from_warc

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FAITHFUL = ["extract.link_rules=laion", "fetch.url_form=laion", "fetch.url_after_redirects=true",
            "resize.pixel_path=laion", "run.dedup_after_download=true", "run.progress=false"]


def _published(out: Path) -> dict[str, set]:
    got = {}
    for subset in ("en", "multi", "nolang"):
        rows = [r for f in sorted((out / subset).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
        assert all(r["hash"] == pair_hash(r["URL"], r["TEXT"]) for r in rows)
        got[subset] = {(r["URL"], r["TEXT"], r["LICENSE"]) for r in rows}
    return got


def test_wat_and_warc_inputs_publish_the_same_pairs(ray_session, tmp_path):
    with LoopbackServer("127.0.0.1") as server:
        sample = build_demo_sample(str(tmp_path / "sample"), image_base=f"http://images.demo.test:{server.port}")
        sample.register(server)
        wat = tmp_path / "demo.warc.wat.gz"
        write_wat_from_warc(sample.warc_paths, str(wat))
        outputs = {}
        for name, inputs in (("warc", sample.warc_paths), ("wat", [str(wat)])):
            out = tmp_path / name
            cfg = load_config(SMOKE_CONFIG, [*demo_overrides(sample, str(out), False), *FAITHFUL,
                                             f"run.inputs={json.dumps(inputs)}"])
            result = run(cfg)
            assert result.exit_code == 0, name
            stats = json.loads((out / "stats.json").read_text())
            assert stats["files"]["failed"] == 0, name
            outputs[name] = _published(out)
    assert sum(len(v) for v in outputs["warc"].values()) > 0
    assert outputs["wat"] == outputs["warc"]
