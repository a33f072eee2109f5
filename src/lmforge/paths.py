"""Where lmforge keeps what it makes once and reuses: the cache directory, in the lowest layer.

Every module that writes into the cache (catalog models, converted and quantized checkpoints, compiled kernels,
fetched corpora) asks here, so that none of them imports another just for a path. It imports nothing of
lmforge's and decides nothing about what goes inside.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LMFORGE_CACHE, else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lmforge"
    return Path.home() / ".cache" / "lmforge"
