"""The engine against plain recomputation: cached decoding, batching, streaming, stop strings, context limits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge import kernels
from lmforge.engine import Engine, Stats, TextStream
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer

PROMPTS = ["Hello, how are you", "你好，今天", "The quick brown fox jumps over the lazy dog and", "机"]


def greedy_by_recomputation(model: Transformer, ids: list[int], n: int) -> list[int]:
    """The reference: run the whole sequence through the model for every new token, no cache."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids) :]


def engine_for(model: Transformer, tok: Tokenizer, **kw: object) -> Engine:
    return Engine(copy.deepcopy(model), tok, **kw)


def test_cached_decoding_equals_recomputation(tiny_model: Transformer, tiny_tokenizer: Tokenizer) -> None:
    engine = engine_for(tiny_model, tiny_tokenizer)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for prompt in PROMPTS:
        ids = tiny_tokenizer.encode(prompt)
        [got] = engine.generate([ids], params)
        assert got.token_ids == greedy_by_recomputation(tiny_model, ids, 24)


def test_batched_equals_one_by_one(tiny_model: Transformer, tiny_tokenizer: Tokenizer) -> None:
    engine = engine_for(tiny_model, tiny_tokenizer)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS]
    batched = engine.generate(prompts, params)
    for ids, result in zip(prompts, batched, strict=True):
        assert result.token_ids == greedy_by_recomputation(tiny_model, ids, 20)
        assert result.stats.finish_reason == "length"


def test_one_prompt_n_times_is_prefilled_once_with_the_same_output(
    tiny_model: Transformer, tiny_tokenizer: Tokenizer
) -> None:
    engine = engine_for(tiny_model, tiny_tokenizer)
    ids = tiny_tokenizer.encode(PROMPTS[2])
    ran: list[int] = []  # tokens in each forward call
    engine.model.register_forward_pre_hook(lambda _, args: ran.append(args[0].numel()))
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, ignore_eos=True)
    runs = {}
    for name, params in (("greedy", greedy), ("sampled", sampled)):
        for share in (True, False):
            ran.clear()
            runs[name, share] = engine.generate([ids] * 4, params, share_prompt=share)
            assert ran[0] == (1 if share else 4) * len(ids)  # the prefill forward
            cached = [c.stats.cached_tokens for c in runs[name, share]]
            assert cached == ([0] + [len(ids)] * 3 if share else [0] * 4)
        shared, separate = runs[name, True], runs[name, False]
        assert [c.token_ids for c in shared] == [c.token_ids for c in separate]
        assert [c.text for c in shared] == [c.text for c in separate]
    reference = greedy_by_recomputation(tiny_model, ids, 12)  # every copied row decodes as the prefilled one
    assert all(c.token_ids == reference for c in runs["greedy", True])
    assert len({tuple(c.token_ids) for c in runs["sampled", True]}) > 1  # the rows really sample apart


def test_streamed_text_equals_final_text(tiny_model: Transformer, tiny_tokenizer: Tokenizer) -> None:
    engine = engine_for(tiny_model, tiny_tokenizer)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ids = tiny_tokenizer.encode("北京是中国的")
    pieces = list(engine.stream(ids, params))
    reference = greedy_by_recomputation(tiny_model, ids, 40)
    assert "".join(pieces) == tiny_tokenizer.decode(reference)
    assert len(pieces) > 1


def test_stream_reuses_prefix_and_matches_fresh_run(tiny_model: Transformer, tiny_tokenizer: Tokenizer) -> None:
    engine = engine_for(tiny_model, tiny_tokenizer)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    first = tiny_tokenizer.encode("Hello, how are you today?")
    list(engine.stream(first, params))
    second = first + tiny_tokenizer.encode(" I am fine")
    stats = Stats()
    text = "".join(engine.stream(second, params, stats))
    assert stats.cached_tokens == len(first)
    assert text == tiny_tokenizer.decode(greedy_by_recomputation(tiny_model, second, 8))


def test_sampling_is_reproducible_with_a_seed(tiny_model: Transformer, tiny_tokenizer: Tokenizer) -> None:
    engine = engine_for(tiny_model, tiny_tokenizer)
    ids = tiny_tokenizer.encode("Hello")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    a = "".join(engine.stream(ids, params))
    b = "".join(engine.stream(ids, params))
    c = "".join(engine.stream(ids, SamplingParams(**{**params.__dict__, "seed": 8})))
    assert a == b
    assert a != c


