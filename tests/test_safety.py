"""Safety scores: punsafe head on CLIP embeddings, pwatermark classifier, safe subset views.

The models are trained here, on data the tests make, with the project's own
training functions; they are then saved and loaded through the real loading
path and their held-out ROC AUC is measured.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from laionbuild import schema as S
from laionbuild.config import ClipConfig, ClipModelConfig, SafetyConfig, load_config
from laionbuild.errors import ConfigError, ModelMissingError
from laionbuild.stages import safety as sf
from laionbuild.stages import shards
from laionbuild.stages.clip_score import ClipScorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_punsafe  # noqa: E402
import train_watermark  # noqa: E402

TINY = ClipModelConfig("tiny-clip-shapes", "builtin:tiny-clip-shapes.pt")
SIZE = 32  # the tiny demo CLIP's input side
WM_SIZE = 64


def _tiny_clip_cfg(**kw) -> ClipConfig:
    return ClipConfig(models={"en": TINY, "multi": TINY, "nolang": TINY}, device="cpu", batch_size=64, **kw)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- AUC
def test_roc_auc_equals_pairwise_definition():
    rng = np.random.RandomState(0)
    scores = np.round(rng.rand(300), 2)  # many ties
    labels = (rng.rand(300) < 0.4).astype(int)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert sf.roc_auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)
    assert sf.roc_auc([0.1, 0.9], [0, 1]) == 1.0 and sf.roc_auc([0.9, 0.1], [0, 1]) == 0.0
    with pytest.raises(ValueError):
        sf.roc_auc([0.1, 0.2], [1, 1])


# --------------------------------------------------------------------------- punsafe
@pytest.fixture(scope="module")
def punsafe_head(tmp_path_factory):
    """Head trained on tiny-CLIP embeddings of rendered shapes; red / purple play the unsafe class."""
    x, y = train_punsafe.shapes_embeddings(12, seed=0)
    module, metrics = train_punsafe.train_punsafe_head(x, y, hidden=(32,), epochs=60, seed=0)
    path = tmp_path_factory.mktemp("punsafe") / "punsafe-shapes.pt"
    sf.save_punsafe_head(path, module, clip_model="tiny-clip-shapes/builtin:tiny-clip-shapes.pt", metrics=metrics)
    return path


def test_punsafe_head_held_out_auc(punsafe_head):
    head = sf.load_punsafe_head(str(punsafe_head))
    assert head.embed_dim == 64 and head.clip_model.startswith("tiny-clip-shapes")
    # fresh renders (another seed) through the loaded head
    x, y = train_punsafe.shapes_embeddings(6, seed=123)
    with torch.no_grad():
        p = head.probability(torch.from_numpy(x)).numpy()
    auc = sf.roc_auc(p, y)
    print(json.dumps({"punsafe_shapes_heldout_auc": auc, "n": len(y)}))
    assert auc >= 0.9
    assert ((p >= 0.5) == (y == 1)).mean() >= 0.9


@pytest.mark.slow
def test_punsafe_on_overlapping_gaussians_reaches_bayes_auc(tmp_path):
    """Two overlapping classes: the trained head's held-out AUC is close to the best possible one."""
    rng = np.random.RandomState(1)
    dim, n, shift = 16, 3000, 1.2
    direction = rng.randn(dim)
    direction /= np.linalg.norm(direction)
    y = (rng.rand(n) < 0.5).astype(int)
    x = rng.randn(n, dim) * 0.1 + 1.0  # embeddings live away from the origin (they are L2-normalised later)
    x += (y[:, None] * shift * 0.1) * direction
    train, held = slice(0, 2000), slice(2000, n)
    module, _ = train_punsafe.train_punsafe_head(x[train], y[train], hidden=(16,), epochs=40, seed=0)
    path = sf.save_punsafe_head(tmp_path / "g.pt", module, clip_model="gaussian")
    head = sf.load_punsafe_head(str(path))
    with torch.no_grad():
        p = head.probability(torch.nn.functional.normalize(torch.from_numpy(x[held]).float(), dim=-1)).numpy()
    auc = sf.roc_auc(p, y[held])
    bayes = 0.5 * (1 + math.erf(shift / 2))  # Phi(shift / sqrt(2)) for unit-variance classes
    print(json.dumps({"punsafe_gaussian_heldout_auc": auc, "bayes_auc": bayes}))
    assert bayes - 0.06 <= auc <= bayes + 0.04


