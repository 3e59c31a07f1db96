"""How config values name model files: packaged assets, local folders, Hugging Face repositories."""

from __future__ import annotations

from pathlib import Path

#: folder of the model files shipped with the package
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
#: ``builtin:<file>``: a file inside :data:`ASSETS_DIR`
BUILTIN_PREFIX = "builtin:"
#: ``local-dir:<folder>``: an open_clip model saved in a local folder
LOCAL_DIR_PREFIX = "local-dir:"
#: ``hf-hub:<repo>``: an open_clip model published on the Hugging Face hub
HF_HUB_PREFIX = "hf-hub:"


def asset_path(value: str) -> Path:
    """The packaged file a ``builtin:<file>`` value names."""
    return ASSETS_DIR / value[len(BUILTIN_PREFIX):]