def test_eos_stops_generation(tiny_model: Transformer, tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("Hello")
    greedy = greedy_by_recomputation(tiny_model, ids, 12)
    # Declare the first greedy token that did not occur before it the end of the reply.
    end = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    tok = copy.copy(tiny_tokenizer)
    tok.eos_token_ids = [greedy[end]]
    stats = Stats()
    text = "".join(engine_for(tiny_model, tok).stream(ids, SamplingParams(max_new_tokens=20), stats))
    assert stats.finish_reason == "stop"
    assert stats.completion_tokens == end + 1
    assert text == tiny_tokenizer.decode(greedy[:end])


def test_stop_string_is_never_emitted(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("Hello, how are you today? I am fine")
    stream = TextStream(tiny_tokenizer, stop=["are you"])
    pieces = [stream.push(t) for t in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == "Hello, how "
    assert stream.stopped


def test_stop_string_prefix_is_released_when_it_does_not_complete(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("the quick brown fox")
    stream = TextStream(tiny_tokenizer, stop=["quick brown cat"])
    text = "".join(stream.push(t) for t in ids) + stream.finish()
    assert text == "the quick brown fox"
    assert not stream.stopped


def test_prompt_over_the_context_is_refused(tiny_model: Transformer, tiny_tokenizer: Tokenizer) -> None:
    engine = engine_for(tiny_model, tiny_tokenizer, max_len=32)
    with pytest.raises(LmforgeError, match=r"needs \d+ tokens but the context is 32"):
        list(engine.stream(list(range(40)), SamplingParams(max_new_tokens=4)))


def test_generation_ends_at_the_context_limit(tiny_model: Transformer, tiny_tokenizer: Tokenizer) -> None:
    engine = engine_for(tiny_model, tiny_tokenizer, max_len=32)
    stats = Stats()
    list(engine.stream(list(range(1, 21)), SamplingParams(max_new_tokens=100, ignore_eos=True), stats))
    assert stats.finish_reason == "length"
    assert stats.prompt_tokens + stats.completion_tokens == 33  # the last token needs no cache slot


def test_empty_prompt_is_refused(tiny_model: Transformer, tiny_tokenizer: Tokenizer) -> None:
    with pytest.raises(LmforgeError, match="empty"):
        list(engine_for(tiny_model, tiny_tokenizer).stream([], SamplingParams()))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize(("n", "k"), [(96, 64), (37, 45), (600, 520)])  # tails in both dimensions, several K tiles
def test_native_stacked_linear_equals_torch(bias: bool, rows: int, n: int, k: int) -> None:
    if kernels.library() is None:
        pytest.skip("native kernels unavailable here")
    torch.manual_seed(0)
    parts = [nn.Linear(k, n, bias=bias), nn.Linear(k, 3, bias=bias), nn.Linear(k, n // 2, bias=bias)]
    x = torch.randn(1, rows, k)
    with torch.no_grad():
        plan = kernels.LinearPlan([p.weight for p in parts], [p.bias for p in parts])
        expected = torch.cat([p(x) for p in parts], dim=-1)
        torch.testing.assert_close(kernels.linear(x, plan), expected, rtol=1e-5, atol=1e-5)


def test_native_rms_norm_equals_torch() -> None:
    if kernels.library() is None:
        pytest.skip("native kernels unavailable here")
    x, w = torch.randn(3, 1, 200) * 4, torch.randn(200)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), torch.nn.functional.rms_norm(x, (200,), w, 1e-6))


def test_decode_step_compiles_with_native_kernels() -> None:
    """The fast path's kernels are opaque custom ops to torch.compile: one graph, same logits as plain eager."""
    from lmforge.fastpath import prepare_for_decode
    from lmforge.model import KVCache, Positions
    from tests.tiny import make_tiny_model

    plain = make_tiny_model("qwen2-tiny")
    fast = prepare_for_decode(copy.deepcopy(plain).requires_grad_(False))
    ids = torch.randint(0, plain.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))

    def run(model: Transformer, step: object) -> torch.Tensor:
        cache = KVCache.allocate(plain.cfg, 2, 64, torch.float32, torch.device("cpu"))
        outs = [model(ids, Positions.make(torch.arange(8)), cache, keep=-1)]
        for i in range(8, 11):  # rows at different positions
            outs.append(step(ids[:, i - 8 : i - 7], Positions.make(torch.tensor([[i], [i - 1]])), cache, keep=-1))
        return torch.cat(outs, 1)

    with torch.inference_mode():
        expected = run(plain, plain)
        got = run(fast, torch.compile(fast, fullgraph=True, dynamic=True))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_two_engines_can_share_one_model(tiny_tokenizer, tiny_model) -> None:  # noqa: ANN001
    model = tiny_model
    params = SamplingParams(max_new_tokens=6, temperature=0)
    ids = tiny_tokenizer.encode("hello 你好")
    first = Engine(model, tiny_tokenizer).generate([ids], params)[0].token_ids
    assert Engine(model, tiny_tokenizer).generate([ids], params)[0].token_ids == first
