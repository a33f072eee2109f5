"""Continuous batching: one thread owns the model and interleaves many requests' prefill and decode steps.

Each loop iteration the scheduler
1. drops cancelled sequences (their rows free at once) and admits the next queued one into a staging row;
2. runs one prefill chunk of the staged sequence, and when its prompt is done samples its first token and moves
   its keys/values into a free row of the slot pool;
3. runs one decode step for every row of the pool, each at its own position, samples each row with its own
   `SamplingParams` and generator, and retires finished rows.
Occupied rows stay packed at the front of the pool (a retired row's hole is filled by moving the last row into
it), so a decode group is a plain slice of the cache, with no gather.

Batch invariance: greedy output must not depend on what else is running. Prefill always runs alone with the same
chunk boundaries, and decode runs in groups of at most `kernels.MAX_ROWS` rows when the native kernels serve the
model; those kernels compute each row's dot products, norms and attention in the same order whatever the batch,
so a row's logits are bit-identical to a single-row run. Without them (other devices, LMFORGE_NATIVE=0) all rows
decode as one batch, which is faster there but may differ from single-row runs in the last bits.
This module does not parse HTTP, render chat templates or count metrics; it reports through callbacks.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge import kernels
from lmforge.engine import TextStream
from lmforge.fastpath import prepare_for_decode
from lmforge.model import KVCache, Positions, Transformer
from lmforge.sampling import SamplingParams, sample, seeded_generator
from lmforge.tokenizer import Tokenizer

log = logging.getLogger("lmforge.serve")

PREFILL_CHUNK = 128  # tokens per prefill step: fixed (results must not depend on load) and short (decoders wait)


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass
class Sequence:
    """One generation: a prompt, its sampling settings and where its events go (called on the scheduler thread)."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: bool = False  # set by any thread; the scheduler frees the row on its next step
    output_ids: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose keys/values are in the cache
    text: TextStream | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int,
        max_len: int,
        on_step: Callable[[int], None] | None = None,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self.model = prepare_for_decode(model.eval().requires_grad_(False))
        self.tokenizer = tokenizer
        self.max_batch, self.max_len = max_batch, max_len
        self.on_step = on_step  # called with the decode batch size after each decode step
        self.on_cancel = on_cancel  # called for each sequence dropped before it finished
        param = next(self.model.parameters())
        self.device = param.device
        # A P-Tuning adapter's keys/values take the first slots of every row; the model writes them itself.
        self.prefix = model.prefix_len
        slots = self.prefix + max_len
        self.pool = KVCache.allocate(model.cfg, max_batch, slots, param.dtype, param.device)
        self.staging = KVCache.allocate(model.cfg, 1, slots, param.dtype, param.device)
        native = param.device.type == "cpu" and param.dtype == torch.float32 and kernels.library() is not None
        self.group = kernels.MAX_ROWS if native else max_batch
        self.rows: list[Sequence] = []  # rows[i] sits in pool row i
        self.waiting: deque[Sequence] = deque()
        self._prefilling: Sequence | None = None
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)

    # --- called from other threads -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join()

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            self.waiting.append(seq)
            self._wake.notify()

    def wake(self) -> None:
        """Prompt the loop to look at cancellations now rather than after its next step."""
        with self._wake:
            self._wake.notify()

    @property
    def occupancy(self) -> int:
        return len(self.rows) + (self._prefilling is not None)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # --- the loop ------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not (self.waiting or self.rows or self._prefilling):
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # a bug or out-of-memory: fail everyone in flight, keep serving new requests
                log.exception("scheduler step failed")
                self._fail_all("internal error while generating; see the server log")

    @torch.inference_mode()
    def step(self) -> None:
        self._drop_cancelled()
        if self._prefilling is None and self.waiting and len(self.rows) < self.max_batch:
            self._prefilling = self.waiting.popleft()
            self._prefilling.length = 0
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)
        if self.rows:
            self._decode()

    def _drop_cancelled(self) -> None:
        with self._wake:
            dropped = [s for s in self.waiting if s.cancelled]
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        if self._prefilling is not None and self._prefilling.cancelled:
            dropped.append(self._prefilling)
            self._prefilling = None
        for seq in [s for s in self.rows if s.cancelled]:
            dropped.append(seq)
            self._retire(seq)
        if self.on_cancel is not None:
            for _ in dropped:
                self.on_cancel()

    def _prefill_chunk(self, seq: Sequence) -> None:
        lo = seq.length
        hi = min(lo + PREFILL_CHUNK, len(seq.prompt_ids))
        x = torch.tensor([seq.prompt_ids[lo:hi]], device=self.device)
        logits = self.model(x, Positions.make(torch.arange(lo, hi, device=self.device)), self.staging, keep=-1)
        seq.length = hi
        if hi < len(seq.prompt_ids):
            return
        self._prefilling = None
        row = len(self.rows)
        end = self.prefix + hi
        for staged, pooled in zip(self.staging.k + self.staging.v, self.pool.k + self.pool.v, strict=True):
            pooled[row, :, :end] = staged[0, :, :end]
        self.rows.append(seq)
        seq.text = TextStream(self.tokenizer, seq.params.stop)
        seq.generator = seeded_generator(seq.params.seed, self.device)
        if seq.params.max_new_tokens == 0:
            self._finish(seq, "length")
            return
        self._accept(seq, self._sample(seq, logits[:, -1]))

    def _decode(self) -> None:
        rows = list(self.rows)
        tokens = torch.tensor([s.output_ids[-1] for s in rows], device=self.device)
        pos = torch.tensor([[s.length] for s in rows], device=self.device)  # (B, 1): each row's next position
        logits = torch.cat([self._decode_group(tokens, pos, lo) for lo in range(0, len(rows), self.group)])
        for seq in rows:
            seq.length += 1
        if self.on_step is not None:
            self.on_step(len(rows))
        for i, seq in enumerate(rows):
            self._accept(seq, self._sample(seq, logits[i : i + 1]))

    def _decode_group(self, tokens: Tensor, pos: Tensor, lo: int) -> Tensor:
        """One decode step for pool rows [lo, lo + group): a slice of the pool, no copies. Returns logits (b, V)."""
        hi = min(lo + self.group, len(tokens))
        cache = KVCache(k=[t[lo:hi] for t in self.pool.k], v=[t[lo:hi] for t in self.pool.v])
        return self.model(tokens[lo:hi, None], Positions.make(pos[lo:hi]), cache, keep=-1)[:, -1]

    def _sample(self, seq: Sequence, logits: Tensor) -> int:
        p = seq.params
        history = torch.tensor([seq.prompt_ids + seq.output_ids] if p.repetition_penalty != 1.0 else [[]])
        return int(sample(logits, p, history.to(self.device, torch.long), seq.generator))

    def _accept(self, seq: Sequence, tid: int) -> None:
        """Record a sampled token: emit its text, or finish the sequence."""
        seq.output_ids.append(tid)
        assert seq.text is not None
        if tid in self.tokenizer.eos_token_ids and not seq.params.ignore_eos:
            self._finish(seq, "stop")
            return
        piece = seq.text.push(tid)
        if piece:
            seq.emit(Delta(piece))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.length >= self.max_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        assert seq.text is not None
        tail = seq.text.finish()
        if tail:
            seq.emit(Delta(tail))
        seq.emit(Finished(reason, len(seq.prompt_ids), len(seq.output_ids)))
        self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        """Free seq's row; the last row moves into the hole so that occupied rows stay packed."""
        row = self.rows.index(seq)
        last = self.rows.pop()
        if last is not seq:
            end = self.prefix + last.length
            for buf in self.pool.k + self.pool.v:
                buf[row, :, :end] = buf[len(self.rows), :, :end]
            self.rows[row] = last

    def _fail_all(self, message: str) -> None:
        with self._wake:
            victims = [*self.rows, *self.waiting] + ([self._prefilling] if self._prefilling else [])
            self.rows, self.waiting, self._prefilling = [], deque(), None
        for seq in victims:
            seq.emit(Failed(message))
