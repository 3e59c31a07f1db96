"""Model files: list, pull from a loopback Hugging Face hub and file server, verify, resume, offline, per-node copy.

Everything is served from 127.0.0.1 by a server these tests start, laid out like the
Hugging Face hub (``/{repo}/resolve/{revision}/{file}`` with ``X-Repo-Commit`` and
``ETag``, the paths huggingface_hub's ``hf_hub_download`` requests) and like a plain
file server (``/files/<name>``, with HTTP Range support). The model files are the
tiny CLIP packaged in laionbuild/assets and NSFW heads built here.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import threading
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

from helpers.http import LoopbackHTTP
from laionbuild import cli
from laionbuild.config import config_from_dict
from laionbuild.errors import ModelMissingError
from laionbuild.models import (
    ModelDownloadError,
    download_url,
    ensure_models,
    local_config,
    localize_files,
    model_provenance,
    pull,
    read_lock,
    required_models,
)
from laionbuild.models.convert import read_tf_checkpoint
from laionbuild.models.download import partial_path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "laionbuild" / "assets"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HF_REPO = "laionbuild-test/tiny-clip-shapes"
TINY_CLIP = {"models": {s: {"arch": "tiny-clip-shapes", "pretrained": "builtin:tiny-clip-shapes.pt", "text_model": ""}
                        for s in ("en", "multi", "nolang")}}


# --------------------------------------------------------------------------- loopback servers
class ModelServer:
    """Hub routes ``/{repo}/resolve/{rev}/{file}`` and plain files ``/files/{name}``."""

    def __init__(self):
        self.hub: dict[tuple[str, str], bytes] = {}
        self.files: dict[str, bytes] = {}
        #: path -> bytes served instead of the real ones (a corrupted transfer)
        self.corrupt: dict[str, bytes] = {}
        #: paths whose next full GET is cut after half the body
        self.drop_once: set[str] = set()
        self.log: list[tuple[str, str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                path = self.path.split("?", 1)[0]
                rng = self.headers.get("Range", "")
                server.log.append((self.command, path, rng))
                data, hub_etag = None, None
                if path.startswith("/files/"):
                    data = server.files.get(path[len("/files/"):])
                elif "/resolve/" in path:
                    repo, rest = path[1:].split("/resolve/", 1)
                    filename = rest.split("/", 1)[1]
                    data = server.hub.get((repo, filename))
                    if data is not None:
                        hub_etag = hashlib.sha256(data).hexdigest()
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.corrupt.get(path, data)
                start = 0
                if rng.startswith("bytes="):
                    start = int(rng[len("bytes="):].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                if hub_etag:
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("ETag", f'"{hub_etag}"')
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                if path in server.drop_once and not rng:
                    server.drop_once.discard(path)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.server = LoopbackHTTP(Handler)
        self.url = self.server.url

    def ranges(self, path: str) -> list[str]:
        return [r for m, p, r in self.log if p == path and m == "GET"]


@pytest.fixture
def server(monkeypatch):
    srv = ModelServer()
    srv.server.start()
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield srv
    srv.server.stop()


def _serve_tiny_clip(srv: ModelServer) -> None:
    srv.hub[(HF_REPO, "open_clip_config.json")] = (ASSETS / "tiny-clip-shapes.json").read_bytes()
    srv.hub[(HF_REPO, "open_clip_pytorch_model.bin")] = (ASSETS / "tiny-clip-shapes.pt").read_bytes()


def _config(tmp_path: Path, **models) -> object:
    clip = {s: {"arch": f"hf-hub:{HF_REPO}", "pretrained": "", "text_model": ""} for s in ("en", "multi", "nolang")}
    return config_from_dict({
        "clip": {"models": clip, "device": "cpu"},
        "resize": {"image_size": 32},
        "models": {"cache": str(tmp_path / "cache"), "download_retries": 2, **models},
    })


# --------------------------------------------------------------------------- list
def test_models_list_cli_for_both_shipped_configs(capsys):
    assert cli.main(["models", "list", "-c", str(REPO / "configs" / "smoke.yaml"), "--json"]) == 0
    smoke = json.loads(capsys.readouterr().out)
    assert {m["kind"] for m in smoke["models"]} == {"langid", "clip-config", "clip-weights", "text-model"}
    assert all(m["present"] for m in smoke["models"])
    assert cli.main(["models", "list", "-c", str(REPO / "configs" / "laion5b.yaml"),
                     "--cache", "/nonexistent/laionbuild-cache"]) == 0
    table = capsys.readouterr().out
    assert "timm/vit_base_patch32_clip_224.openai" in table
    # LAION-5B's multilingual text tower for multi / nolang; CLD3 needs no model file
    assert "sentence-transformers/clip-ViT-B-32-multilingual-v1" in table and "missing" in table
    assert "lid.176" not in table
    assert "/nonexistent/laionbuild-cache/hub/models--timm--vit_base_patch32_clip_224.openai" in table


def test_requirements_name_released_safety_models_and_text_model(tmp_path):
    cfg = config_from_dict({
        "langid": {"model_path": "release:fasttext-lid.176"},
        "safety": {"punsafe_heads": {"en": "release:laion-nsfw-vit-b-32"}, "watermark_model": "release:laion-watermark-v1"},
        "models": {"cache": str(tmp_path / "c")},
    })
    reqs = {r.id: r for r in required_models(cfg)}
    assert reqs["release:fasttext-lid.176"].path == str(tmp_path / "c" / "releases" / "fasttext-lid.176" / "lid.176.bin")
    assert reqs["release:laion-nsfw-vit-b-32"].kind == "punsafe"
    assert "LAION-AI/CLIP-based-NSFW-Detector" in reqs["release:laion-nsfw-vit-b-32"].source
    assert "LAION-5B-WatermarkDetection" in reqs["release:laion-watermark-v1"].source
    assert not any(r.present for r in reqs.values() if r.id.startswith("release:"))
    local = local_config(cfg)
    assert local.safety.watermark_model == str(tmp_path / "c" / "releases" / "laion-watermark-v1" / "laion-watermark-v1.pt")
    assert local.clip.models["en"].cache_dir == str(tmp_path / "c" / "hub")


# --------------------------------------------------------------------------- pull from the hub
def test_pull_puts_hub_files_where_the_offline_loader_finds_them(server, tmp_path, capsys):
    from laionbuild.stages.clip_score import check_models_available, load_clip

    _serve_tiny_clip(server)
    cfg = _config(tmp_path)
    with pytest.raises(ModelMissingError):
        check_models_available(local_config(cfg).clip)
    records = pull(cfg, progress=False)
    files = {r["file"] for r in records}
    snap = f"hub/models--laionbuild-test--tiny-clip-shapes/snapshots/{COMMIT}"
    assert {f"{snap}/open_clip_config.json", f"{snap}/open_clip_pytorch_model.bin"} <= files
    weights = (ASSETS / "tiny-clip-shapes.pt").read_bytes()
    lock = read_lock(tmp_path / "cache")["files"]
    assert lock[f"{snap}/open_clip_pytorch_model.bin"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert lock[f"{snap}/open_clip_pytorch_model.bin"]["size"] == len(weights)
    assert lock[f"{snap}/open_clip_pytorch_model.bin"]["source"].startswith(f"{server.url}/{HF_REPO}/resolve/{COMMIT}/")
    assert all(r.present for r in required_models(cfg))
    local = local_config(cfg)
    check_models_available(local.clip)  # the stage's own offline lookup finds the pulled files
    loaded = load_clip(local.clip.models["en"], "cpu")
    assert loaded is not None
    prov = model_provenance(cfg)
    entry = next(m for m in prov["models"] if m["kind"] == "clip-weights")
    assert entry["sha256"] == hashlib.sha256(weights).hexdigest()
    # a second pull finds everything and fetches nothing
    n_get = len([x for x in server.log if x[0] == "GET"])
    assert pull(cfg, progress=False) == []
    assert len([x for x in server.log if x[0] == "GET"]) == n_get
    # the CLI says the same
    assert cli.main(["models", "pull", "-c", _write_cfg(tmp_path), "--no-progress"]) == 0
    assert "0 file(s) fetched" in capsys.readouterr().out


def _write_cfg(tmp_path: Path) -> str:
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "clip": {"models": {s: {"arch": f"hf-hub:{HF_REPO}", "pretrained": "", "text_model": ""}
                            for s in ("en", "multi", "nolang")}},
        "resize": {"image_size": 32},
        "models": {"cache": str(tmp_path / "cache")},
    }))
    return str(path)


def test_hub_checksum_mismatch_is_an_error_and_leaves_nothing(server, tmp_path):
    _serve_tiny_clip(server)
    server.corrupt[f"/{HF_REPO}/resolve/main/open_clip_pytorch_model.bin"] = b"x" * len(
        server.hub[(HF_REPO, "open_clip_pytorch_model.bin")])
    cfg = _config(tmp_path)
    with pytest.raises(ModelDownloadError, match="checksum mismatch"):
        pull(cfg, progress=False)
    hub = tmp_path / "cache" / "hub" / "models--laionbuild-test--tiny-clip-shapes"
    left = [p.name for p in hub.rglob("*") if p.is_file() or p.is_symlink()]
    assert "open_clip_pytorch_model.bin" not in left
    assert not [n for n in left if n.endswith(".incomplete")]
    assert not [r for r in required_models(cfg) if r.kind == "clip-weights" and r.present]


# --------------------------------------------------------------------------- plain URL downloads
def test_url_checksum_failure_leaves_nothing_in_the_cache(server, tmp_path):
    server.files["lid.176.bin"] = b"fasttext" * 1000
    dest = tmp_path / "cache" / "lid.176.bin"
    with pytest.raises(ModelDownloadError, match="checksum mismatch"):
        download_url(f"{server.url}/files/lid.176.bin", dest, expected_sha256="0" * 64, progress=False)
    assert not dest.exists() and not partial_path(dest).exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    data = bytes(range(256)) * 4096  # 1 MiB
    server.files["watermark_model_v1.pt"] = data
    server.drop_once.add("/files/watermark_model_v1.pt")
    url = f"{server.url}/files/watermark_model_v1.pt"
    dest = tmp_path / "cache" / "watermark_model_v1.pt"
    with pytest.raises(ModelDownloadError):
        download_url(url, dest, attempts=1, progress=False, backoff_s=0)
    assert not dest.exists()
    got = partial_path(dest).stat().st_size
    assert 0 < got < len(data)
    done = download_url(url, dest, attempts=1, progress=False, backoff_s=0)
    assert dest.read_bytes() == data
    assert done.resumed_from == got and done.sha256 == hashlib.sha256(data).hexdigest()
    assert server.ranges("/files/watermark_model_v1.pt") == ["", f"bytes={got}-"]
    assert not partial_path(dest).exists()


def test_interrupted_download_is_retried_within_one_pull(server, tmp_path):
    data = b"\x00lid" * 50_000
    server.files["lid.176.bin"] = data
    server.drop_once.add("/files/lid.176.bin")
    cfg = config_from_dict({"langid": {"model_path": "release:fasttext-lid.176"}, "clip": TINY_CLIP,
                            "models": {"cache": str(tmp_path / "cache"), "download_retries": 2,
                                       "sources": {"fasttext-lid.176": f"{server.url}/files/lid.176.bin"}}})
    (rec,) = pull(cfg, progress=False)
    assert rec["file"] == "releases/fasttext-lid.176/lid.176.bin"
    assert (tmp_path / "cache" / rec["file"]).read_bytes() == data
    assert server.ranges("/files/lid.176.bin")[1].startswith("bytes=")
    assert local_config(cfg).langid.model_path == str(tmp_path / "cache" / rec["file"])


# --------------------------------------------------------------------------- LAION's NSFW heads
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes | int) -> bytes:
    key = _varint((num << 3) | wire)
    if wire == 0:
        return key + _varint(int(payload))
    return key + _varint(len(payload)) + payload


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + struct.pack("<II", 0, 1)


def _tf_checkpoint(tensors: dict[str, np.ndarray]) -> tuple[bytes, bytes]:
    """A TensorFlow checkpoint (index table + one data shard), written from the format's description."""
    data, entries = bytearray(), [(b"", _field(1, 0, 1))]
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        dtype = {np.dtype(np.float32): 1, np.dtype(np.int64): 9}[arr.dtype]
        shape = b"".join(_field(2, 2, _field(1, 0, d)) for d in arr.shape)
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        entry = _field(1, 0, dtype) + _field(2, 2, shape) + _field(4, 0, len(data)) + _field(5, 0, len(raw))
        entries.append((name.encode(), entry))
        data += raw
    entries.append((b"_CHECKPOINTABLE_OBJECT_GRAPH", _field(1, 0, 7) + _field(5, 0, 0)))
    entries.sort()
    table = bytearray()
    data_block = _block(entries)
    table += data_block + b"\x00\x00\x00\x00\x00"
    meta_off = len(table)
    meta_block = _block([])
    table += meta_block + b"\x00\x00\x00\x00\x00"
    idx_off = len(table)
    idx_block = _block([(entries[-1][0], _varint(0) + _varint(len(data_block)))])
    table += idx_block + b"\x00\x00\x00\x00\x00"
    handles = _varint(meta_off) + _varint(len(meta_block)) + _varint(idx_off) + _varint(len(idx_block))
    table += handles.ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
    return bytes(table), bytes(data)


