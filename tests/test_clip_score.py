"""CLIP scoring stage: exact similarities, routing, thresholds, alignment, offline loading."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from laionbuild import schema as S  # noqa: E402
from laionbuild.config import ClipConfig, ClipModelConfig, SafetyConfig, load_config  # noqa: E402
from laionbuild.errors import ConfigError, ModelMissingError, SetupError  # noqa: E402
from laionbuild.models import clip as mc  # noqa: E402
from laionbuild.stages import clip_score as cs  # noqa: E402
from laionbuild.stages import laion_filter as lf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

#: LAION-5B's filter on (the package default of the safety section)
FILTER_ON = SafetyConfig()

SIZE = 32
TEXTS = [
    "a red circle on white paper",
    "ein blaues Quadrat",
    "un triangle jaune",
    "🔴🔴 ●●",
    "photo of a dog",
    "IMG_2041.jpg",
    "the quick brown fox",
    "un cuadrado verde",
]


def _tiny_cfg(embed_dim: int = 32) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": SIZE, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }


def _make_model(tmp_path, name: str, seed: int, embed_dim: int = 32) -> ClipModelConfig:
    """A random tiny open_clip model saved as config JSON + plain state-dict checkpoint."""
    cfg = _tiny_cfg(embed_dim)
    torch.manual_seed(seed)
    model = mc.build_clip_from_config(cfg)
    # non-trivial positional / projection weights so that texts and images differ clearly
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg_path = tmp_path / f"{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    ckpt = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), ckpt)
    return ClipModelConfig(arch=str(cfg_path), pretrained=str(ckpt))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    return {"a": _make_model(tmp, "lbtest-tiny-a", 1), "b": _make_model(tmp, "lbtest-tiny-b", 2)}


def _clip_cfg(en, multi=None, nolang=None, **kw) -> ClipConfig:
    kw.setdefault("device", "cpu")
    return ClipConfig(models={"en": en, "multi": multi or en, "nolang": nolang or en}, **kw)


def _batch(n: int, seed: int = 0, subsets=None, drops=None) -> dict:
    rng = np.random.RandomState(seed)
    subsets = subsets or [("en", "multi", "nolang")[i % 3] for i in range(n)]
    return {
        S.URL: np.array([f"http://127.0.0.1/{i}.jpg" for i in range(n)], dtype=object),
        S.ALT_TEXT: np.array([TEXTS[i % len(TEXTS)] for i in range(n)], dtype=object),
        S.SUBSET: np.array(subsets, dtype=object),
        S.DROP_REASON: np.array(drops or [""] * n, dtype=object),
        S.IMAGE: rng.randint(0, 256, size=(n, SIZE, SIZE, 3)).astype(np.uint8),
    }


_DIRECT_CACHE: dict = {}


def _direct(mcfg: ClipModelConfig, images: np.ndarray, texts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine similarity computed with open_clip's own factory, transforms and tokenizer."""
    from PIL import Image

    key = mcfg.pretrained
    if key not in _DIRECT_CACHE:
        open_clip.add_model_config(mcfg.arch)
        name = mcfg.arch.rsplit("/", 1)[-1][: -len(".json")]
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=mcfg.pretrained)
        _DIRECT_CACHE[key] = (model.eval(), preprocess, open_clip.get_tokenizer(name))
    model, preprocess, tokenizer = _DIRECT_CACHE[key]
    x = torch.stack([preprocess(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokenizer(list(texts)), normalize=True)
    return (img * txt).sum(-1).numpy(), img.numpy(), txt.numpy()


def test_similarity_equals_open_clip_cosine(models):
    cfg = _clip_cfg(models["a"], thresholds={"en": -1.0, "multi": -1.0, "nolang": -1.0})
    scorer = cs.ClipScorer(cfg, SIZE)
    batch = _batch(10)
    out = scorer(batch)
    ref, _, _ = _direct(models["a"], batch[S.IMAGE], batch[S.ALT_TEXT])
    assert out[S.SIMILARITY].dtype == np.float32
    np.testing.assert_allclose(out[S.SIMILARITY], ref, atol=2e-5)
    assert np.ptp(ref) > 0.01  # the check is not vacuous
    assert list(out[S.DROP_REASON]) == [""] * 10
    assert S.IMAGE not in out
    assert S.IMAGE in cs.ClipScorer(cfg, SIZE, keep_image=True)(batch)


def test_routing_by_subset_loads_each_distinct_model_once(models, monkeypatch):
    calls = []
    real = mc.load_clip
    monkeypatch.setattr(cs, "load_clip", lambda m, d: calls.append(m) or real(m, d))
    cfg = _clip_cfg(models["a"], multi=models["b"], nolang=models["b"], thresholds={"en": -1, "multi": -1, "nolang": -1})
    scorer = cs.ClipScorer(cfg, SIZE)
    assert len(calls) == 2
    batch = _batch(12)
    out = scorer(batch)
    sub = batch[S.SUBSET]
    ref_a, _, _ = _direct(models["a"], batch[S.IMAGE], batch[S.ALT_TEXT])
    ref_b, _, _ = _direct(models["b"], batch[S.IMAGE], batch[S.ALT_TEXT])
    en = sub == "en"
    np.testing.assert_allclose(out[S.SIMILARITY][en], ref_a[en], atol=2e-5)
    np.testing.assert_allclose(out[S.SIMILARITY][~en], ref_b[~en], atol=2e-5)
    assert np.abs(ref_a - ref_b).max() > 0.01


def test_thresholds_come_from_config(models):
    batch = _batch(30, seed=3)
    free = cs.ClipScorer(_clip_cfg(models["a"], thresholds={"en": -1, "multi": -1, "nolang": -1}), SIZE)
    sims = free(batch)[S.SIMILARITY]
    sub = batch[S.SUBSET]
    thr = {s: float(np.median(sims[sub == s])) for s in ("en", "multi", "nolang")}
    thr["nolang"] = -1.0
    out = cs.ClipScorer(_clip_cfg(models["a"], thresholds=thr), SIZE)(batch)
    # the decision reads the row's own similarity (another scorer may differ in the last bits)
    np.testing.assert_allclose(out[S.SIMILARITY], sims, atol=1e-6)  # similarity kept for dropped rows
    own = out[S.SIMILARITY]
    expected = np.array([cs.DROP_BELOW if own[i] < thr[sub[i]] else "" for i in range(30)], dtype=object)
    assert list(out[S.DROP_REASON]) == list(expected)
    assert (out[S.DROP_REASON] == cs.DROP_BELOW).sum() >= 6
    assert not (out[S.DROP_REASON][sub == "nolang"] != "").any()
    c = cs.clip_counters(out)
    assert c.kept == int((expected == "").sum())
    assert c.dropped_by_reason["below_threshold"] == int((expected != "").sum())
    assert c.counts["below_threshold.en"] == int(((expected != "") & (sub == "en")).sum())
    assert c.counts["kept.nolang"] == int((sub == "nolang").sum())


def test_embeddings_aligned_with_rows_under_reordering(models):
    cfg = _clip_cfg(models["a"], save_embeddings=True, batch_size=4, thresholds={"en": -1, "multi": -1, "nolang": -1})
    scorer = cs.ClipScorer(cfg, SIZE, safety=FILTER_ON)
    batch = _batch(11, seed=5)
    out = scorer(batch)
    perm = np.random.RandomState(1).permutation(11)
    out_p = scorer({k: v[perm] for k, v in batch.items()})
    # a row lands in chunks of other rows: the arithmetic may differ in the last bits
    np.testing.assert_allclose(out_p[S.SIMILARITY], out[S.SIMILARITY][perm], atol=1e-5)
    for col in (cs.IMAGE_EMBEDDING, cs.TEXT_EMBEDDING):
        np.testing.assert_allclose(out_p[col].astype(np.float32), out[col][perm].astype(np.float32), atol=2e-3)
    for col in (S.NSFW, S.DROP_REASON):
        np.testing.assert_array_equal(out_p[col], out[col][perm])
    assert out[cs.IMAGE_EMBEDDING].dtype == np.float16 and out[cs.IMAGE_EMBEDDING].shape == (11, 32)
    _, img, txt = _direct(models["a"], batch[S.IMAGE], batch[S.ALT_TEXT])
    np.testing.assert_allclose(out[cs.IMAGE_EMBEDDING].astype(np.float32), img, atol=2e-3)
    np.testing.assert_allclose(out[cs.TEXT_EMBEDDING].astype(np.float32), txt, atol=2e-3)


def test_broken_and_dropped_rows_do_not_shift_rows(models):
    cfg = _clip_cfg(models["a"], thresholds={"en": -1, "multi": -1, "nolang": -1}, save_embeddings=True,
                    batch_size=3)
    scorer = cs.ClipScorer(cfg, SIZE, safety=FILTER_ON)
    n = 9
    drops = ["", "fetch:timeout", "", "langid:empty", "", "", "fetch:http_404", "", ""]
    batch = _batch(n, seed=7, drops=drops)
    batch[S.SUBSET][5] = ""  # an alive row without subset
    for i in (1, 6):
        batch[S.IMAGE][i] = 0
    out = scorer(batch)
    dead = np.array([d != "" for d in drops])
    assert np.isnan(out[S.SIMILARITY][dead]).all()
    assert np.isnan(out[S.SIMILARITY][5])
    assert list(out[S.DROP_REASON][dead]) == [d for d in drops if d]
    assert out[S.DROP_REASON][5] == cs.DROP_NO_SUBSET
    assert (out[cs.IMAGE_EMBEDDING][dead] == 0).all() and (out[S.NSFW][dead] == "").all()
    assert set(out[S.NSFW][~dead & (np.arange(n) != 5)]) <= set(cs.NSFW_TAGS)
    # the alive rows got exactly what they get when scored alone
    keep = np.flatnonzero(~dead & (np.arange(n) != 5))
    alone = scorer({k: v[keep] for k, v in batch.items()})
    np.testing.assert_allclose(out[S.SIMILARITY][keep], alone[S.SIMILARITY], atol=1e-5)
    np.testing.assert_allclose(out[cs.TEXT_EMBEDDING][keep].astype(np.float32),
                               alone[cs.TEXT_EMBEDDING].astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(out[S.NSFW][keep], alone[S.NSFW])
    for col in out:
        assert len(out[col]) == n
    # a fetch stage that handed over an object column with a missing image
    obj = _batch(4, seed=8)
    images = np.empty(4, dtype=object)
    for i in range(4):
        images[i] = obj[S.IMAGE][i]
    images[2] = np.zeros((5, 5, 3), np.uint8)
    obj[S.IMAGE] = images
    res = scorer(obj)
    assert res[S.DROP_REASON][2] == cs.DROP_BAD_IMAGE and np.isnan(res[S.SIMILARITY][2])
    assert not np.isnan(res[S.SIMILARITY][[0, 1, 3]]).any()


def test_laion_filter_through_the_scorer(models):
    """NSFW tags and drops equal LAION's rule applied to open_clip's own embeddings of the prompts."""
    thr = {"en": -1.0, "multi": -1.0, "nolang": 0.0}
    cfg = _clip_cfg(models["a"], thresholds=thr, batch_size=5)
    scorer = cs.ClipScorer(cfg, SIZE, safety=FILTER_ON)
    batch = _batch(24, seed=9)
    batch[S.ALT_TEXT][3] = "my kid at the beach"
    out = scorer(batch)
    sims, img, _ = _direct(models["a"], batch[S.IMAGE], batch[S.ALT_TEXT])
    model, _, tok = _DIRECT_CACHE[models["a"].pretrained]
    f = FILTER_ON.laion_filter
    with torch.no_grad():
        emb = [model.encode_text(tok(list(p)), normalize=True).numpy()
               for p in (f.category_prompts, f.underage_prompts, f.animal_prompts)]
    # LAION's ranking: softmax(100 * cosine), top 2
    probs = [torch.softmax(100 * torch.from_numpy(img @ e.T), dim=1) for e in emb]
    cat, und, ani = (p.topk(2, dim=1).indices.numpy() for p in probs)
    tags, reasons = lf.decide(cat, und, ani[:, 0], batch[S.ALT_TEXT], f)
    passed = ~((batch[S.SUBSET] == "nolang") & (sims < 0.0))
    assert (~passed).any() and passed.any()
    assert list(out[S.NSFW][passed]) == list(tags[passed])
    assert (out[S.NSFW][~passed] == "").all()
    assert list(out[S.DROP_REASON][passed]) == list(reasons[passed])
    assert set(out[S.DROP_REASON][~passed]) == {cs.DROP_BELOW}
    counters = lf.laion_filter_counters(out)
    assert sum(counters.dropped_by_reason.values()) == int((reasons[passed] != "").sum())
    # off: no tag, no drop
    off = cs.ClipScorer(cfg, SIZE, safety=SafetyConfig(laion_filter=type(f)(enabled=False)))(batch)
    assert S.NSFW not in off and not any(str(r).startswith("laion_filter:") for r in off[S.DROP_REASON])


def test_upstream_tokens_give_same_scores(models):
    cfg = _clip_cfg(models["a"], multi=models["b"])
    batch = _batch(9, seed=11)
    scorer = cs.ClipScorer(cfg, SIZE)
    plain = scorer(batch)
    tokd = cs.ClipTokenizer(cfg)(batch)
    assert tokd[cs.CLIP_TOKENS].shape == (9, 16)
    out = scorer(tokd)
    np.testing.assert_allclose(out[S.SIMILARITY], plain[S.SIMILARITY], atol=1e-6)
    assert cs.CLIP_TOKENS not in out


def test_image_size_mismatch_refused(models):
    with pytest.raises(ConfigError, match="resize.image_size"):
        cs.ClipScorer(_clip_cfg(models["a"]), 224)
    assert mc.model_input_size(models["a"]) == SIZE
    assert mc.model_input_size(ClipModelConfig("ViT-B-32", "openai")) == 224
    assert mc.model_input_size(ClipModelConfig("ViT-L-14-336", "openai")) == 336
    assert mc.model_input_size(ClipModelConfig("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k")) == 224
    with pytest.raises(ConfigError):
        mc.model_input_size(ClipModelConfig("no-such-arch", "x"))



@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14", "xlm-roberta-base-ViT-B-32", "no-such-arch"])
def test_open_clip_configs_read_without_importing_it(name):
    import open_clip

    from laionbuild.models.clip import open_clip_model_config

    expected = open_clip.get_model_config(name)
    # the packaged JSON files (what a driver reads) and open_clip's own registry agree
    code = ("import json, sys; from laionbuild.models.clip import open_clip_model_config as f; "
            f"print(json.dumps(f({name!r}))); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert json.loads(out[0]) == (dict(expected) if expected is not None else None)
    assert out[1] == "False"  # no torch import for a config lookup
    assert open_clip_model_config(name) == (dict(expected) if expected is not None else None)


def test_driver_model_checks_do_not_import_torch(tmp_path):
    """ensure_models + preflight on the embedded config: the driver never pays for a torch import."""
    inputs = tmp_path / "in.warc.gz"
    inputs.write_bytes(b"")
    code = (
        "import sys; from laionbuild.config import load_config; from laionbuild.models import ensure_models; "
        "from laionbuild.runner.run import preflight; "
        f"cfg = load_config({str(REPO / 'configs' / 'smoke.yaml')!r}, "
        f"overrides=['run.inputs=[{inputs}]', 'run.output={tmp_path / 'out'}']); "
        "preflight(ensure_models(cfg, offline=True, progress=False).config); "
        "print(sorted(m for m in ('torch', 'open_clip', 'ray') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub access: empty caches, HF offline, and any socket use fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_net(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_net)
    monkeypatch.setattr(socket, "create_connection", no_net)
    monkeypatch.setattr(urllib.request, "urlopen", no_net)
    return tmp_path


def test_missing_checkpoint_file(models, offline):
    m = ClipModelConfig(models["a"].arch, str(offline / "nowhere" / "ckpt.pt"))
    cfg = _clip_cfg(models["a"], multi=m)
    with pytest.raises(ModelMissingError, match="ckpt.pt"):
        mc.check_models_available(cfg)
    with pytest.raises(ModelMissingError, match="ckpt.pt"):
        cs.ClipScorer(cfg, SIZE)


def test_pretrained_tag_not_in_cache(offline):
    m = ClipModelConfig("ViT-B-32", "openai", cache_dir=str(offline / "cache"))
    with pytest.raises(ModelMissingError) as err:
        mc.check_models_available(_clip_cfg(m))
    msg = str(err.value)
    assert "ViT-B-32.pt" in msg and "pretrained=" in msg
    with pytest.raises(ModelMissingError):
        mc.load_clip(m, "cpu")
    # default cache location (no cache_dir) and a laion tag served from the hub
    with pytest.raises(ModelMissingError, match="laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        mc.load_clip(ClipModelConfig("ViT-B-32", "laion2b_s34b_b79k"), "cpu")
    with pytest.raises(ConfigError, match="known"):
        mc.check_model_available(ClipModelConfig("ViT-B-32", "not_a_tag"))


def test_pretrained_tag_found_in_url_cache(models, offline):
    """A tag resolves to the file in open_clip's URL cache without any download."""
    cache = offline / "clipcache"
    cache.mkdir()
    url = open_clip.get_pretrained_cfg("RN50", "openai")["url"]
    fake = cache / url.rsplit("/", 1)[-1]
    fake.write_bytes(b"")
    w = mc._resolve_weights(ClipModelConfig("RN50", "openai", cache_dir=str(cache)), "RN50")
    assert w.path == fake


def test_multilingual_tower_fails_fast_offline(models, offline):
    m = ClipModelConfig("xlm-roberta-base-ViT-B-32", models["a"].pretrained, cache_dir=str(offline / "c"))
    with pytest.raises(ModelMissingError, match="transformers|tokenizer"):
        mc.check_model_available(m)
    m2 = ClipModelConfig("xlm-roberta-base-ViT-B-32", models["a"].pretrained, tokenizer_dir=str(offline / "tok"))
    with pytest.raises(ModelMissingError, match="transformers|tokenizer_dir"):
        mc.load_clip(m2, "cpu")


def test_remapped_tokenizer_unknown_and_padding():
    from open_clip.tokenizer import SimpleTokenizer

    base = SimpleTokenizer()
    used = sorted(set(base.encode("red circle")))
    tm = {"pad_id": 0, "unknown_id": 1, "sot_id": 2, "eot_id": 3 + len(used),
          "source_ids": torch.tensor(used), "target_ids": torch.arange(3, 3 + len(used))}
    tok = mc.RemappedTokenizer(tm, 8)
    ids = tok(["red circle", "red zebra!"])
    assert ids.shape == (2, 8)
    assert ids[0, 0] == 2 and ids[0, 1 + len(base.encode("red circle"))] == tm["eot_id"]
    assert (ids[0, 2 + len(base.encode("red circle")):] == 0).all()
    assert 1 in ids[1].tolist()  # zebra is unknown
    assert int(ids.max()) == tm["eot_id"] and tok.vocab_size == tm["eot_id"] + 1


def test_device_resolution(models):
    assert mc.resolve_device(_clip_cfg(models["a"], device="cpu")) == "cpu"
    if not torch.cuda.is_available():
        assert mc.resolve_device(_clip_cfg(models["a"], device="auto")) == "cpu"
        with pytest.raises(SetupError):
            mc.resolve_device(_clip_cfg(models["a"], device="cuda"))
    assert mc.resolve_precision(_clip_cfg(models["a"]), "cpu") == "fp32"


def test_config_keys_roundtrip():
    cfg = load_config(None, ["clip.models.multi.tokenizer_dir=/x/tok", "clip.compile=true"])
    assert cfg.clip.models["multi"].tokenizer_dir == "/x/tok"
    assert cfg.clip.models["multi"].arch == "ViT-B-32"
    assert cfg.clip.models["multi"].text_model == "sentence-transformers/clip-ViT-B-32-multilingual-v1"
    assert cfg.clip.compile is True
    off = load_config(None, ["safety.laion_filter.enabled=false", "clip.models.en.text_model=/x/st"])
    assert off.safety.laion_filter.enabled is False and off.clip.models["en"].text_model == "/x/st"
    with pytest.raises(ConfigError, match="nsfw_from"):
        load_config(None, ["safety.laion_filter.nsfw_from=40"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["clip.nsfw_tag=true"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision,atol", [("bf16", 3e-2), ("fp16", 5e-3), ("fp32", 1e-3)])
def test_cuda_similarity_matches_open_clip(models, precision, atol):
    cfg = _clip_cfg(models["a"], multi=models["b"], device="cuda", precision=precision,
                    thresholds={"en": -1, "multi": -1, "nolang": -1}, save_embeddings=True)
    scorer = cs.ClipScorer(cfg, SIZE)
    batch = _batch(64, seed=13)
    out = scorer(batch)
    ref_a, _, _ = _direct(models["a"], batch[S.IMAGE], batch[S.ALT_TEXT])
    ref_b, _, _ = _direct(models["b"], batch[S.IMAGE], batch[S.ALT_TEXT])
    ref = np.where(batch[S.SUBSET] == "multi", ref_b, ref_a)  # nolang is scored with the en model here
    np.testing.assert_allclose(out[S.SIMILARITY], ref, atol=atol)
    assert out[cs.IMAGE_EMBEDDING].shape == (64, 32)


def test_local_dir_and_torchscript_checkpoints(models, tmp_path):
    """open_clip_config.json folders and OpenAI-style TorchScript files load to the same model."""
    import shutil
    import warnings

    batch = _batch(6, seed=17)
    ref, _, _ = _direct(models["a"], batch[S.IMAGE], batch[S.ALT_TEXT])
    folder = tmp_path / "local"
    folder.mkdir()
    cfg = json.loads(open(models["a"].arch).read())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    shutil.copy(models["a"].pretrained, folder / "open_clip_pytorch_model.bin")
    local = ClipModelConfig(arch=f"local-dir:{folder}", pretrained="")
    mc.check_model_available(local)
    out = cs.ClipScorer(_clip_cfg(local, thresholds={"en": -1, "multi": -1, "nolang": -1}), SIZE)(batch)
    np.testing.assert_allclose(out[S.SIMILARITY], ref, atol=2e-5)
    empty = tmp_path / "config_only"
    empty.mkdir()
    shutil.copy(folder / "open_clip_config.json", empty)
    with pytest.raises(ModelMissingError, match="no weights file"):
        mc.check_model_available(ClipModelConfig(arch=f"local-dir:{empty}", pretrained=""))
    with pytest.raises(ModelMissingError, match="open_clip_config.json"):
        mc.check_model_available(ClipModelConfig(arch=f"local-dir:{tmp_path / 'nothing'}", pretrained=""))

    model = mc.build_clip_from_config(cfg)
    model.load_state_dict(torch.load(models["a"].pretrained))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model.eval()).save(str(tmp_path / "scripted.pt"))
    except Exception as exc:  # scripting support differs between torch versions
        pytest.skip(f"torch.jit.script unavailable: {exc}")
    scripted = ClipModelConfig(arch=models["a"].arch, pretrained=str(tmp_path / "scripted.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cs.ClipScorer(_clip_cfg(scripted, thresholds={"en": -1, "multi": -1, "nolang": -1}), SIZE)(batch)
    np.testing.assert_allclose(out[S.SIMILARITY], ref, atol=2e-5)
