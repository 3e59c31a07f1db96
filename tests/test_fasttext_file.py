"""A fastText model file is checked before fastText reads it: fastText hangs on a truncated one."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from laionbuild.config import LangIdConfig
from laionbuild.errors import ModelMissingError
from laionbuild.models.fasttext_file import MAGIC, FastTextFileError, check_fasttext_file
from laionbuild.stages.langid import LanguageRouter, default_model_path


def dense_model(words=("hello", "bonjour"), labels=("__label__en", "__label__fr"), dim=2) -> bytes:
    """A tiny supervised fastText model in the binary format (dense matrices, version 12)."""
    out = struct.pack("<2i", MAGIC, 12)
    out += struct.pack("<12id", dim, 5, 5, 1, 5, 1, 3, 3, 0, 0, 0, 100, 1e-4)  # softmax loss, supervised, no buckets
    entries = [(w, 0) for w in words] + [(lab, 1) for lab in labels]
    out += struct.pack("<3i2q", len(entries), len(words), len(labels), 10, -1)
    for word, kind in entries:
        out += word.encode() + b"\0" + struct.pack("<qb", 1, kind)
    out += struct.pack("<?2q", False, len(words), dim) + struct.pack("<4f", 1.0, 0.0, 0.0, 1.0)
    out += struct.pack("<?2q", False, len(labels), dim) + struct.pack("<4f", 5.0, 0.0, 0.0, 5.0)
    return out


def test_the_shipped_quantized_model_checks_out_to_its_last_byte():
    path = default_model_path()
    with open(path, "rb") as fh:
        size = len(fh.read())
    assert check_fasttext_file(path) == size


def test_a_dense_model_checks_out_and_fasttext_reads_it_the_same_way(tmp_path):
    import fasttext

    path = tmp_path / "tiny.bin"
    path.write_bytes(dense_model())
    assert check_fasttext_file(str(path)) == path.stat().st_size
    labels, _ = fasttext.load_model(str(path)).predict("bonjour", k=1)
    assert labels == ("__label__fr",)


@pytest.mark.parametrize("kind", ["dense", "quantized"])
def test_every_cut_of_a_model_is_refused(tmp_path, kind):
    data = dense_model() if kind == "dense" else open(default_model_path(), "rb").read()
    cuts = range(len(data)) if kind == "dense" else [*range(0, 600, 7), *range(600, len(data), 9973)]
    path = tmp_path / "cut.bin"
    for n in cuts:
        path.write_bytes(data[:n])
        with pytest.raises(FastTextFileError):
            check_fasttext_file(str(path))
    path.write_bytes(data + b"\0")  # one byte more is not one model either
    with pytest.raises(FastTextFileError, match="after the model"):
        check_fasttext_file(str(path))
    path.write_bytes(b"__label__en hello\n" * 20)  # a training file, not a model
    with pytest.raises(FastTextFileError, match="not a fastText model"):
        check_fasttext_file(str(path))


def test_a_truncated_model_is_one_clear_error_not_a_hang(tmp_path):
    path = tmp_path / "lid.176.ftz"
    path.write_bytes(open(default_model_path(), "rb").read()[:1000])  # cut inside the dictionary
    with pytest.raises(ModelMissingError, match="ends inside the dictionary") as err:
        LanguageRouter(LangIdConfig(model_path=str(path)))
    assert str(path) in str(err.value)
    # what the check prevents: fastText itself never returns from this file (a child, killed)
    probe = f"import fasttext; fasttext.load_model({str(path)!r})"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", probe], timeout=3, capture_output=True)