def _nsfw_layers(rng, dims=(512, 32, 32, 1)):
    kernels = [rng.normal(0, 0.2, (a, b)).astype(np.float32) for a, b in zip(dims[:-1], dims[1:])]
    biases = [rng.normal(0, 0.1, b).astype(np.float32) for b in dims[1:]]
    mean = rng.normal(0, 0.02, dims[0]).astype(np.float32)
    var = rng.uniform(0.0005, 0.002, dims[0]).astype(np.float32)
    return kernels, biases, mean, var


def _numpy_head(x, kernels, biases, mean, var):
    h = (x - mean) / np.sqrt(np.maximum(var, 1e-7))
    for i, (k, b) in enumerate(zip(kernels, biases)):
        h = h @ k + b
        if i < len(kernels) - 1:
            h = np.maximum(h, 0)
    return 1 / (1 + np.exp(-h[:, 0]))


def _keras_zip(kernels, biases, mean, var) -> bytes:
    t = {"layer_with_weights-0/mean/.ATTRIBUTES/VARIABLE_VALUE": mean.reshape(1, -1),
         "layer_with_weights-0/variance/.ATTRIBUTES/VARIABLE_VALUE": var.reshape(1, -1),
         "layer_with_weights-0/count/.ATTRIBUTES/VARIABLE_VALUE": np.array(1000, dtype=np.int64)}
    for i, (k, b) in enumerate(zip(kernels, biases), start=1):
        t[f"layer_with_weights-{i}/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = k
        t[f"layer_with_weights-{i}/bias/.ATTRIBUTES/VARIABLE_VALUE"] = b
        t[f"layer_with_weights-{i}/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"] = np.zeros_like(k)
    index, data = _tf_checkpoint(t)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("clip_autokeras_nsfw_b32/saved_model.pb", b"")
        zf.writestr("clip_autokeras_nsfw_b32/variables/variables.index", index)
        zf.writestr("clip_autokeras_nsfw_b32/variables/variables.data-00000-of-00001", data)
    return buf.getvalue()


def test_tf_checkpoint_reader_reads_what_the_format_describes():
    rng = np.random.default_rng(0)
    t = {"a/kernel": rng.normal(size=(3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int64)}
    index, data = _tf_checkpoint(t)
    got = read_tf_checkpoint(index, data)
    assert set(got) == {"a/kernel", "b"}
    np.testing.assert_array_equal(got["a/kernel"], t["a/kernel"])
    np.testing.assert_array_equal(got["b"], t["b"])


@pytest.mark.parametrize("form", ["keras-zip", "torch-port"])
def test_pull_converts_laions_nsfw_head(server, tmp_path, form):
    import torch

    from laionbuild.stages.safety import load_punsafe_head

    rng = np.random.default_rng(1)
    kernels, biases, mean, var = _nsfw_layers(rng)
    if form == "keras-zip":
        name, blob = "clip_autokeras_nsfw_b32.zip", _keras_zip(kernels, biases, mean, var)
    else:
        state = {"norm.mean": torch.tensor(mean), "norm.variance": torch.tensor(var)}
        for i, (k, b) in enumerate(zip(kernels, biases), start=1):
            state[f"linear_{i}.weight"] = torch.tensor(k.T.copy())
            state[f"linear_{i}.bias"] = torch.tensor(b)
        buf = io.BytesIO()
        torch.save(state, buf)
        name, blob = "clip_ViT-B-32_openai_binary_nsfw_head.pth", buf.getvalue()
    server.files[name] = blob
    cfg = config_from_dict({
        "safety": {"punsafe_heads": {"en": "release:laion-nsfw-vit-b-32"}},
        "clip": TINY_CLIP,
        "models": {"cache": str(tmp_path / "cache"), "sources": {"laion-nsfw-vit-b-32": f"{server.url}/files/{name}"}},
    })
    records = pull(cfg, progress=False)
    assert [r["file"] for r in records] == [f"releases/laion-nsfw-vit-b-32/source/{name}",
                                           "releases/laion-nsfw-vit-b-32/laion-nsfw-vit-b-32.pt"]
    assert records[0]["sha256"] == hashlib.sha256(blob).hexdigest()
    head = load_punsafe_head(local_config(cfg).safety.punsafe_heads["en"])
    x = rng.normal(size=(6, 512)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = head.probability(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, _numpy_head(x, kernels, biases, mean, var), rtol=1e-4, atol=1e-5)
    assert head.clip_model == "ViT-B-32/openai"


# --------------------------------------------------------------------------- offline
def test_offline_refuses_and_names_the_files(server, tmp_path, monkeypatch):
    _serve_tiny_clip(server)
    cfg = _config(tmp_path)
    with pytest.raises(ModelMissingError, match="open_clip_config.json.*downloads are disabled|downloads are disabled"):
        ensure_models(cfg, offline=True, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelMissingError, match="models--laionbuild-test--tiny-clip-shapes"):
        ensure_models(cfg, offline=False, progress=False)
    assert not [x for x in server.log if x[0] == "GET"]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    report = ensure_models(cfg, offline=False, progress=False)
    assert len(report.pulled) >= 2
    assert report.config.clip.models["en"].cache_dir == str(tmp_path / "cache" / "hub")
    # everything present now: offline is fine
    assert ensure_models(cfg, offline=True, progress=False).pulled == []


def test_run_offline_flag_sets_models_offline():
    args = cli.build_parser().parse_args(["run", "-c", "x.yaml", "--offline"])
    assert "models.offline=true" in cli._overrides(args)


# --------------------------------------------------------------------------- cluster cache
@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_cache_is_copied_to_each_node_once(server, tmp_path, scheme):
    from laionbuild.stages.clip_score import check_models_available

    _serve_tiny_clip(server)
    cache = f"memory://laionbuild-test-{uuid.uuid4().hex}" if scheme == "memory" else (tmp_path / "shared").as_uri()
    driver = _config(tmp_path, cache=cache, local_dir=str(tmp_path / "driver"))
    pulled = pull(driver, progress=False)
    assert pulled and read_lock(cache)["files"]  # uploaded, with its record
    node = _config(tmp_path, cache=cache, local_dir=str(tmp_path / "node"))
    assert not any(r.present for r in required_models(node) if r.kind == "clip-weights")
    results = []

    def actor():
        results.append(localize_files(node))

    threads = [threading.Thread(target=actor) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    copied = [f for r in results for f in r["copied"]]
    assert len(copied) == len(set(copied)) == len({p["file"] for p in pulled})
    assert sum(len(r["reused"]) for r in results) == 3 * len(copied)
    assert localize_files(node)["copied"] == []
    local = local_config(node)
    assert local.clip.models["en"].cache_dir == str(tmp_path / "node" / "hub")
    check_models_available(local.clip)
    weights = (ASSETS / "tiny-clip-shapes.pt").read_bytes()
    found = list((tmp_path / "node" / "hub").rglob("open_clip_pytorch_model.bin"))
    assert len(found) == 1 and found[0].read_bytes() == weights


# --------------------------------------------------------------------------- a separate text model
def test_sentence_transformers_text_model_is_listed_and_pulled(server, tmp_path):
    """``clip.models.<subset>.text_model`` (a Hugging Face id of a sentence-transformers model)."""
    import dataclasses

    from laionbuild.config import ClipModelConfig

    @dataclasses.dataclass(frozen=True)
    class WithTextModel(ClipModelConfig):
        text_model: str = ""

    repo = "laionbuild-test/st-text"
    st = {
        "modules.json": json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                                    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]).encode(),
        "config.json": b"{}", "model.safetensors": b"w" * 1000, "tokenizer.json": b"{}", "tokenizer_config.json": b"{}",
        "1_Pooling/config.json": b"{}", "2_Dense/config.json": b"{}", "2_Dense/pytorch_model.bin": b"d" * 100,
    }
    for name, data in st.items():
        server.hub[(repo, name)] = data
    cfg = config_from_dict({"clip": TINY_CLIP, "models": {"cache": str(tmp_path / "cache")}})
    multi = WithTextModel(arch="tiny-clip-shapes", pretrained="builtin:tiny-clip-shapes.pt", text_model=repo)
    cfg = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, models={**cfg.clip.models, "multi": multi}))
    (req,) = [r for r in required_models(cfg) if r.kind == "text-model"]
    assert not req.present and req.used_by == ["clip.models.multi.text_model"]
    records = pull(cfg, progress=False)
    snap = tmp_path / "cache" / "hub" / "models--laionbuild-test--st-text" / "snapshots" / COMMIT
    for name, data in st.items():
        assert (snap / name).read_bytes() == data
    assert {r["file"] for r in records} >= {f"hub/models--laionbuild-test--st-text/snapshots/{COMMIT}/{n}" for n in st}
    (req,) = [r for r in required_models(cfg) if r.kind == "text-model"]
    assert req.present and req.path == str(snap)


