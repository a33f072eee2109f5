"""`lmforge serve` as clients see it: a real server subprocess, the real `openai` client, raw HTTP for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve_server import Server, write_tiny_checkpoint

MODEL = "tiny"
HELLO = [{"role": "user", "content": "你好 hello"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[Server]:
    s = Server(tiny_dir, threads=1)  # a tiny model gains nothing from threads; a shared machine makes them costly
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": MODEL}


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_n_seed_and_stop(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": HELLO, "max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 3}
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    first = a.choices[0].message.content
    if len(first) >= 3:  # stop at a string the seeded reply is known to contain
        cut = client.chat.completions.create(**{**kw, "n": 1, "stop": [first[2:4]]})
        assert cut.choices[0].message.content == first[: first.index(first[2:4])]
        assert cut.choices[0].finish_reason == "stop"


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8
    streamed = client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_auth(tiny_dir: Path) -> None:
    s = Server(tiny_dir, "--api-key", "sesame", threads=1)
    try:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/metrics").status_code == 401
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
        assert httpx.get(s.url + "/health").status_code == 200  # health checks need no key
    finally:
        s.stop()


def test_non_loopback_needs_a_key(tiny_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "serve", "--model", str(tiny_dir), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("lmforge: error: --host 0.0.0.0") and "--api-key" in proc.stderr


def test_sixteen_clients_get_the_single_client_replies(server: Server, client: openai.OpenAI) -> None:
    prompts = [f"{i} 你好 hello {'fox ' * i}" for i in range(16)]

    def ask(prompt: str) -> tuple[str, str]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=48, temperature=0
        )
        return r.choices[0].message.content, r.choices[0].finish_reason

    alone = [ask(p) for p in prompts]
    steps_before = server.metric("lmforge_decode_batch_size_count")
    rows_before = server.metric("lmforge_decode_batch_size_sum")
    together: list[tuple[str, str] | None] = [None] * 16
    start = threading.Barrier(16)

    def worker(i: int) -> None:
        start.wait()
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    steps = server.metric("lmforge_decode_batch_size_count") - steps_before
    rows = server.metric("lmforge_decode_batch_size_sum") - rows_before
    assert rows / steps > 1.5, "the clients were not batched together"


def test_disconnect_frees_the_slot(server: Server) -> None:
    cancelled = server.metric("lmforge_cancelled_sequences_total")
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the stream is running
    deadline = 100
    while server.metric("lmforge_batch_occupancy") and deadline:
        deadline -= 1
        threading.Event().wait(0.05)
    assert server.metric("lmforge_batch_occupancy") == 0
    assert server.metric("lmforge_cancelled_sequences_total") == cancelled + 1  # dropped, not run to the end


def _post(server: Server, content: bytes | str, headers: dict | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers, timeout=30)


def _chat(**fields: object) -> str:
    return json.dumps({"model": MODEL, "messages": HELLO, **fields})


BAD_INPUTS = {
    "malformed JSON": ('{"model": "tiny", "messages": [', 400, None),
    "not an object": ("[1, 2]", 400, None),
    "wrong type": (_chat(temperature="hot"), 400, "temperature"),
    "number as string": (_chat(max_tokens="5"), 400, "max_tokens"),
    "bad role": (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400, None),
    "unknown model": (json.dumps({"model": "gpt-9", "messages": HELLO}), 404, "model"),
    "empty messages": (json.dumps({"model": MODEL, "messages": []}), 400, "messages"),
    "prompt over the context": (
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello " * 5000}]}),
        400,
        "messages",
    ),
    "negative max_tokens": (_chat(max_tokens=-1), 400, "max_tokens"),
    "huge max_tokens": (_chat(max_tokens=10**9), 400, "max_tokens"),
    "too many stops": (_chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    "invalid UTF-8": (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    "body too large": ('{"model": "tiny", "pad": "' + "x" * (5 * 2**20) + '"}', 413, None),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(server: Server, client: openai.OpenAI, case: str) -> None:
    content, status, param = BAD_INPUTS[case]
    r = _post(server, content)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and {"param", "code"} <= error.keys()
    if param:
        assert error["param"] == param
    ok = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # still serving
    assert ok.choices[0].message.role == "assistant"


def test_context_error_is_openai_shaped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 5000}])
    assert e.value.body["code"] == "context_length_exceeded" and "context is 4096" in e.value.body["message"]


def test_unknown_route_is_openai_shaped(server: Server) -> None:
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
