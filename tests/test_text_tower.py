"""Image tower from one model, text tower from another (sentence-transformers layout, from disk)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from laionbuild import schema as S  # noqa: E402
from laionbuild.config import ClipConfig, ClipModelConfig, SafetyConfig, load_config  # noqa: E402
from laionbuild.errors import ConfigError, ModelMissingError  # noqa: E402
from laionbuild.models import clip as mc  # noqa: E402
from laionbuild.stages import clip_score as cs  # noqa: E402
from laionbuild.models import text_tower as ml  # noqa: E402

SIZE = 32
EMBED = 32
WORDS = ("a red circle blue square green triangle ein rotes quadrat un triangle jaune photo of dog "
         "el perro negro kid child baby teen ##s ##e ##n").split()
TEXTS = ["a red circle", "ein rotes quadrat", "un triangle jaune", "photo of a dog", "el perro negro",
         "blue square", "zzz unknown words", "", "green triangle photo of a red dog"]


def build_tiny_st(folder: Path, seed: int = 0, out_dim: int = EMBED, bias: bool = False) -> Path:
    """A random tiny DistilBERT + mean pooling + Dense (no bias, identity), saved as sentence-transformers
    lays out clip-ViT-B-32-multilingual-v1 (transformer files at the root)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + list("abcdefghijklmnopqrstuvwxyz")
    tok = transformers.DistilBertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))},
                                               do_lower_case=False)
    tok.save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = transformers.DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=64)
    model = transformers.DistilBertModel(config).eval()
    model.save_pretrained(str(folder))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (folder / "2_Dense").mkdir(exist_ok=True)
    (folder / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": 32, "out_features": out_dim, "bias": bias,
        "activation_function": "torch.nn.modules.linear.Identity"}))
    dense = {"linear.weight": torch.randn(out_dim, 32) * 0.2}
    if bias:
        dense["linear.bias"] = torch.randn(out_dim) * 0.1
    torch.save(dense, folder / "2_Dense" / "pytorch_model.bin")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]))
    return folder


