"""A name lookup for :class:`laionbuild.stages.fetch.Resolver` that fails the test when it is used."""

from __future__ import annotations


class NoDNS:
    """Every name must come from the host map: a real lookup is recorded and fails the test."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, name: str):
        self.calls.append(name)
        raise AssertionError(f"unexpected DNS lookup of {name!r}")
