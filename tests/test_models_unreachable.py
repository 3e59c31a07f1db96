"""An unreachable model host: asked once, said plainly, every missing file named, no retry storm."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from laionbuild.config import load_config
from laionbuild.models import ModelDownloadError, pull
from laionbuild.models.hosts import probe, source_origins, unreachable_origins

REPO = Path(__file__).resolve().parents[1]
EN_MODEL = "ViT-B-32/openai"
MULTI_MODEL = "sentence-transformers/clip-ViT-B-32-multilingual-v1"


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_tells_a_closed_port_from_a_listening_one(closed_port):
    assert probe(f"http://127.0.0.1:{closed_port}") == "connection refused"
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert probe(f"http://127.0.0.1:{listening.getsockname()[1]}") is None


def test_probe_says_a_name_does_not_resolve():
    # the test guard refuses every non-loopback lookup, as a machine without DNS does
    assert "does not resolve" in probe("https://hub.example.invalid")


def test_each_origin_is_asked_once(closed_port, monkeypatch):
    asked = []
    monkeypatch.setattr("laionbuild.models.hosts.probe", lambda o, t: asked.append(o) or "down")
    origin = f"http://127.0.0.1:{closed_port}"
    specs = [{"type": "url", "urls": [f"{origin}/a", f"{origin}/b"]}, {"type": "release", "urls": [f"{origin}/c"]}]
    assert unreachable_origins(specs) == {origin: "down"}
    assert asked == [origin]
    monkeypatch.setenv("HF_ENDPOINT", origin + "/")
    assert source_origins({"type": "hf-st", "repo": "x/y"}) == [origin]


def test_pull_tries_every_file_and_names_each(closed_port, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = load_config(REPO / "configs" / "laion5b.yaml", [f"models.cache={tmp_path / 'cache'}"])
    with pytest.raises(ModelDownloadError) as exc:
        pull(cfg, progress=False)
    text = str(exc.value)
    assert "2 of 2" in text
    assert EN_MODEL in text and MULTI_MODEL in text
    assert f"127.0.0.1:{closed_port} is unreachable" in text


def test_run_with_an_unreachable_hub_stops_at_once_naming_both_models(closed_port, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port}"
    env["HF_HOME"] = str(tmp_path / "hf")
    warc = tmp_path / "x.warc.gz"
    warc.write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "laionbuild", "run", "-c", "configs/laion5b.yaml", "-i", str(warc),
                        "-o", str(tmp_path / "out"), "--local"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr  # no retry warnings, no traceback
    line = lines[0]
    assert "unreachable" in line and f"127.0.0.1:{closed_port}" in line
    assert EN_MODEL in line and MULTI_MODEL in line
    assert "--offline" in line and "models pull" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", ["configs/laion5b.yaml", "configs/smoke.yaml", "configs/laion5b-xlmr.yaml"])
def test_models_list_imports_no_heavy_library(config):
    """``models list`` reads open_clip's tables without importing torch, open_clip or transformers."""
    code = ("import io, sys; from laionbuild.cli import main; "
            f"sys.stdout = io.StringIO(); code = main(['models', 'list', '-c', {config!r}]); "
            "out = sys.stdout.getvalue(); sys.stdout = sys.__stdout__; "
            "heavy = sorted(m for m in ('torch', 'open_clip', 'transformers', 'timm', 'wandb', 'ray') "
            "if m in sys.modules); print(code, len(out.splitlines()) > 3, heavy)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "0 True []", r.stdout + r.stderr


def test_pretrained_table_read_alone_agrees_with_open_clip():
    import open_clip

    from laionbuild.models.requirements import _open_clip_pretrained_table

    table = _open_clip_pretrained_table()
    assert table is not None
    for arch, tag in (("ViT-B-32", "openai"), ("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-L-14", "openai")):
        assert table.get_pretrained_cfg(arch, tag) == open_clip.get_pretrained_cfg(arch, tag)
    assert "safetensors.torch" not in sys.modules or sys.modules["safetensors.torch"] is not None


def test_library_warnings_are_printed_once(capsys):
    """huggingface_hub adds its own stderr handler on import; through ours only, a warning shows once."""
    import io
    import logging

    from laionbuild.models.hub import quiet_library_handlers

    root, lib = logging.getLogger(), logging.getLogger("huggingface_hub")
    sink = io.StringIO()
    ours = logging.StreamHandler(sink)
    theirs = logging.StreamHandler(sink)
    root.addHandler(ours)
    lib.addHandler(theirs)
    try:
        quiet_library_handlers()
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    finally:
        root.removeHandler(ours)
        lib.removeHandler(theirs)
    assert sink.getvalue().count("Retrying in 1s") == 1
    assert theirs not in lib.handlers
