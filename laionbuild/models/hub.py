"""The local Hugging Face cache: where a repository's file is, without ever downloading it."""

from __future__ import annotations

import logging
import os

#: libraries that add their own stderr handler to their loggers on import
_SELF_LOGGING_LIBRARIES = ("huggingface_hub", "transformers", "sentence_transformers")


def quiet_library_handlers() -> None:
    """Let Hugging Face libraries log through the application's handlers only.

    On import they add a stderr handler of their own to their loggers, which also propagate
    to the root logger: with the CLI's handler every warning was printed twice, bare and
    formatted. Nothing is removed while the root logger has no handler (nothing would print).
    """
    if not logging.getLogger().handlers:
        return
    for name in _SELF_LOGGING_LIBRARIES:
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            if type(handler) is logging.StreamHandler:
                lib.removeHandler(handler)


def hf_default_cache() -> str:
    """Hugging Face's own cache folder (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except ImportError:
        home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
        return os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))


def hf_cache_hint(cache_dir: str | None) -> str:
    """Which cache a message about a missing file means."""
    return f"cache_dir {cache_dir}" if cache_dir else f"cache {hf_default_cache()}"


def hf_cached(repo: str, filename: str, cache_dir: str | None) -> str | None:
    """Path of ``filename`` of ``repo`` in a Hugging Face cache (``cache_dir``, empty or None = the
    default one), as the loaders look it up; None when it is not there. Never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir or None)
    except Exception:  # malformed repo id and the like: treat as not cached
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None
