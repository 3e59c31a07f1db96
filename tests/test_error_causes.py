"""A name that does not resolve fails at once; every "cannot read" says why."""

from __future__ import annotations

import socket

import pytest

from laionbuild.errors import SetupError, error_cause, name_not_found
from laionbuild.inputs import read_listing
from laionbuild.remote import RemoteReadError, ResumableHTTPReader, RetryPolicy


def test_a_host_that_does_not_resolve_is_not_retried():
    # the tests' network guard answers every non-loopback lookup with EAI_NONAME, as DNS does for
    # a name that does not exist
    slept: list[float] = []
    with pytest.raises(RemoteReadError, match="does not resolve"):
        ResumableHTTPReader("https://warc.example.invalid/a.warc.gz", RetryPolicy(retries=8, backoff_s=1.0),
                            sleep=slept.append)
    assert slept == []


def test_a_transient_lookup_failure_is_still_retried(monkeypatch):
    def again(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", again)
    slept: list[float] = []
    with pytest.raises(RemoteReadError, match="gave up after 3 failed attempts"):
        ResumableHTTPReader("https://warc.example.invalid/a.warc.gz", RetryPolicy(retries=2, backoff_s=0.5),
                            sleep=slept.append)
    assert len(slept) == 2


def test_name_not_found_looks_through_wrapped_errors():
    inner = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    try:
        try:
            raise inner
        except OSError as exc:
            raise ConnectionError("wrapped") from exc
    except ConnectionError as outer:
        assert name_not_found(outer) == "Name or service not known"
    assert name_not_found(socket.gaierror(socket.EAI_AGAIN, "try again")) is None


@pytest.mark.parametrize("exc,cause", [
    (FileNotFoundError("https://x/y"), "not found"),
    (PermissionError(13, "Permission denied"), "permission denied"),
    (ConnectionRefusedError(111, "refused"), "connection refused"),
    (ValueError("bad header"), "ValueError: bad header"),
    (RuntimeError(), "RuntimeError"),
])
def test_error_cause_never_just_repeats_the_path(exc, cause):
    assert error_cause(exc) == cause


def test_unreadable_listing_url_names_its_cause():
    with pytest.raises(SetupError) as exc:
        read_listing("https://data.example.invalid/crawl/warc.paths.gz", "https://data.example.invalid/")
    text = str(exc.value)
    assert "cannot read listing https://data.example.invalid/crawl/warc.paths.gz: " in text
    assert text.rsplit(": ", 1)[-1] not in ("https://data.example.invalid/crawl/warc.paths.gz", "")
    assert "resolve" in text or "looked up" in text


def test_missing_local_listing_says_not_found(tmp_path):
    with pytest.raises(SetupError, match="not found"):
        read_listing(str(tmp_path / "warc.paths.gz"), "")


def test_a_text_file_named_warc_gz_is_reported_as_not_a_warc(tmp_path):
    from laionbuild.config import ExtractConfig
    from laionbuild.stages.candidates import extract_file

    path = tmp_path / "notes.warc.gz"
    path.write_text("This is a plain text file\nnot a warc\n")
    fe = extract_file(str(path), ExtractConfig(reader="warcio"))
    assert (fe.file.status, fe.file.reason) == ("failed", "not_warc")
    assert "not a WARC file" in fe.file.message and "'arc'" not in fe.file.message
