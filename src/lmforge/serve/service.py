"""What the routes share: the served model's name and limits, auth, and turning requests into scheduled sequences.

`Service.submit` hands sequences to the scheduler thread and returns a `Submission` whose events arrive on the
asyncio loop; cancelling it (client gone) frees the rows on the scheduler's next step.
Best-of-n (`best_of` in a request, or the server's `--best-of`; ranked by `--reward`): the candidates are ordinary
sequences, submitted together, so they batch with other traffic through the scheduler (each prefills its own copy
of the prompt there; the engine's shared prefill is for `generate` and `chat`). When all have finished,
`Service.rank` scores them on one reward-model thread, as the policy has its scheduler thread, so the event loop
never waits on a forward pass. This module does not define routes or wire formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError
from lmforge.sampling import SamplingParams
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import APIError, ChatRequest, CompletionRequest
from lmforge.serve.scheduler import Event, Failed, Finished, Scheduler, Sequence
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lmforge.align.reward import RewardScorer

log = logging.getLogger("lmforge.serve")

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


@dataclass
class Limits:
    max_len: int  # tokens of context per sequence (prompt + reply)
    max_body_bytes: int


class Submission:
    """The sequences of one request (n choices, or several prompts) and the events they produce, in order."""

    def __init__(self, scheduler: Scheduler, jobs: list[tuple[list[int], SamplingParams]]) -> None:
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.seqs = [Sequence(ids, p, emit=self._emitter(i)) for i, (ids, p) in enumerate(jobs)]
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
        for seq in self.seqs:
            scheduler.submit(seq)

    def _emitter(self, index: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            # RuntimeError: the event loop has closed (server shutting down), so nobody is listening.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return emit

    async def events(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every sequence has finished. `disconnected`: an async check polled while
        waiting; when it says the client left, the sequences are cancelled and iteration ends."""
        open_ = len(self.seqs)
        while open_:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if disconnected is not None and await disconnected():
                    self.cancel()
                    return
                continue
            if self.first_token is None:
                self.first_token = time.perf_counter()
            if isinstance(event, Finished | Failed):
                open_ -= 1
            yield index, event

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()
        self.scheduler.wake()


class Service:
    def __init__(
        self, scheduler: Scheduler, tokenizer: Tokenizer, model_id: str, limits: Limits, api_key: str | None,
        scorer: RewardScorer | None = None, default_best_of: int = 1,
    ) -> None:
        self.scheduler, self.tokenizer, self.model_id, self.limits = scheduler, tokenizer, model_id, limits
        self._key = api_key.encode() if api_key else None
        self.scorer, self.default_best_of = scorer, default_best_of
        self._scoring = ThreadPoolExecutor(1, thread_name_prefix="lmforge-reward") if scorer else None
        self.metrics = Metrics(lambda: scheduler.occupancy, lambda: scheduler.queue_depth)
        scheduler.on_step = self.metrics.decode_batch.observe
        scheduler.on_cancel = self.metrics.cancelled.inc
        self.created = int(time.time())

    def authorize(self, header: str | None) -> None:
        if self._key is None:
            return
        scheme, _, token = (header or "").partition(" ")
        # compare_digest: the time taken must not reveal how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise APIError(
                401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(
                404,
                f"model {name!r} is not served here; this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def encode_chat(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        try:
            text = self.tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools)
        except LmforgeError as e:
            raise APIError(400, str(e), param="messages") from None
        return self.tokenizer.encode(text)

    def best_of(self, req: ChatRequest | CompletionRequest) -> int | None:
        """How many candidates to sample and rank for req, or None: no ranking, sample its n choices.

        The server's --best-of applies to requests that did not ask, unless they stream or are greedy (it cannot
        apply to those); a request's own best_of > 1 that cannot be honoured is refused."""
        if req.best_of is None:
            if self.default_best_of > 1 and not req.stream and req.temperature > 0:
                return max(self.default_best_of, req.n)
            return None
        if req.best_of < req.n:
            raise APIError(400, f"best_of ({req.best_of}) must be at least n ({req.n})", param="best_of")
        if req.best_of == 1:
            return None
        if req.stream:
            raise APIError(400, "best_of > 1 cannot be streamed: the best candidate is known only when all are "
                           "done; set stream to false", param="best_of")
        if self.scorer is None:
            raise APIError(400, "best_of needs a reward model to rank candidates, and this server has none: start "
                           "it with --reward RM_DIR", param="best_of")
        if req.temperature == 0:
            raise APIError(400, f"best_of {req.best_of} needs sampling: with temperature 0 every candidate is the "
                           "same reply", param="temperature")
        return req.best_of

    async def rank(self, messages: list[dict], replies: list[str], keep: int) -> list[int]:
        """Indices of the `keep` highest-scored replies, best first (ties: the earlier sample)."""
        assert self.scorer is not None and self._scoring is not None
        loop = asyncio.get_running_loop()
        try:
            scores = await loop.run_in_executor(self._scoring, self.scorer.score, messages, replies)
        except LmforgeError as e:  # the reward model's chat template refused these messages
            raise APIError(400, f"the reward model cannot score this conversation: {e}", param="messages") from None
        except Exception:
            log.exception("reward scoring failed")
            raise APIError(500, "internal error while scoring candidates; see the server log") from None
        return sorted(range(len(replies)), key=lambda i: (-scores[i], i))[:keep]

    def sampling(
        self, req: ChatRequest | CompletionRequest, prompt_len: int, max_tokens: int | None, choices: int | None = None
    ) -> list[SamplingParams]:
        """One SamplingParams per choice (`choices`, default req.n), with the reply length fitted to the context."""
        n_ctx = self.limits.max_len
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if prompt_len >= n_ctx:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens but the context is {n_ctx}; shorten it",
                param="messages",
                code="context_length_exceeded",
            )
        if max_tokens is not None and not 1 <= max_tokens <= n_ctx:
            raise APIError(400, f"max_tokens must be between 1 and {n_ctx}, got {max_tokens}", param="max_tokens")
        new = min(max_tokens or n_ctx, n_ctx - prompt_len)
        stop = req.stop_list()
        seeds = [None if req.seed is None else req.seed + i for i in range(choices or req.n)]  # distinct per choice
        return [
            SamplingParams(
                max_new_tokens=new,
                temperature=req.temperature,
                top_k=req.top_k,
                top_p=req.top_p,
                repetition_penalty=req.repetition_penalty,
                ignore_eos=req.ignore_eos,
                seed=seed,
                stop=stop,
            )
            for seed in seeds
        ]

    def submit(self, jobs: list[tuple[list[int], SamplingParams]]) -> Submission:
        return Submission(self.scheduler, jobs)

    def record(self, sub: Submission, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.completion_tokens.inc(completion_tokens)
        now = time.perf_counter()
        self.metrics.ttft.observe((sub.first_token or now) - sub.arrived)
        self.metrics.latency.observe(now - sub.arrived)
