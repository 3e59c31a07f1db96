"""Model files: what a config needs, downloading them, one cache for a cluster (see docs/models.md).

* :func:`required_models` -> :class:`ModelRequirement` per model file, present or missing;
* :func:`pull` downloads the missing ones into the cache (``laionbuild models pull``);
* :func:`ensure_models` (driver, before the preflight) and :func:`localize_models`
  (each actor / node) give the config with local paths;
* :func:`model_provenance` is the record for ``provenance.json``.
"""

from .download import ModelDownloadError, download_url, sha256_file
from .requirements import RELEASE_PREFIX, RELEASES, ModelRequirement, cache_layout, required_models
from .store import (
    ModelsReport,
    ensure_models,
    local_config,
    localize_files,
    localize_models,
    model_provenance,
    pull,
    read_lock,
)

__all__ = [
    "RELEASES",
    "RELEASE_PREFIX",
    "ModelDownloadError",
    "ModelRequirement",
    "ModelsReport",
    "cache_layout",
    "download_url",
    "ensure_models",
    "local_config",
    "localize_files",
    "localize_models",
    "model_provenance",
    "pull",
    "read_lock",
    "required_models",
    "sha256_file",
]
