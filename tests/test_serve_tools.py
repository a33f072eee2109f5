"""Tool calling: prompt planning and call parsing by hand, then a round trip through the real Qwen chat template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from lmforge.serve.tools import OPEN, ToolCallSplitter, parse_calls, plan_tools
from tests.serve_server import Server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def test_parse_tagged_calls() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "巴黎"}}\n</tool_call>'
    content, calls = parse_calls(text, {"get_weather"})
    assert content == "Let me check."
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "巴黎"}


def test_parse_two_calls_and_an_unclosed_last_one() -> None:
    text = f'{OPEN}{{"name": "a", "arguments": {{}}}}</tool_call>\n{OPEN}{{"name": "b", "arguments": "{{}}"}}'
    _, calls = parse_calls(text, {"a", "b"})
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    assert calls[1]["function"]["arguments"] == "{}"  # a string stays as the model wrote it


def test_bare_json_is_a_call_only_for_an_offered_tool() -> None:
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parse_calls(bare, {"get_weather"})[1]
    assert parse_calls(bare, {"other"}) == (bare, [])
    assert parse_calls(f"Here: {bare}", {"get_weather"}) == (f"Here: {bare}", [])
    assert parse_calls(f"{OPEN} not json </tool_call>", {"x"})[1] == []


def test_splitter_streams_text_and_holds_calls() -> None:
    pieces = [
        "Sure",
        ", checking <tool",
        "_call>\n{",
        '"name": "get_weather", "arguments": {"city": "Oslo"}}',
        "\n</tool_call>",
    ]
    split = ToolCallSplitter({"get_weather"})
    shown = "".join(split.push(p) for p in pieces)
    rest, calls = split.finish()
    assert shown + rest == "Sure, checking " and len(calls) == 1


def test_splitter_lets_plain_text_through_whole() -> None:
    split = ToolCallSplitter({"f"})
    shown = split.push("a < b and <tool") + split.push("s> are fine")
    rest, calls = split.finish()
    assert shown + rest == "a < b and <tools> are fine" and calls == []


def test_plan_without_template_support_adds_instructions() -> None:
    plan = plan_tools([{"role": "system", "content": "Be brief."}, *ASK], [WEATHER], "auto", "{{ messages }}")
    assert plan.template_tools is None and plan.names == {"get_weather"}
    assert (
        plan.messages[0]["content"].startswith("Be brief.\n\n# Tools")
        and '"get_weather"' in plan.messages[0]["content"]
    )
    assert plan_tools(ASK, [WEATHER], "none", None).names == set()
    forced = plan_tools(ASK, [WEATHER], {"type": "function", "function": {"name": "get_weather"}}, "tools")
    assert forced.template_tools == [WEATHER] and forced.reply_prefix.endswith('"get_weather", "arguments": ')


@pytest.fixture(scope="module")
def qwen_server(qwen_checkpoint: Path) -> Iterator[Server]:
    s = Server(qwen_checkpoint.parent.name, "--max-context", "1024")
    yield s
    s.stop()


@pytest.mark.slow
def test_tool_call_round_trip_with_qwen(qwen_server: Server) -> None:
    client = openai.OpenAI(base_url=qwen_server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=40)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 22, "sky": "sunny"})}
    history = [*ASK, choice.message.model_dump(exclude_none=True), result]
    second = client.chat.completions.create(
        model=model, messages=history, tools=[WEATHER], temperature=0, max_tokens=24
    )
    # The template rendered the call and its result (prompt grew by both) and the model answered.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")

    stream = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=40, stream=True
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather" and not any(d.content for d in deltas)