@pytest.mark.slow
def test_pull_converts_laions_watermark_detector(server, tmp_path):
    timm = pytest.importorskip("timm")
    import torch
    from torch import nn

    from laionbuild.stages import safety as sf

    torch.manual_seed(0)
    ref = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    ref.classifier = nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(0.3), nn.Linear(625, 256),
                                   nn.ReLU(), nn.Linear(256, 2))
    ref.eval()
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    server.files["watermark_model_v1.pt"] = buf.getvalue()
    cfg = config_from_dict({"clip": TINY_CLIP, "safety": {"watermark_model": "release:laion-watermark-v1"},
                            "models": {"cache": str(tmp_path / "cache"),
                                       "sources": {"laion-watermark-v1": f"{server.url}/files/watermark_model_v1.pt"}}})
    records = pull(cfg, progress=False)
    assert records[-1]["file"] == "releases/laion-watermark-v1/laion-watermark-v1.pt"
    model = sf.load_watermark_model(local_config(cfg).safety.watermark_model)
    assert model.input_size == 256 and model.positive_index == 0
    images = np.random.RandomState(0).randint(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    x = sf.preprocess_images(torch.from_numpy(images), 96, sf.IMAGENET_MEAN, sf.IMAGENET_STD)
    with torch.no_grad():
        want = torch.softmax(ref(x), dim=1)[:, 0].numpy()
        got = model.probability(model.net(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    prov = {m["kind"]: m for m in model_provenance(cfg)["models"]}
    assert prov["watermark"]["sha256"] == records[-1]["sha256"]


def test_tokenizer_is_pulled_with_its_companion_files(server, tmp_path):
    """An xlm-roberta style text tower: config.json + tokenizer.json, and tokenizer_config.json when there."""
    tok = "laionbuild-test/xlmr"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        server.hub[(tok, name)] = b'{"name": "%s"}' % name.encode()
    model_cfg = json.loads((ASSETS / "tiny-clip-shapes.json").read_text())
    model_cfg["model_cfg"]["text_cfg"] = {"hf_model_name": tok, "hf_tokenizer_name": tok}
    arch = tmp_path / "tiny-hf-text.json"
    arch.write_text(json.dumps(model_cfg))
    cfg = config_from_dict({"clip": {"models": {s: {"arch": str(arch), "pretrained": "builtin:tiny-clip-shapes.pt",
                                                    "text_model": ""}
                                                for s in ("en", "multi", "nolang")}},
                            "models": {"cache": str(tmp_path / "cache")}})
    missing = [r for r in required_models(cfg) if not r.present]
    assert {r.kind for r in missing} == {"tokenizer"} and len(missing) == 2
    pull(cfg, progress=False)
    snap = tmp_path / "cache" / "hub" / "models--laionbuild-test--xlmr" / "snapshots" / COMMIT
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert all(r.present for r in required_models(cfg))


def test_released_model_reaches_a_node_through_a_url_cache(server, tmp_path):
    """Only the converted file is copied to nodes, whether the actor gets the original or the local config."""
    import torch

    rng = np.random.default_rng(2)
    kernels, biases, mean, var = _nsfw_layers(rng)
    state = {"norm.mean": torch.tensor(mean), "norm.variance": torch.tensor(var)}
    for i, (k, b) in enumerate(zip(kernels, biases), start=1):
        state[f"linear_{i}.weight"] = torch.tensor(k.T.copy())
        state[f"linear_{i}.bias"] = torch.tensor(b)
    buf = io.BytesIO()
    torch.save(state, buf)
    server.files["head.pth"] = buf.getvalue()
    cache = f"memory://laionbuild-test-{uuid.uuid4().hex}"

    def cfg_for(node: str):
        return config_from_dict({
            "clip": TINY_CLIP, "safety": {"punsafe_heads": {"en": "release:laion-nsfw-vit-b-32"}},
            "models": {"cache": cache, "local_dir": str(tmp_path / node),
                       "sources": {"laion-nsfw-vit-b-32": f"{server.url}/files/head.pth"}}})

    report = ensure_models(cfg_for("driver"), progress=False)
    assert [r["file"] for r in report.pulled][-1] == "releases/laion-nsfw-vit-b-32/laion-nsfw-vit-b-32.pt"
    node_cfg = local_config(cfg_for("node"))  # what a driver would hand to an actor on another node
    assert localize_files(node_cfg)["copied"] == ["releases/laion-nsfw-vit-b-32/laion-nsfw-vit-b-32.pt"]
    from laionbuild.stages.safety import load_punsafe_head

    assert load_punsafe_head(node_cfg.safety.punsafe_heads["en"]).embed_dim == 512
