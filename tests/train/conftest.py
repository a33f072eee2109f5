"""Token shards made in the test from the tiny bilingual tokenizer, and a one-thread torch for tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.data.shards import ShardWriter
from lmforge.fileio import sha256_file
from lmforge.tokenizer import Tokenizer
from tests.tiny import CORPUS


def write_shards(tokenizer: Tokenizer, tok_dir: Path, out: Path, repeats: int = 40, shard_tokens: int = 2000) -> Path:
    """CORPUS repeated, tokenized into several small shards (so windows cross shard boundaries)."""
    sha = sha256_file(tok_dir / "tokenizer.json")
    writer = ShardWriter(out, tokenizer.vocab_size, tokenizer.eos_token_ids[-1], sha, shard_tokens=shard_tokens)
    for i in range(repeats):
        for text in CORPUS:
            writer.add(tokenizer.encode(f"{i} {text}"))
    writer.close()
    return out


@pytest.fixture(scope="session")
def tiny_data(tiny_tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tokenizer directory, shard directory)."""
    root = tmp_path_factory.mktemp("pretrain-data")
    tiny_tokenizer.save(root / "tokenizer")
    return root / "tokenizer", write_shards(tiny_tokenizer, root / "tokenizer", root / "shards")
