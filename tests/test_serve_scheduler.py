"""The continuous-batching scheduler in-process: batched greedy output equals single-row output, rows recycle."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lmforge import kernels
from lmforge.engine import Engine
from lmforge.sampling import SamplingParams
from lmforge.serve.scheduler import Delta, Event, Failed, Finished, Scheduler, Sequence
from tests.tiny import make_tiny_model, make_tiny_tokenizer


class Collector:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.end: Event | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Delta):
            self.text.append(event.text)
        else:
            self.end = event


def run(
    scheduler: Scheduler, jobs: list[tuple[list[int], SamplingParams]]
) -> list[tuple[str, Event | None, list[int]]]:
    """Submit every job at once and step until all finish (the loop thread is never started)."""
    collectors = [Collector() for _ in jobs]
    seqs = [Sequence(ids, p, c) for (ids, p), c in zip(jobs, collectors, strict=True)]
    for s in seqs:
        scheduler.submit(s)
    while any(c.end is None for c in collectors):
        scheduler.step()
    return [("".join(c.text), c.end, s.output_ids) for c, s in zip(collectors, seqs, strict=True)]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # A tiny model gains nothing from threads, and waking OpenMP threads costs milliseconds on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup() -> tuple[Scheduler, list[list[int]]]:
    tok = make_tiny_tokenizer()
    scheduler = Scheduler(make_tiny_model("qwen2-tiny"), tok, max_batch=12, max_len=256)
    prompts = [tok.encode(f"{i} hello 你好 " + "fox " * (i * 3)) for i in range(20)]
    return scheduler, prompts


def test_batched_greedy_equals_single(setup: tuple[Scheduler, list[list[int]]]) -> None:
    scheduler, prompts = setup
    # Different lengths make rows finish at different steps, so rows are retired and refilled mid-run.
    jobs = [
        (p, SamplingParams(max_new_tokens=8 + 3 * (i % 5), temperature=0, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    batch_sizes: list[int] = []
    scheduler.on_step = batch_sizes.append
    together = run(scheduler, jobs)
    alone = [run(scheduler, [job])[0] for job in jobs]
    assert [r[2] for r in together] == [r[2] for r in alone]
    assert [r[0] for r in together] == [r[0] for r in alone]
    assert max(batch_sizes) == 12  # the pool filled up, beyond one kernel group when native kernels serve
    if kernels.library() is not None:
        assert scheduler.group == kernels.MAX_ROWS


def test_single_row_matches_the_engine(setup: tuple[Scheduler, list[list[int]]]) -> None:
    """The scheduler's prefill-then-decode path computes what Engine.generate computes for one prompt."""
    scheduler, prompts = setup
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    engine = Engine(make_tiny_model("qwen2-tiny"), make_tiny_tokenizer())
    assert run(scheduler, [(prompts[3], params)])[0][2] == engine.generate([prompts[3]], params)[0].token_ids


def test_seeded_sampling_ignores_neighbours(setup: tuple[Scheduler, list[list[int]]]) -> None:
    scheduler, prompts = setup
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    noisy = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    alone = run(scheduler, [(prompts[0], seeded)])[0][2]
    crowd = run(scheduler, [(prompts[1], noisy), (prompts[0], seeded), (prompts[2], noisy)])[1][2]
    assert crowd == alone


def test_finish_reasons_and_limits(setup: tuple[Scheduler, list[list[int]]]) -> None:
    scheduler, prompts = setup
    ((text, end, ids),) = run(
        scheduler, [(prompts[0], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))]
    )
    assert isinstance(end, Finished) and end.reason == "length" and end.completion_tokens == 5 == len(ids)
    # The context bounds a reply even when max_new_tokens does not.
    long = SamplingParams(max_new_tokens=10_000, temperature=0, ignore_eos=True)
    ((_, end, ids),) = run(scheduler, [(prompts[0], long)])
    assert isinstance(end, Finished) and end.reason == "length" and len(prompts[0]) + len(ids) == 256 + 1


def test_cancel_frees_the_row_at_once(setup: tuple[Scheduler, list[list[int]]]) -> None:
    scheduler, prompts = setup
    c = Collector()
    seq = Sequence(prompts[0], SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True), c)
    scheduler.submit(seq)
    scheduler.step()
    scheduler.step()
    assert scheduler.occupancy == 1
    seq.cancel()
    scheduler.step()
    assert scheduler.occupancy == 0 and c.end is None and len(seq.output_ids) < 100


def test_a_failing_step_fails_requests_not_the_loop(setup: tuple[Scheduler, list[list[int]]]) -> None:
    scheduler, prompts = setup
    c = Collector()
    scheduler._fail_all("boom")  # noqa: SLF001 - what the loop calls when a step raises
    scheduler.submit(Sequence(prompts[0], SamplingParams(max_new_tokens=3, temperature=0), c))
    scheduler._fail_all("boom")  # noqa: SLF001
    assert isinstance(c.end, Failed) and scheduler.occupancy == 0 and scheduler.queue_depth == 0
    assert torch.is_inference_mode_enabled() is False
