"""Lone surrogates: what JSON's ``\\ud800`` escapes and undecodable command-line bytes leave in a
Python string. They are no characters and cannot be written as UTF-8 (parquet, JSON, a model)."""

from __future__ import annotations


def has_lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def without_lone_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD."""
    if not has_lone_surrogate(text):
        return text
    return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


__all__ = ["has_lone_surrogate", "without_lone_surrogates"]
