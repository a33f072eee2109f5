"""P-Tuning v2: the base stays frozen, the prefix changes the output, and the engine's cached decoding (native
fast path, batched rows, prefix reuse) reproduces the training-time forward exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lmforge.engine import Engine, Stats
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer
from lmforge.train.adapters import load_adapter, save_adapter
from lmforge.train.ptuning import PtuningConfig, apply_ptuning
from tests.test_engine import PROMPTS, greedy_by_recomputation
from tests.test_lora import logits, train_briefly
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tuned(model: Transformer, prefix_len: int = 5) -> Transformer:
    model = apply_ptuning(copy.deepcopy(model), PtuningConfig(prefix_len=prefix_len))
    with torch.no_grad():  # a prefix strong enough to matter, as after training
        model.prefix.k.normal_(std=1.0)
        model.prefix.v.normal_(std=1.0)
    return model


def test_training_moves_only_the_prefix(tiny_model: Transformer, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model = apply_ptuning(tiny_model, PtuningConfig(prefix_len=4))
    start = model.prefix.k.detach().clone()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefix.k", "prefix.v"]
    train_briefly(model, tmp_path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(model.prefix.k, start)


def test_prefix_changes_the_output_and_round_trips(tiny_model: Transformer, tmp_path: Path) -> None:
    model = tuned(tiny_model)
    assert not torch.allclose(logits(model), logits(tiny_model), atol=1e-3)
    save_adapter(model, tmp_path, "ptuning", PtuningConfig(prefix_len=5), {"name": "tiny"})
    loaded = load_adapter(copy.deepcopy(tiny_model), tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_engine_decodes_what_the_training_forward_computes(tiny_model: Transformer, tiny_tokenizer: Tokenizer) -> None:
    model = tuned(tiny_model)
    engine = Engine(copy.deepcopy(model), tiny_tokenizer)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS]
    batched = engine.generate(prompts, params)
    for ids, result in zip(prompts, batched, strict=True):
        assert result.token_ids == greedy_by_recomputation(model, ids, 16)
    assert [r.token_ids for r in batched] != [greedy_by_recomputation(tiny_model, ids, 16) for ids in prompts]


def test_stream_prefix_reuse_stays_exact(tiny_tokenizer: Tokenizer) -> None:
    model = tuned(make_tiny_model("qwen2-tiny"))
    engine = Engine(copy.deepcopy(model), tiny_tokenizer)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    first = tiny_tokenizer.encode("Hello, how are you today?")
    list(engine.stream(first, params))
    second = first + tiny_tokenizer.encode(" I am fine")
    stats = Stats()
    text = "".join(engine.stream(second, params, stats))
    assert stats.cached_tokens == len(first)
    assert text == tiny_tokenizer.decode(greedy_by_recomputation(model, second, 8))


def test_context_limit_counts_the_prefix(tiny_tokenizer: Tokenizer) -> None:
    model = tuned(make_tiny_model("llama-tiny"), prefix_len=5)  # max_seq_len 256: 251 positions for tokens
    engine = Engine(copy.deepcopy(model), tiny_tokenizer)
    ids = (tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * 40)[:230]
    [result] = engine.generate([ids], SamplingParams(max_new_tokens=21, ignore_eos=True))
    assert result.token_ids == greedy_by_recomputation(model, ids, 21)
    with pytest.raises(LmforgeError, match="the context is 251"):
        engine.generate([ids], SamplingParams(max_new_tokens=22, ignore_eos=True))