def _tiny_clip(folder: Path, seed: int = 1) -> ClipModelConfig:
    cfg = {"embed_dim": EMBED,
           "vision_cfg": {"image_size": SIZE, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    torch.manual_seed(seed)
    model = mc.build_clip_from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    (folder / "tiny.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), folder / "tiny.pt")
    return ClipModelConfig(arch=str(folder / "tiny.json"), pretrained=str(folder / "tiny.pt"))


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("towers")
    image = _tiny_clip(tmp)
    st = build_tiny_st(tmp / "st")
    mixed = ClipModelConfig(image.arch, image.pretrained, text_model=str(st))
    return image, mixed, st


def _cfg(image, mixed, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("thresholds", {"en": -1.0, "multi": -1.0, "nolang": -1.0})
    return ClipConfig(models={"en": image, "multi": mixed, "nolang": mixed}, **kw)


def _batch(n: int, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    return {
        S.ALT_TEXT: np.array([TEXTS[i % len(TEXTS)] for i in range(n)], dtype=object),
        S.SUBSET: np.array([("en", "multi", "nolang")[i % 3] for i in range(n)], dtype=object),
        S.DROP_REASON: np.array([""] * n, dtype=object),
        S.IMAGE: rng.randint(0, 256, size=(n, SIZE, SIZE, 3)).astype(np.uint8),
    }


def _direct_image(image: ClipModelConfig, images: np.ndarray) -> np.ndarray:
    import open_clip
    from PIL import Image

    open_clip.add_model_config(image.arch)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny", pretrained=image.pretrained)
    x = torch.stack([preprocess(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        return model.eval().encode_image(x, normalize=True).numpy()


def _direct_text(st: Path, texts) -> np.ndarray:
    """The text embedding as sentence-transformers computes it when installed, else step by step."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        emb = SentenceTransformer(str(st), device="cpu", local_files_only=True).encode(
            list(texts), convert_to_numpy=True, batch_size=4)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(str(st))
        model = transformers.AutoModel.from_pretrained(str(st)).eval()
        enc = tok(list(texts), padding=True, truncation=True, max_length=24, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        w = torch.load(st / "2_Dense" / "pytorch_model.bin")["linear.weight"]
        emb = (pooled @ w.T).numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_text_model_loads_from_disk_like_sentence_transformers(towers):
    _, mixed, st = towers
    loaded = ml.load_text_model(mixed, "cpu")
    assert loaded.embed_dim == EMBED and loaded.model.pooling == "mean"
    ids = loaded.tokenizer(["a red circle"])[0].tolist()
    assert loaded.tokenizer.hf.convert_ids_to_tokens(ids[:5]) == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert set(ids[5:]) == {loaded.tokenizer.pad_id}
    assert loaded.model.dense[0][0].bias is None and loaded.model.dense[0][1] is None
    with torch.no_grad():
        ours = loaded.model.encode_text(loaded.tokenizer(TEXTS)).numpy()
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, _direct_text(st, TEXTS), atol=1e-5)
    assert ml.text_model_embed_dim(mixed) == EMBED


def test_mixed_similarity_equals_cosine_of_the_two_towers(towers):
    image, mixed, st = towers
    scorer = cs.ClipScorer(_cfg(image, mixed, batch_size=5), SIZE)
    batch = _batch(14)
    out = scorer(batch)
    img = _direct_image(image, batch[S.IMAGE])
    txt_st = _direct_text(st, batch[S.ALT_TEXT])
    import open_clip

    model = open_clip.create_model("tiny", pretrained=image.pretrained).eval()
    with torch.no_grad():
        txt_oc = model.encode_text(open_clip.get_tokenizer("tiny")(list(batch[S.ALT_TEXT])), normalize=True).numpy()
    en = batch[S.SUBSET] == "en"
    ref = np.where(en, (img * txt_oc).sum(1), (img * txt_st).sum(1))
    np.testing.assert_allclose(out[S.SIMILARITY], ref, atol=2e-5)
    assert np.abs((img * txt_oc).sum(1) - (img * txt_st).sum(1))[~en].min() > 1e-4  # the towers differ
    # upstream tokenising (a wider column: the text model's 24 tokens) gives the same scores
    tokd = cs.ClipTokenizer(scorer.cfg)(batch)
    assert tokd[cs.CLIP_TOKENS].shape == (14, 24)
    np.testing.assert_allclose(scorer(tokd)[S.SIMILARITY], out[S.SIMILARITY], atol=1e-5)


def test_one_image_forward_per_row_across_subsets(towers):
    image, mixed, _ = towers
    scorer = cs.ClipScorer(_cfg(image, mixed, batch_size=4), SIZE, safety=SafetyConfig())
    runners = {id(r) for r in scorer.runners.values()}
    assert len(runners) == 1  # en, multi and nolang share the image tower
    runner = scorer.runners["en"]
    seen = []
    real = runner.encode_image
    runner.encode_image = lambda x: seen.append(len(x)) or real(x)
    text_calls = []
    for tr in {id(t): t for t in scorer.text_runners.values()}.values():
        real_t = tr.encode_text
        tr.encode_text = (lambda f: lambda tok: text_calls.append(len(tok)) or f(tok))(real_t)
    batch = _batch(10, seed=3)
    batch[S.DROP_REASON][[2, 7]] = "fetch:timeout"
    scorer(batch)
    assert sum(seen) == 8 and seen == [4, 4]  # every alive row once, in chunks of the batch size
    assert sum(text_calls) == 8 and len(text_calls) == 4  # two text towers per chunk
    assert scorer.image_rows_encoded == 8


def test_missing_text_model_is_named(towers, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "laion5b.yaml")
    with pytest.raises(ModelMissingError) as err:
        mc.check_models_available(cfg.clip)
    msg = str(err.value)
    assert "ViT-B-32.pt" in msg and "sentence-transformers/clip-ViT-B-32-multilingual-v1" in msg
    assert "modules.json" in msg and "2_Dense" in msg
    image, mixed, st = towers
    # a folder missing its dense weights
    broken = build_tiny_st(tmp_path / "broken")
    (broken / "2_Dense" / "pytorch_model.bin").unlink()
    with pytest.raises(ModelMissingError, match="2_Dense"):
        mc.check_models_available(_cfg(image, ClipModelConfig(image.arch, image.pretrained, text_model=str(broken))))
    with pytest.raises(ModelMissingError, match="does not exist"):
        ml.check_text_model_available(ClipModelConfig(text_model=str(tmp_path / "nowhere")))


def test_text_model_of_another_width_refused(towers, tmp_path):
    image, _, _ = towers
    wide = build_tiny_st(tmp_path / "wide", out_dim=48, bias=True)
    bad = ClipModelConfig(image.arch, image.pretrained, text_model=str(wide))
    with pytest.raises(ConfigError, match="48-d"):
        mc.check_models_available(_cfg(image, bad))
    with pytest.raises(ConfigError, match="48-d"):
        cs.ClipScorer(_cfg(image, bad), SIZE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision,atol", [("fp16", 5e-3), ("bf16", 3e-2), ("fp32", 1e-3)])
def test_cuda_mixed_towers_match_cpu(towers, precision, atol):
    image, mixed, _ = towers
    batch = _batch(40, seed=21)
    cpu = cs.ClipScorer(_cfg(image, mixed), SIZE, safety=SafetyConfig())(dict(batch))
    gpu_scorer = cs.ClipScorer(_cfg(image, mixed, device="cuda", precision=precision), SIZE, safety=SafetyConfig())
    gpu = gpu_scorer(dict(batch))
    np.testing.assert_allclose(gpu[S.SIMILARITY], cpu[S.SIMILARITY], atol=atol)
    assert gpu_scorer.image_rows_encoded == 40
