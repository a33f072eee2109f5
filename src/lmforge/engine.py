"""The inference engine: prefill and decode over a preallocated KV cache, streaming text out.

- `Engine.stream` runs one conversation: it keeps that conversation's cache between calls and re-uses the longest
  common token prefix, so a chat turn only prefills the new message.
- `Engine.generate` runs a batch of prompts of different lengths together; each row sits at its own positions
  in one shared cache (see `model.Positions`), so no row is padded and rows never see each other. N copies of one
  prompt (best-of-n sampling) are prefilled once, in row 0, and its keys/values copied into the other rows.
The decode step keeps shapes static apart from the attended cache length. Text comes out through
`TextStream`, which never emits a broken UTF-8 character or any part of a stop string.
This module does not load models, render chat templates or schedule requests from many clients.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.fastpath import prepare_for_decode
from lmforge.model import KVCache, Positions, Transformer
from lmforge.sampling import SamplingParams, sample, seeded_generator
from lmforge.tokenizer import StreamDecoder, Tokenizer

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds activation memory on long prompts


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values were already in the cache
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"

    @property
    def prefill_tps(self) -> float:
        return (self.prompt_tokens - self.cached_tokens) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # The first token comes out of prefill; decode steps produce the rest.
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s and self.completion_tokens > 1 else 0.0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    stats: Stats


@dataclass
class TextStream:
    """Token ids in, safe text out: holds back incomplete UTF-8 and anything that may begin a stop string."""

    tokenizer: Tokenizer
    stop: list[str]
    text: str = ""  # everything decoded so far
    emitted: int = 0  # characters of `text` already handed out
    stopped: bool = False
    _decoder: StreamDecoder = field(init=False)

    def __post_init__(self) -> None:
        self._decoder = self.tokenizer.stream_decoder()

    def push(self, token_id: int) -> str:
        self.text += self._decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
                final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(out)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_len: int | None = None) -> None:
        self.model = prepare_for_decode(model.eval().requires_grad_(False))
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        # A P-Tuning prefix occupies the first cache slots and shifts the tokens' positions by as many.
        self.prefix_slots = model.prefix_len
        self.max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len - self.prefix_slots)
        self.param = next(model.parameters())
        self._cache: KVCache | None = None
        self._cached_ids: list[int] = []  # tokens whose keys/values sit in row 0 of the cache, for `stream`

    # --- cache ---------------------------------------------------------------------------------------------------

    def _cache_for(self, batch: int, length: int) -> KVCache:
        """A cache with `batch` rows and room for `length` tokens; grows by doubling, keeping row contents."""
        if length > self.max_len:
            raise LmforgeError(
                f"the conversation needs {length} tokens but the context is {self.max_len}; "
                "shorten the prompt, lower max_new_tokens, or start a new conversation"
            )
        c = self._cache
        if c is not None and c.k[0].shape[0] == batch and c.max_len >= length + self.prefix_slots:
            return c
        size = 256
        while size < length:
            size *= 2
        slots = min(size, self.max_len) + self.prefix_slots
        new = KVCache.allocate(self.cfg, batch, slots, self.param.dtype, self.param.device)
        if c is not None and c.k[0].shape[0] == batch:
            for old_buf, new_buf in zip(c.k + c.v, new.k + new.v, strict=True):
                new_buf[:, :, : old_buf.shape[2]] = old_buf
        else:
            self._cached_ids = []
        self._cache = new
        return new

    def reset(self) -> None:
        self._cached_ids = []

    # --- forward steps -------------------------------------------------------------------------------------------

    def _prefill(self, ids: list[int], start: int, cache: KVCache) -> Tensor:
        """Run prompt tokens ids[start:] for row 0 at their positions; return the last logits (1, V)."""
        logits = None
        device = self.param.device
        for lo in range(start, len(ids), PREFILL_CHUNK):
            hi = min(lo + PREFILL_CHUNK, len(ids))
            x = torch.tensor([ids[lo:hi]], device=device)
            logits = self.model(x, Positions.make(torch.arange(lo, hi, device=device)), cache, keep=-1)
        assert logits is not None
        return logits[:, -1]

    def _decode(self, tokens: Tensor, pos: Tensor, cache: KVCache) -> Tensor:
        """One token per row: tokens (B,), pos (1,) shared or (B, 1) per row; returns logits (B, V)."""
        return self.model(tokens[:, None], Positions.make(pos), cache, keep=-1)[:, -1]

    # --- one conversation, streamed ------------------------------------------------------------------------------

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams, stats: Stats | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated; fill `stats` as it goes. Re-uses the cached prefix."""
        if not prompt_ids:
            raise LmforgeError("the prompt is empty")
        stats = stats if stats is not None else Stats()
        cache = self._cache_for(1, len(prompt_ids) + 1)
        # Keep at least one prompt token to run, since its logits start the reply.
        keep = _common_prefix(self._cached_ids, prompt_ids[:-1])
        self._cached_ids = list(prompt_ids[:keep])
        stats.prompt_tokens, stats.cached_tokens = len(prompt_ids), keep
        generator = seeded_generator(params.seed, self.param.device)
        text = TextStream(self.tokenizer, params.stop)
        history = torch.tensor([prompt_ids], device=self.param.device)

        t0 = time.perf_counter()
        logits = self._prefill(prompt_ids, keep, cache)
        self._cached_ids = list(prompt_ids)
        stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            if stats.completion_tokens >= params.max_new_tokens:
                stats.finish_reason = "length"
                break
            token = sample(logits, params, history, generator)
            tid = int(token)
            stats.completion_tokens += 1
            if tid in self.tokenizer.eos_token_ids and not params.ignore_eos:
                stats.finish_reason = "stop"
                break
            piece = text.push(tid)
            if piece:
                yield piece
            if text.stopped:
                stats.finish_reason = "stop"
                break
            pos = len(self._cached_ids)
            if pos + 1 > self.max_len:
                stats.finish_reason = "length"
                break
            cache = self._cache_for(1, pos + 1)
            history = torch.cat([history, token[:, None]], dim=1)
            logits = self._decode(token, torch.tensor([pos], device=self.param.device), cache)
            self._cached_ids.append(tid)
            stats.decode_s = time.perf_counter() - t0
        tail = text.finish()
        if tail:
            yield tail
        stats.decode_s = time.perf_counter() - t0

    # --- a batch of independent prompts --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, share_prompt: bool = True
    ) -> list[Completion]:
        """Complete every prompt; rows advance together, each at its own positions.

        When every prompt is the same and `share_prompt` is set, the prompt runs through the model once and rows
        1..B-1 count it as cached tokens; `share_prompt=False` prefills every row (the reference for tests).
        """
        if not prompts or any(not p for p in prompts):
            raise LmforgeError("every prompt must have at least one token")
        self.reset()  # the shared cache is about to be overwritten
        device = self.param.device
        b = len(prompts)
        lengths = [len(p) for p in prompts]
        cache = self._cache_for(b, max(lengths) + params.max_new_tokens)
        streams = [TextStream(self.tokenizer, params.stop) for _ in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        stats = [Stats(prompt_tokens=n) for n in lengths]
        generator = seeded_generator(params.seed, device)
        shared = share_prompt and b > 1 and all(p == prompts[0] for p in prompts)

        t0 = time.perf_counter()
        if shared:
            logits = self._prefill_shared(prompts[0], b, cache)
            for s in stats[1:]:
                s.cached_tokens = s.prompt_tokens
        else:
            logits = self._prefill_rows(prompts, cache)
        t_prefill = time.perf_counter() - t0
        history = _padded(prompts, device)
        pos = torch.tensor(lengths, device=device)[:, None]  # (B, 1): next position of each row
        done = [params.max_new_tokens == 0] * b
        t0 = time.perf_counter()
        while not all(done):
            tokens = sample(logits, params, history, generator)
            for i, tid in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                outs[i].append(tid)
                if tid in self.tokenizer.eos_token_ids and not params.ignore_eos:
                    done[i], stats[i].finish_reason = True, "stop"
                    continue
                streams[i].push(tid)
                if streams[i].stopped:
                    done[i], stats[i].finish_reason = True, "stop"
                elif len(outs[i]) >= params.max_new_tokens:
                    done[i], stats[i].finish_reason = True, "length"
            if all(done):
                break
            history = torch.cat([history, tokens[:, None]], dim=1)
            logits = self._decode(tokens, pos, cache)
            pos = pos + 1
        t_decode = time.perf_counter() - t0
        results = []
        for i, s in enumerate(streams):
            s.finish()
            stats[i].completion_tokens, stats[i].prefill_s, stats[i].decode_s = len(outs[i]), t_prefill, t_decode
            stats[i].finish_reason = stats[i].finish_reason or "length"
            results.append(Completion(s.text, outs[i], stats[i]))
        return results

    def _prefill_rows(self, prompts: list[list[int]], cache: KVCache) -> Tensor:
        """Prefill rows of different lengths in one forward (right-padded); return each row's last logits (B, V).

        Padding tokens write keys/values past their row's end; those slots are overwritten by the row's own
        decode steps before any query can see them.
        """
        device = self.param.device
        t = max(len(p) for p in prompts)
        ids = _padded(prompts, device, width=t)
        pos = torch.arange(t, device=device).expand(len(prompts), t).contiguous()
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        return self.model(ids, Positions.make(pos), cache, keep=last)[:, 0]

    def _prefill_shared(self, ids: list[int], rows: int, cache: KVCache) -> Tensor:
        """Prefill one prompt in row 0, copy its keys/values (and any P-Tuning prefix) into rows 1..rows-1;
        return the last logits repeated per row (rows, V)."""
        first = KVCache(k=[t[:1] for t in cache.k], v=[t[:1] for t in cache.v])  # views: writes land in row 0
        logits = self._prefill_rows([ids], first)
        end = self.prefix_slots + len(ids)
        for buf in cache.k + cache.v:  # (B, kv_heads, max_len, head_dim)
            buf[1:rows, :, :end] = buf[:1, :, :end]
        return logits.repeat(rows, 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _padded(rows: list[list[int]], device: torch.device, width: int | None = None) -> Tensor:
    """(B, width) ids, right-padded by repeating each row's last token (a real id, so embeddings stay valid)."""
    width = width or max(len(r) for r in rows)
    return torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=device)
