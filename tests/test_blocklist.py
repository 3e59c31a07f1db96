"""Block lists: parsing and matching, and through the real pipeline: no request, no row, counted per list."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest

from laionbuild import schema as S
from laionbuild.config import BlocklistConfig, load_config
from laionbuild.errors import ConfigError
from laionbuild.stages.blocklist import Blocklist, cached, normalize_domain, normalize_url, parse_hash


# --------------------------------------------------------------------------- units
def test_url_normal_form():
    assert normalize_url(" HTTP://Ex.COM:80/A/b.jpg?Q=1#frag ") == "http://ex.com/A/b.jpg?Q=1"
    assert normalize_url("https://ex.com:8443/x") == "https://ex.com:8443/x"
    assert normalize_url("https://ex.com") == "https://ex.com/"
    assert normalize_url("http://ex.com/a") != normalize_url("http://ex.com/A")


def test_domain_entries():
    assert normalize_domain("*.Example.COM.") == "example.com"
    assert normalize_domain(".example.com") == "example.com"
    assert normalize_domain("https://img.example.com/x.jpg") == "img.example.com"
    assert normalize_domain("bücher.de") == "xn--bcher-kva.de"


def test_hash_entries():
    assert parse_hash("-1234567890123") == ("laion", -1234567890123)
    assert parse_hash(str((1 << 64) - 5)) == ("laion", -5)  # unsigned spelling
    assert parse_hash("laion:42") == ("laion", 42)
    sha = hashlib.sha256(b"x").hexdigest()
    assert parse_hash(sha.upper()) == ("sha256", sha)
    assert parse_hash("md5:" + hashlib.md5(b"x").hexdigest())[0] == "md5"
    assert parse_hash("md5:" + sha) is None  # length does not fit the name
    assert parse_hash("xyz") is None and parse_hash("sha512:ab") is None


def _write(path: Path, lines: list[str], gz: bool = False) -> str:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def test_lists_match_rows_and_batches(tmp_path):
    cfg = BlocklistConfig(
        url_files=(_write(tmp_path / "urls.txt", ["# bad urls", "", "http://A.test/x.jpg#f"]),),
        domain_files=(_write(tmp_path / "domains.txt.gz", ["evil.test  # whole site", "1.2.3.4"], gz=True),),
        hash_files=(_write(tmp_path / "hashes.txt", [
            str(S.pair_hash("http://ok.test/p.jpg", "a pair")),
            hashlib.sha256(b"http://ok.test/q.jpg").hexdigest(),
            "not-a-hash",
        ]),),
    )
    bl = Blocklist.from_config(cfg)
    assert [(i.name, i.kind, i.entries, i.invalid) for i in bl.lists] == [
        ("urls.txt", "url", 1, 0), ("domains.txt", "domain", 2, 0), ("hashes.txt", "hash", 2, 1)]
    assert bl.match("http://a.test/x.jpg") == "urls.txt"
    assert bl.match("http://a.test/X.jpg") is None
    assert bl.match("https://cdn.img.evil.test/a.png") == "domains.txt"
    assert bl.match("http://notevil.test/a.png") is None
    assert bl.match("http://1.2.3.4/a.png") == "domains.txt"
    assert bl.match("http://ok.test/p.jpg", S.pair_hash("http://ok.test/p.jpg", "a pair")) == "hashes.txt"
    assert bl.match("http://ok.test/p.jpg", S.pair_hash("http://ok.test/p.jpg", "another text")) is None
    assert bl.match("http://ok.test/q.jpg") == "hashes.txt"
    # a batch: live rows are dropped with the list's name, dropped rows keep their reason, order kept
    urls = ["http://ok.test/1.jpg", "http://evil.test/2.jpg", "http://a.test/x.jpg", "http://ok.test/p.jpg",
            "http://evil.test/3.jpg"]
    texts = ["t", "t", "t", "a pair", "t"]
    batch = {S.URL: np.array(urls, dtype=object), S.ALT_TEXT: np.array(texts, dtype=object),
             S.HASH: S.pair_hashes(urls, texts),
             S.DROP_REASON: np.array(["", "", "", "", "langid:x"], dtype=object)}
    out = bl(batch)
    assert list(out[S.DROP_REASON]) == ["", "blocklist:domains.txt", "blocklist:urls.txt", "blocklist:hashes.txt",
                                        "langid:x"]
    assert list(batch[S.DROP_REASON]) == ["", "", "", "", "langid:x"]  # the input is not modified
    c = bl.counters(out)
    assert c.kept == 1 and dict(c.dropped_by_reason) == {"domains.txt": 1, "urls.txt": 1, "hashes.txt": 1}


def test_first_list_wins_and_names_are_unique(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = _write(tmp_path / "a" / "list.txt", ["http://x.test/1.jpg"])
    two = _write(tmp_path / "b" / "list.txt", ["http://x.test/1.jpg", "http://x.test/2.jpg"])
    bl = Blocklist.from_config(BlocklistConfig(url_files=(one, two)))
    assert [i.name for i in bl.lists] == ["list.txt", "list.txt#2"]
    assert bl.match("http://x.test/1.jpg") == "list.txt" and bl.match("http://x.test/2.jpg") == "list.txt#2"


def test_missing_list_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.txt"):
        Blocklist.from_config(BlocklistConfig(domain_files=(str(tmp_path / "nope.txt"),)))


def test_cache_reloads_a_changed_file(tmp_path):
    path = tmp_path / "urls.txt"
    _write(path, ["http://x.test/1.jpg"])
    cfg = BlocklistConfig(url_files=(str(path),))
    first = cached(cfg)
    assert cached(cfg) is first
    _write(path, ["http://x.test/1.jpg", "http://x.test/22.jpg"])
    again = cached(cfg)
    assert again is not first and again.match("http://x.test/22.jpg") == "urls.txt"


def test_config_section():
    c = load_config(None, ["blocklist.url_files=[a.txt]", "blocklist.hash_files=[h.txt.gz]"])
    assert c.blocklist.url_files == ("a.txt",) and c.blocklist.hash_files == ("h.txt.gz",)
    with pytest.raises(ConfigError):
        load_config(None, ["blocklist.urls=[a.txt]"])


# --------------------------------------------------------------------------- through the pipeline
MIRROR = "img.mirror.demo.test"


@pytest.fixture(scope="module")
def blocked_run(ray_session, tmp_path_factory):
    from laionbuild.runner.run import run as run_pipeline
    from laionbuild.demo.image_server import LoopbackServer
    from laionbuild.demo.run import SMOKE_CONFIG
    from laionbuild.demo.sample_warc import build_demo_sample

    root = tmp_path_factory.mktemp("blocklist")
    with LoopbackServer("127.0.0.1") as server:
        port = server.port
        sample = build_demo_sample(str(root / "a"), image_base=f"http://images.demo.test:{port}")
        # the same pages with their images on a second host, blocked as a domain
        mirror = build_demo_sample(str(root / "b"), image_base=f"http://{MIRROR}:{port}")
        sample.register(server)
        url_count = Counter(e.url for e in sample.expectations)
        kept = {s: [e for e in sample.kept(s) if url_count[e.url] == 1] for s in S.SUBSETS}
        by_url = [kept["en"][0], kept["multi"][0]]
        by_pair = kept["nolang"][0]
        by_sha = kept["en"][1]
        later = kept["multi"][1]
        a_url = by_url[0].url
        shouting = a_url.replace("http://images.demo.test", "HTTP://Images.Demo.Test") + "#top"
        lists = {
            "url": _write(root / "urls.txt", ["# some kept images", shouting, by_url[1].url]),
            "domain": _write(root / "domains.txt.gz", ["mirror.demo.test"], gz=True),
            "hash": _write(root / "hashes.txt", [str(S.pair_hash(by_pair.url, by_pair.alt_text)),
                                                  hashlib.sha256(by_sha.url.encode()).hexdigest()]),
        }
        out = root / "out"
        overrides = [
            f"run.inputs={json.dumps(sample.warc_paths + mirror.warc_paths)}",
            f"run.output={out}", "run.progress=false",
            f"fetch.host_map={{images.demo.test: '127.0.0.1', {MIRROR}: '127.0.0.1'}}",
            "fetch.allow_addresses=['127.0.0.1']",
            f"blocklist.url_files=[{lists['url']}]",
            f"blocklist.domain_files=[{lists['domain']}]",
            f"blocklist.hash_files=[{lists['hash']}]",
        ]
        cfg = load_config(SMOKE_CONFIG, overrides)
        result = run_pipeline(cfg)
        requests = {_path(e.url): server.request_count(_path(e.url)) for e in (*by_url, by_pair, by_sha, later)}
        mirror_hosts = [h for e in sample.expectations if e.url.startswith("http")
                        for h in server.request_headers(_path(e.url)) if h.get("Host", "").startswith(MIRROR)]
        served = server.request_count()
    stats_first = json.loads((out / "stats.json").read_text())
    rows_first = _pairs(out)
    # the URL list grows after the run: a rerun into the same folder (every input already
    # complete, so nothing is fetched again) publishes without the newly listed row
    _write(root / "urls.txt", ["# some kept images", shouting, by_url[1].url, later.url])
    rerun = run_pipeline(cfg)
    yield {
        "result": result, "rerun": rerun, "out": out, "sample": sample, "mirror": mirror, "requests": requests,
        "mirror_hosts": mirror_hosts, "by_url": by_url, "by_pair": by_pair, "by_sha": by_sha, "later": later,
        "stats_first": stats_first, "rows_first": rows_first, "served": served,
    }


def _path(url: str) -> str:
    return urlsplit(url).path


def _pairs(out: Path) -> set[tuple[str, str]]:
    got = set()
    for subset in S.SUBSETS:
        for f in sorted((out / subset).glob("*.parquet")):
            t = pq.read_table(f, columns=["URL", "TEXT"])
            got |= set(zip(t.column("URL").to_pylist(), t.column("TEXT").to_pylist()))
    return got


@pytest.mark.ray
def test_block_listed_urls_get_no_request(blocked_run):
    r = blocked_run
    assert r["result"].exit_code == 0
    for e in (*r["by_url"], r["by_pair"], r["by_sha"]):
        assert r["requests"][_path(e.url)] == 0, e.url
    assert r["requests"][_path(r["later"].url)] == 1  # listed only after the run
    assert r["served"] > 20 and r["mirror_hosts"] == []  # nothing at all was asked of the blocked domain


@pytest.mark.ray
def test_block_listed_rows_absent_and_counted(blocked_run):
    r = blocked_run
    sample = r["sample"]
    blocked = {(e.url, e.alt_text) for e in (*r["by_url"], r["by_pair"], r["by_sha"])}
    expected = {(e.url, e.alt_text) for e in sample.kept()}
    assert r["rows_first"] == expected - blocked
    stats = r["stats_first"]
    st = stats["stages"]
    dropped = st["blocklist"]["dropped_by_reason"]
    # the mirror sample has exactly the same candidates, de-duplicated (before download) the same way
    mirror_candidates = st["dedup"]["kept"] // 2
    assert dropped == {"urls.txt": 2, "hashes.txt": 2, "domains.txt": mirror_candidates}
    assert stats["kept_total"] == len(expected) - 4
    downstream = sum(st[s]["dropped"] for s in ("fetch", "clip", "dedup", "blocklist"))
    assert st["extract"]["kept"] == stats["kept_total"] + downstream
    prov = json.loads((r["out"] / "provenance.json").read_text())
    assert [(b["name"], b["kind"]) for b in prov["blocklists"]] == [
        ("urls.txt", "url"), ("domains.txt", "domain"), ("hashes.txt", "hash")]
    assert all(len(b["sha256"]) == 64 for b in prov["blocklists"])


@pytest.mark.ray
def test_updated_list_applies_on_rerun(blocked_run):
    r = blocked_run
    later = (r["later"].url, r["later"].alt_text)
    assert later in r["rows_first"]
    after = _pairs(r["out"])
    assert after == r["rows_first"] - {later}
    stats = json.loads((r["out"] / "stats.json").read_text())
    assert stats["stages"]["blocklist"]["dropped_by_reason"]["urls.txt"] == 3
    assert stats["kept_total"] == r["stats_first"]["kept_total"] - 1
    assert stats["inputs_skipped_as_complete"] == len(r["sample"].warc_paths) * 2
