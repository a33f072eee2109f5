"""Shared fixtures: a tiny bilingual tokenizer and tiny models made here, and the real catalog models.

Real models are pulled into the lmforge cache on first use (LMFORGE_CACHE, else the XDG cache), so a machine
that ran `make setup` already has the default one. Tests that use them are marked `slow`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from tests.tiny import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return make_tiny_tokenizer()


@pytest.fixture(params=["llama-tiny", "qwen2-tiny"])
def tiny_model(request: pytest.FixtureRequest) -> Transformer:
    return make_tiny_model(request.param)


def _pulled(name: str) -> Path:
    from lmforge.catalog import pull

    return pull(name, progress=False)


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    return _pulled("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_checkpoint() -> Path:
    return _pulled("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def real_gguf(smollm2_checkpoint: Path) -> Path | None:
    """The SmolLM2 GGUF file the catalog assembled beside its checkpoint."""
    found = sorted(smollm2_checkpoint.parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, and far faster than on two when other jobs share the cores."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
