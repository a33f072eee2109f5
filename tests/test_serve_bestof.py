"""Best-of-n through `lmforge serve`: the real `openai` client against a server with `--reward` (and a default
`--best-of 2`) and one without. The candidates are what the plain server returns for n = best_of with the same seed
(choice i is sampled with seed + i on both), scored here with the same reward model, one reply at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from lmforge.align.reward import RewardScorer
from tests.serve_server import Server, write_tiny_checkpoint
from tests.tiny import write_tiny_reward_model

MODEL = "tiny"
HELLO = [{"role": "user", "content": "你好 hello"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serve-bestof")
    return write_tiny_checkpoint(root / MODEL), write_tiny_reward_model(root / "rm")


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ranked(dirs: tuple[Path, Path]) -> Iterator[openai.OpenAI]:
    s = Server(dirs[0], "--reward", str(dirs[1]), "--best-of", "2", threads=1)
    yield _client(s)
    s.stop()


@pytest.fixture(scope="module")
def plain(dirs: tuple[Path, Path]) -> Iterator[openai.OpenAI]:
    s = Server(dirs[0], threads=1)
    yield _client(s)
    s.stop()


@pytest.fixture(scope="module")
def scorer(dirs: tuple[Path, Path]) -> RewardScorer:
    return RewardScorer(dirs[1], device="cpu")


def best_first(scorer: RewardScorer, messages: list[dict], replies: list[str]) -> list[int]:
    scores = [scorer.score(messages, [r])[0] for r in replies]
    return sorted(range(len(replies)), key=lambda i: -scores[i])


def test_chat_best_of_returns_the_best_n(ranked: openai.OpenAI, plain: openai.OpenAI, scorer: RewardScorer) -> None:
    kw = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 1.0, "seed": 11}
    every = plain.chat.completions.create(**kw, n=4)
    texts = [c.message.content for c in every.choices]
    order = best_first(scorer, HELLO, texts)
    assert order[:2] != [0, 1]  # this seed's ranking reorders the samples, so keeping the first ones would fail
    got = ranked.chat.completions.create(**kw, n=2, extra_body={"best_of": 4})
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.message.content for c in got.choices] == [texts[i] for i in order[:2]]
    assert got.usage.completion_tokens == every.usage.completion_tokens  # every candidate's tokens count
    assert got.usage.prompt_tokens == every.usage.prompt_tokens
    # The server's --best-of 2 applies to a sampled request that does not say: the better of seeds 11 and 12,
    # with both candidates' tokens counted.
    default = ranked.chat.completions.create(**kw)
    assert default.choices[0].message.content == texts[best_first(scorer, HELLO, texts[:2])[0]]
    assert default.usage.completion_tokens == plain.chat.completions.create(**kw, n=2).usage.completion_tokens


def test_completions_best_of_per_prompt(ranked: openai.OpenAI, plain: openai.OpenAI, scorer: RewardScorer) -> None:
    prompts = ["The quick brown", "北京是中国的"]
    kw = {"model": MODEL, "prompt": prompts, "max_tokens": 6, "temperature": 1.0, "seed": 5}
    every = plain.completions.create(**kw, n=3)
    texts = [c.text for c in sorted(every.choices, key=lambda c: c.index)]
    got = ranked.completions.create(**kw, best_of=3)
    assert [c.index for c in got.choices] == [0, 1]
    for p, prompt in enumerate(prompts):  # the reward model reads a raw prompt as one user message
        group = texts[3 * p : 3 * p + 3]
        assert got.choices[p].text == group[best_first(scorer, [{"role": "user", "content": prompt}], group)[0]]
    assert got.usage.completion_tokens == every.usage.completion_tokens


def test_requests_that_cannot_be_ranked_are_refused(ranked: openai.OpenAI, plain: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "temperature": 1.0}
    cases = [
        (ranked, {"stream": True, "extra_body": {"best_of": 2}}, "best_of", "stream"),
        (ranked, {"extra_body": {"best_of": 2}, "temperature": 0}, "temperature", "temperature 0"),
        (ranked, {"n": 3, "extra_body": {"best_of": 2}}, "best_of", "at least n"),
        (plain, {"extra_body": {"best_of": 2}}, "best_of", "--reward"),
    ]
    for client, extra, param, said in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{**kw, **extra})
        assert e.value.status_code == 400 and e.value.body["param"] == param and said in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        ranked.completions.create(model=MODEL, prompt="hi", max_tokens=4, best_of=2, stream=True)
    assert e.value.body["param"] == "best_of"
    # The server default never turns a stream or a greedy request into an error.
    streamed = ranked.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert ranked.chat.completions.create(**{**kw, "temperature": 0}).choices[0].message.content
