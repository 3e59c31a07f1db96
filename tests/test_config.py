from pathlib import Path

import pytest

from laionbuild.config import (
    Config,
    apply_overrides,
    config_hash,
    config_to_yaml,
    load_config,
)
from laionbuild.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_laion5b_thresholds():
    cfg = load_config(None)
    assert dict(cfg.clip.thresholds) == {"en": 0.28, "multi": 0.26, "nolang": 0.26}
    assert cfg.resize.image_size == 224


@pytest.mark.parametrize("name", ["laion5b.yaml", "laion5b-xlmr.yaml", "smoke.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, Config)


def test_laion5b_config_is_faithful():
    cfg = load_config(REPO / "configs" / "laion5b.yaml")
    assert (cfg.clip.models["en"].arch, cfg.clip.models["en"].pretrained) == ("ViT-B-32", "openai")
    mtext = "sentence-transformers/clip-ViT-B-32-multilingual-v1"
    for subset in ("multi", "nolang"):
        m = cfg.clip.models[subset]
        assert (m.arch, m.pretrained, m.text_model) == ("ViT-B-32", "openai", mtext)
    assert cfg.clip.models["en"].text_model == ""
    assert cfg.clip.precision == "fp16"
    assert cfg.safety.laion_filter.enabled is True
    assert load_config(None).clip.models == cfg.clip.models  # the package defaults are the same models
    xlmr = load_config(REPO / "configs" / "laion5b-xlmr.yaml")
    assert (xlmr.clip.models["multi"].arch, xlmr.clip.models["multi"].text_model) == ("xlm-roberta-base-ViT-B-32", "")
    assert xlmr.clip.models["en"] == cfg.clip.models["en"] and xlmr.safety.laion_filter.enabled
    assert dict(cfg.clip.thresholds) == {"en": 0.28, "multi": 0.26, "nolang": 0.26}
    assert cfg.resize.image_size == 224
    assert cfg.extract.min_alt_length == 5 and cfg.extract.max_url_length == 2000


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "fetch:\n  timout_s: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "fetch.timout_s" in msg and str(p) in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config(write(tmp_path, "bogus: {}\n"))


def test_wrong_type_rejected(tmp_path):
    with pytest.raises(ConfigError, match="fetch.timeout_s"):
        load_config(write(tmp_path, "fetch:\n  timeout_s: soon\n"))
    with pytest.raises(ConfigError, match="must be a list"):
        load_config(write(tmp_path, "extract:\n  excluded_extensions: .svg\n"))
    with pytest.raises(ConfigError, match="true or false"):
        load_config(write(tmp_path, "run:\n  force: 1\n"))


def test_overrides_any_depth_and_yaml_scalars():
    cfg = load_config(None, [
        "clip.thresholds.en=0.3",
        "clip.models.multi.arch=ViT-L-14",
        "fetch.formats=[JPEG, PNG]",
        "run.force=true",
        "fetch.host_map={img.test: 127.0.0.2}",
    ])
    assert cfg.clip.thresholds["en"] == 0.3
    assert cfg.clip.thresholds["multi"] == 0.26  # other keys of the mapping kept
    assert cfg.clip.models["multi"].arch == "ViT-L-14"
    assert cfg.clip.models["multi"].pretrained == "openai"
    assert cfg.fetch.formats == ("JPEG", "PNG")
    assert cfg.run.force is True
    assert cfg.fetch.host_map == {"img.test": "127.0.0.2"}


def test_override_errors():
    with pytest.raises(ConfigError, match="unknown key 'clip.tresholds'"):
        load_config(None, ["clip.tresholds.en=0.3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["clip.thresholds.en"])
    with pytest.raises(ConfigError, match="'run.name' must be a mapping, got 'x' \\(setting 'run.name.sub'\\)"):
        apply_overrides({"run": {"name": "x"}}, ["run.name.sub=1"])


def test_a_lease_is_renewed_at_least_twice_per_expiry():
    load_config(None, ["run.lease_expiry_s=4", "run.lease_heartbeat_s=2"])
    with pytest.raises(ConfigError, match="lease_heartbeat_s <= lease_expiry_s / 2"):
        load_config(None, ["run.lease_expiry_s=4", "run.lease_heartbeat_s=3"])


def test_duplicate_keys_non_finite_numbers_and_an_empty_output_are_refused(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("run:\n  name: a\nclip:\n  device: cpu\nrun:\n  limit: 2\n")
    with pytest.raises(ConfigError, match="line 5, column 1: found the key 'run' twice"):
        load_config(str(dup))
    nested = tmp_path / "nested.yaml"
    nested.write_text("fetch:\n  timeout_s: 5\n  timeout_s: 6\n")
    with pytest.raises(ConfigError, match="found the key 'timeout_s' twice"):
        load_config(str(nested))
    for value in (".nan", ".inf", "-.inf"):
        with pytest.raises(ConfigError, match="'fetch.timeout_s' must be a finite number"):
            load_config(None, [f"fetch.timeout_s={value}"])
    for value in ("", "null", "'  '"):
        with pytest.raises(ConfigError, match="'run.output' is empty"):
            load_config(None, [f"run.output={value}"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="resize.mode"):
        load_config(None, ["resize.mode=stretch"])
    with pytest.raises(ConfigError, match="run.shard"):
        load_config(None, ["run.shard=3/2"])
    with pytest.raises(ConfigError, match="clip.thresholds"):
        load_config(None, ["clip.thresholds.de=0.3"])
    with pytest.raises(ConfigError, match="output.part_rows"):
        load_config(None, ["output.part_rows=-1"])


def test_config_is_frozen_and_hash_stable():
    a = load_config(None)
    with pytest.raises(Exception):
        a.run.name = "x"  # type: ignore[misc]
    assert config_hash(a) == config_hash(load_config(None))
    assert config_hash(a) != config_hash(load_config(None, ["clip.thresholds.en=0.3"]))
    # execution-only settings do not change the hash (a resume on another cluster is allowed)
    assert config_hash(a) == config_hash(load_config(None, ["ray.fetch_actors=9", "run.progress=false"]))
    # nor does the size of the parts a work shard is written in (a rerun keeps parts of any size)
    assert config_hash(a) == config_hash(load_config(None, ["output.part_rows=64"]))


def test_yaml_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "laion5b.yaml", ["clip.thresholds.en=0.31"])
    p = tmp_path / "again.yaml"
    p.write_text(config_to_yaml(cfg))
    assert load_config(p) == cfg
