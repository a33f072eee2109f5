"""The OpenAI wire format: request models, the error shape, and the chunks and replies the routes send.

Requests are parsed in two explicit steps (bytes → UTF-8 → JSON, then strict pydantic validation), so every
malformed body gets a 400 that names what is wrong, in OpenAI's `{"error": {...}}` shape. Fields that OpenAI
defines but lmforge does not act on (logprobs, penalties, user, ...) are accepted and ignored, as clients send
them by default. This module does not generate text or know the model.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error the client caused (or a server limit it hit), rendered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        kinds = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}
        return kinds.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "10" is not a number and 1 is not a bool; extra fields: clients send many we do not act on.
    model_config = ConfigDict(strict=True, extra="ignore")


class ToolCallFunction(_Strict):
    name: str
    arguments: str | dict = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ToolName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolName


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's, but llama.cpp and vLLM accept it
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    n: int = Field(1, ge=1, le=8)
    best_of: int | None = Field(None, ge=1, le=16)  # legacy completions' field; here on chat completions too
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: give at most 4 non-empty strings", param="stop")
        return stops


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for this endpoint


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(
            400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}", param=where or None) from None


def template_messages(messages: list[Message]) -> list[dict]:
    """Messages as chat templates expect them: text content, tool-call arguments as objects (as transformers does)."""
    out = []
    for m in messages:
        content = m.content if not isinstance(m.content, list) else "".join(p.text or "" for p in m.content)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name:
            msg["name"] = m.name
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _args(c.function)}}
                for c in m.tool_calls
            ]
        out.append(msg)
    return out


def _args(f: ToolCallFunction) -> Any:
    if isinstance(f.arguments, dict):
        return f.arguments
    try:
        return json.loads(f.arguments)
    except json.JSONDecodeError:
        return f.arguments


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def envelope(rid: str, kind: str, model: str, created: int | None = None, **fields: Any) -> dict:
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model, **fields}


def sse(data: dict | str) -> str:
    return "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"
