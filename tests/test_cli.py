"""CLI behaviour before any work starts: help, one-line errors and exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from laionbuild.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "laionbuild", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=120)


@pytest.mark.parametrize("command", ["run", "extract", "report", "demo"])
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: laionbuild" in out
    if command in ("run", "extract"):
        for option in ("--config", "--output", "--set", "--address", "--limit", "--shard", "--force"):
            assert option in out
        assert "exit status" in out


def test_unknown_config_key_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("clip:\n  treshold: 0.3\n")
    r = run_cli("run", "--config", str(cfg), "--input", str(tmp_path), "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "clip.treshold" in lines[0] and str(cfg) in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_input_exits_2(tmp_path):
    r = run_cli("run", "--config", "configs/smoke.yaml", "--input", str(tmp_path / "missing.warc.gz"),
                "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_missing_langid_model_exits_2(tmp_path):
    warc = tmp_path / "x.warc.gz"
    warc.write_bytes(b"")
    r = run_cli("extract", str(warc), "--output", str(tmp_path / "o"),
                "--set", f"langid.model_path={tmp_path / 'lid.176.bin'}")
    assert r.returncode == 2
    assert "lid.176.bin" in r.stderr and "Traceback" not in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.strip()]) == 1


def test_missing_clip_weights_exits_2(tmp_path):
    warc = tmp_path / "x.warc.gz"
    warc.write_bytes(b"")
    r = run_cli("run", "--config", "configs/smoke.yaml", "--input", str(warc), "--output", str(tmp_path / "o"),
                "--set", f"clip.models.en.pretrained={tmp_path / 'nope.pt'}")
    assert r.returncode == 2
    assert "nope.pt" in r.stderr and "Traceback" not in r.stderr


def test_bad_override_exits_2(tmp_path):
    r = run_cli("extract", str(tmp_path), "--set", "fetch.timeout_s=later")
    assert r.returncode == 2 and "fetch.timeout_s" in r.stderr


def test_parser_requires_a_command():
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_image_size_disagreeing_with_model_exits_2(tmp_path):
    warc = tmp_path / "x.warc.gz"
    warc.write_bytes(b"")
    r = run_cli("run", "--config", "configs/smoke.yaml", "--input", str(warc), "--output", str(tmp_path / "o"),
                "--set", "resize.image_size=64")
    assert r.returncode == 2
    assert "resize.image_size" in r.stderr and "32" in r.stderr and "Traceback" not in r.stderr