def test_punsafe_column_from_clip_scorer(punsafe_head):
    from laionbuild.demo import shapes

    specs = [shapes.ShapeSpec(c, s) for c in ("red", "blue", "purple", "green") for s in ("circle", "square")]
    images = np.stack([np.asarray(shapes.render(sp, size=SIZE, seed=900 + i)) for i, sp in enumerate(specs)])
    n = len(specs)
    batch = {
        S.ALT_TEXT: np.array([shapes.caption(sp, "en") for sp in specs], dtype=object),
        S.SUBSET: np.array(["en", "multi"] * (n // 2), dtype=object),
        S.DROP_REASON: np.array(["fetch:timeout"] + [""] * (n - 1), dtype=object),
        S.IMAGE: images,
    }
    safety = SafetyConfig(punsafe_heads={"en": str(punsafe_head), "multi": str(punsafe_head)})
    scorer = ClipScorer(_tiny_clip_cfg(save_embeddings=True), SIZE, safety=safety)
    out = scorer(batch)
    p = out[S.PUNSAFE]
    assert p.dtype == np.float32 and np.isnan(p[0]) and not np.isnan(p[1:]).any()
    unsafe = np.array([sp.colour in ("red", "purple") for sp in specs])
    assert (p[1:][unsafe[1:]] > 0.5).all() and (p[1:][~unsafe[1:]] < 0.5).all()
    # exactly the loaded head on the scorer's own (normalised) image embedding
    head = sf.load_punsafe_head(str(punsafe_head))
    emb = torch.from_numpy(out["image_embedding"][1:].astype(np.float32))
    with torch.no_grad():
        direct = head.probability(torch.nn.functional.normalize(emb, dim=-1)).numpy()
    np.testing.assert_allclose(p[1:], direct, atol=2e-3)
    # a subset without a head is not scored
    out2 = ClipScorer(_tiny_clip_cfg(), SIZE, safety=SafetyConfig(punsafe_heads={"en": str(punsafe_head)}))(batch)
    assert np.isnan(out2[S.PUNSAFE][batch[S.SUBSET] == "multi"]).all()
    assert not np.isnan(out2[S.PUNSAFE][1:][batch[S.SUBSET][1:] == "en"]).any()


def test_punsafe_head_of_another_embedding_size_is_refused(tmp_path):
    path = sf.save_punsafe_head(tmp_path / "h32.pt", sf.MLPHead([32, 8, 1]), clip_model="ViT-B-32/openai")
    safety = SafetyConfig(punsafe_heads={"en": str(path)})
    with pytest.raises(ConfigError, match="32-d"):
        ClipScorer(_tiny_clip_cfg(), SIZE, safety=safety)
    with pytest.raises(ConfigError, match="32-d"):
        sf.check_safety_models(safety, _tiny_clip_cfg())


def test_missing_or_foreign_checkpoints(tmp_path):
    with pytest.raises(ModelMissingError, match="not found"):
        sf.load_punsafe_head(str(tmp_path / "nope.pt"))
    with pytest.raises(ModelMissingError):
        sf.check_safety_models(SafetyConfig(watermark_model=str(tmp_path / "wm.pt")), _tiny_clip_cfg())
    foreign = tmp_path / "plain.pt"
    torch.save({"layers.0.weight": torch.zeros(1, 4)}, foreign)  # a bare state dict: needs conversion
    with pytest.raises(ConfigError, match="laionbuild.punsafe/1"):
        sf.load_punsafe_head(str(foreign))
    with pytest.raises(ConfigError, match="laionbuild.watermark/1"):
        sf.load_watermark_model(str(foreign))


def test_dense_stack_conversion_matches_a_numpy_forward(tmp_path):
    """Keras-style dense layers (kernel [in, out]) + a Normalization layer, converted and loaded."""
    rng = np.random.RandomState(3)
    dims = [12, 10, 6, 1]
    kernels = [rng.randn(a, b).astype(np.float32) * 0.4 for a, b in zip(dims[:-1], dims[1:])]
    biases = [rng.randn(b).astype(np.float32) * 0.1 for b in dims[1:]]
    mean, var = rng.randn(12).astype(np.float32) * 0.1, rng.rand(12).astype(np.float32) + 0.5
    path = sf.punsafe_checkpoint_from_dense(tmp_path / "k.pt", kernels, biases, activations=["relu", "none"],
                                            clip_model="ViT-L-14/openai", input_mean=mean, input_var=var)
    head = sf.load_punsafe_head(str(path))
    x = rng.randn(5, 12).astype(np.float32)
    h = (x - mean) / np.sqrt(var)
    h = np.maximum(h @ kernels[0] + biases[0], 0)
    h = h @ kernels[1] + biases[1]  # "none": no activation
    logit = (h @ kernels[2] + biases[2]).reshape(-1)
    with torch.no_grad():
        got = head.probability(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-logit)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- pwatermark
@pytest.fixture(scope="module")
def watermark_model(tmp_path_factory):
    images, labels = train_watermark.synthetic_watermark_images(600, image_size=WM_SIZE, seed=1)
    net, metrics = train_watermark.train_watermark_model(images, labels, input_size=WM_SIZE, head_hidden=(32,),
                                                         steps=220, seed=0)
    path = tmp_path_factory.mktemp("watermark") / "watermark-tiny.pt"
    sf.save_watermark_model(path, net, input_size=WM_SIZE, metrics=metrics)
    return path


@pytest.mark.slow
def test_watermark_classifier_held_out_auc(watermark_model):
    model = sf.load_watermark_model(str(watermark_model))
    assert model.input_size == WM_SIZE and model.net.arch == "tiny-cnn"
    images, labels = train_watermark.synthetic_watermark_images(240, image_size=WM_SIZE, seed=4242)
    scorer = sf.WatermarkScorer("", WM_SIZE, model=model, batch_size=64)
    p = scorer.probabilities(images)
    auc = sf.roc_auc(p, labels)
    print(json.dumps({"pwatermark_synthetic_heldout_auc": auc, "n": len(labels)}))
    assert p.dtype == np.float32 and ((p >= 0) & (p <= 1)).all()
    assert auc >= 0.85


@pytest.mark.slow
def test_watermark_scorer_rows_and_resize(watermark_model):
    images, _ = train_watermark.synthetic_watermark_images(6, image_size=WM_SIZE, seed=77)
    scorer = sf.WatermarkScorer(str(watermark_model), WM_SIZE)
    batch = {S.DROP_REASON: np.array(["", "clip:below_threshold", "", "", "", ""], dtype=object), S.IMAGE: images}
    out = scorer(batch)[S.PWATERMARK]
    assert np.isnan(out[1]) and not np.isnan(np.delete(out, 1)).any()
    np.testing.assert_allclose(np.delete(out, 1), scorer.probabilities(np.delete(images, 1, axis=0)), atol=1e-5)
    # pipeline images of another side are resized on the device to the model's input size
    small = sf.WatermarkScorer(str(watermark_model), SIZE)
    half = images[:, ::2, ::2]
    got = small(dict(batch, **{S.IMAGE: np.ascontiguousarray(half)}))[S.PWATERMARK]
    assert not np.isnan(np.delete(got, 1)).any()
    # an image of the wrong shape is not scored
    bad = np.empty(6, dtype=object)
    for i in range(6):
        bad[i] = images[i]
    bad[2] = np.zeros((3, 3, 3), np.uint8)
    got = scorer({S.DROP_REASON: batch[S.DROP_REASON], S.IMAGE: bad})[S.PWATERMARK]
    assert np.isnan(got[2]) and not np.isnan(got[0])


def test_laion_watermark_layout_converts_exactly(tmp_path):
    """A timm EfficientNet-B3 with LAION's classifier layout (random weights) converts to the same outputs."""
    timm = pytest.importorskip("timm")
    from torch import nn

    torch.manual_seed(0)
    ref = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    ref.classifier = nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(0.3), nn.Linear(625, 256),
                                   nn.ReLU(), nn.Linear(256, 2))
    ref.eval()
    src = tmp_path / "watermark_model_v1.pt"
    torch.save(ref.state_dict(), src)
    out = train_watermark.convert_laion(src, tmp_path / "laion-wm.pt")
    model = sf.load_watermark_model(str(out))
    assert model.input_size == 256 and model.positive_index == 0 and model.net.num_classes == 2
    images = np.random.RandomState(0).randint(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    x = sf.preprocess_images(torch.from_numpy(images), 96, sf.IMAGENET_MEAN, sf.IMAGENET_STD)
    with torch.no_grad():
        want = torch.softmax(ref(x), dim=1)[:, 0].numpy()
        got = model.probability(model.net(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------- safe views + config
def test_safe_view_bounds_and_reasons():
    table = pa.table({
        "URL": ["a", "b", "c", "d", "e"],
        S.PUNSAFE: pa.array([0.1, 0.6, float("nan"), 0.2, 0.9], pa.float32()),
        S.PWATERMARK: pa.array([0.1, 0.1, 0.1, 0.95, 0.95], pa.float32()),
    })
    view, why = shards.safe_view(table, 0.5, 0.8)
    assert view.column("URL").to_pylist() == ["a"]
    assert why == {"unscored": 1, "unsafe": 2, "watermark": 1}
    view, why = shards.safe_view(table, 0.5, None)
    assert view.column("URL").to_pylist() == ["a", "d"]
    # a bound on a score that was never computed lets nothing through
    view, why = shards.safe_view(table.drop_columns([S.PWATERMARK]), None, 0.8)
    assert view.num_rows == 0 and why["unscored"] == 5


def test_output_table_carries_safety_columns():
    n = 3
    batch = {k: np.array([f"x{i}" for i in range(n)], dtype=object)
             for k in (S.URL, S.ALT_TEXT, S.LANGUAGE, S.PAGE_URL, S.WARC_PATH, S.WARC_RECORD_ID)}
    batch.update({S.WIDTH: np.ones(n, np.int32), S.HEIGHT: np.ones(n, np.int32),
                  S.SIMILARITY: np.full(n, 0.3, np.float32), S.HASH: np.arange(n, dtype=np.int64),
                  S.LANGUAGE_SCORE: np.ones(n, np.float32), S.WARC_OFFSET: np.arange(n, dtype=np.int64),
                  S.PUNSAFE: np.array([0.1, np.nan, 0.7], np.float32)})
    table = shards.output_table(batch, np.array([True, True, False]))
    assert table.schema.field("punsafe").type == pa.float32() and "pwatermark" not in table.column_names
    assert table.column("punsafe").to_pylist()[0] == pytest.approx(0.1)


def test_safety_config_validation(tmp_path):
    cfg = load_config(None, ["safety.punsafe_heads={en: a.pt, multi: a.pt, nolang: a.pt}",
                             "safety.watermark_model=w.pt", "safety.write_safe_subsets=true"])
    assert cfg.safety.punsafe_max == 0.5 and cfg.safety.pwatermark_max == 0.8
    with pytest.raises(ConfigError, match="no head for multi, nolang"):
        load_config(None, ["safety.punsafe_heads={en: a.pt}", "safety.write_safe_subsets=true",
                           "safety.pwatermark_max=null"])
    with pytest.raises(ConfigError, match="watermark_model is empty"):
        load_config(None, ["safety.write_safe_subsets=true", "safety.punsafe_max=null"])
    with pytest.raises(ConfigError, match="punsafe_heads' keys"):
        load_config(None, ["safety.punsafe_heads={xx: a.pt}"])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        load_config(None, ["safety.punsafe_max=1.5"])


# --------------------------------------------------------------------------- pipeline
@pytest.mark.ray
def test_pipeline_publishes_scores_and_safe_subsets(ray_session, tmp_path, punsafe_head, watermark_model):
    from laionbuild.demo.run import compare_with_expectations, run_demo
    from laionbuild.demo.sample_warc import DemoSample

    out = tmp_path / "out"
    heads = json.dumps({s: str(punsafe_head) for s in S.SUBSETS})
    result = run_demo(str(out), progress=False, overrides=[
        f"safety.punsafe_heads={heads}", f"safety.watermark_model={watermark_model}",
        "safety.write_safe_subsets=true", "safety.punsafe_max=0.5", "safety.pwatermark_max=0.8",
    ])
    assert result.exit_code == 0
    sample = DemoSample.load(str(Path(f"{out}-sample") / "manifest.json"))
    check = compare_with_expectations(str(out), sample)
    assert all(r["missing"] == 0 and r["unexpected"] == 0 for r in check.values()), check  # nothing dropped
    stats = json.loads((out / "stats.json").read_text())
    colour_of = {e.url: e.image.split()[0] for e in sample.expectations if e.image}
    total_safe = 0
    saw_unsafe_colour = False
    for subset in S.SUBSETS:
        main = pa.concat_tables([pq.read_table(f) for f in sorted((out / subset).glob("*.parquet"))])
        assert main.schema.field("punsafe").type == pa.float32()
        assert main.schema.field("pwatermark").type == pa.float32()
        p = np.asarray(main.column("punsafe").to_pylist(), dtype=np.float64)
        w = np.asarray(main.column("pwatermark").to_pylist(), dtype=np.float64)
        assert not np.isnan(p).any() and not np.isnan(w).any()
        assert ((p >= 0) & (p <= 1)).all() and ((w >= 0) & (w <= 1)).all()
        for url, pu in zip(main.column("URL").to_pylist(), p):
            if url in colour_of:
                unsafe = colour_of[url] in ("red", "purple")
                saw_unsafe_colour |= unsafe
                assert (pu > 0.5) == unsafe, (url, colour_of[url], pu)
        safe_files = sorted((out / f"{subset}_safe").glob("*.parquet"))
        safe = pa.concat_tables([pq.read_table(f) for f in safe_files]) if safe_files else None
        want = {u for u, pu, wm in zip(main.column("URL").to_pylist(), p, w) if pu < 0.5 and wm < 0.8}
        got = set(safe.column("URL").to_pylist()) if safe is not None else set()
        assert got == want, subset
        assert stats["safe_subsets"][subset]["rows"] == len(want)
        total_safe += len(want)
    assert saw_unsafe_colour and total_safe > 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["models"]["safety.watermark"] == str(watermark_model)


@pytest.mark.gpu
def test_safety_scores_on_gpu_match_cpu(punsafe_head, watermark_model):
    from laionbuild.demo import shapes

    specs = [shapes.ShapeSpec(c, "circle") for c in ("red", "blue", "purple", "green")]
    images = np.stack([np.asarray(shapes.render(sp, size=SIZE, seed=950 + i)) for i, sp in enumerate(specs)])
    batch = {
        S.ALT_TEXT: np.array([shapes.caption(sp, "en") for sp in specs], dtype=object),
        S.SUBSET: np.array(["en"] * len(specs), dtype=object),
        S.DROP_REASON: np.array([""] * len(specs), dtype=object),
        S.IMAGE: images,
    }
    safety = SafetyConfig(punsafe_heads={"en": str(punsafe_head)}, watermark_model=str(watermark_model))
    cpu = ClipScorer(_tiny_clip_cfg(), SIZE, safety=safety)(batch)
    gpu_cfg = ClipConfig(models={"en": TINY, "multi": TINY, "nolang": TINY}, device="cuda", precision="fp32")
    gpu = ClipScorer(gpu_cfg, SIZE, safety=safety)(batch)
    alive = cpu[S.DROP_REASON] == ""
    np.testing.assert_allclose(gpu[S.PUNSAFE], cpu[S.PUNSAFE], atol=1e-3)
    np.testing.assert_allclose(gpu[S.PWATERMARK][alive], cpu[S.PWATERMARK][alive], atol=1e-3)
