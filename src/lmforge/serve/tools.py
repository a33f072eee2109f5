"""Tool calling in the OpenAI format, on top of the model's own chat template.

Requests carry `tools` (JSON-schema function signatures) and `tool_choice`; the chat template renders them (Qwen2.5,
Hermes and most open tool-use models ask for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks).
A template that ignores `tools` gets the same instructions in its system message instead, so every model sees
the functions. `tool_choice` "required" or a named function is enforced by starting the reply with the opening of
a call; "none" hides the tools. `ToolCallSplitter` separates streamed text from call blocks and parses the blocks
into OpenAI `tool_calls`. This module does not validate arguments against the schema: the caller runs the tool.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)

SYSTEM_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call>"
)


@dataclass
class ToolPlan:
    """How one request's tools reach the model."""

    template_tools: list[dict] | None  # passed to the chat template's `tools` variable
    messages: list[dict]  # the conversation, with instructions added when the template ignores tools
    reply_prefix: str = ""  # text the reply is forced to start with (rendered after the generation prompt)
    offered: list[dict] = field(default_factory=list)

    @property
    def names(self) -> set[str]:
        """The functions the model may call (empty: parse no calls)."""
        return {t["function"]["name"] for t in self.offered}


def plan_tools(messages: list[dict], tools: list[dict] | None, choice: Any, template: str | None) -> ToolPlan:
    if not tools or choice == "none":
        return ToolPlan(None, messages)
    prefix = ""
    if choice == "required":
        prefix = OPEN + '\n{"name": "'
    elif isinstance(choice, dict):
        prefix = OPEN + '\n{"name": "' + choice["function"]["name"] + '", "arguments": '
    if template is not None and "tools" in template:
        return ToolPlan(tools, messages, prefix, tools)
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    text = SYSTEM_INSTRUCTIONS.format(tools=listing)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + text}
        return ToolPlan(None, [first, *messages[1:]], prefix, tools)
    return ToolPlan(None, [{"role": "system", "content": text}, *messages], prefix, tools)


def parse_calls(text: str, names: set[str]) -> tuple[str, list[dict]]:
    """Split generated text into plain content and OpenAI tool_calls.

    Calls are `<tool_call>` blocks; small models sometimes drop the tags and answer with the bare JSON object, which
    counts as a call only when it is the whole reply and names one of the offered tools. A block that is not valid
    JSON stays text.
    """
    calls, kept, last = [], [], 0
    for m in _BLOCK.finditer(text):
        call = _call(m.group(1), names=None)
        if call is None:
            continue
        kept.append(text[last : m.start()])
        last = m.end()
        calls.append(call)
    if calls:
        return ("".join(kept) + text[last:]).strip(), calls
    bare = _call(text.strip(), names)
    return ("", [bare]) if bare else (text, [])


def _call(body: str, names: set[str] | None) -> dict | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and (obj["name"] not in names or "arguments" not in obj):
        return None
    args = obj.get("arguments", {})
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
    }


@dataclass
class ToolCallSplitter:
    """Streams plain text through and holds back what may be a tool call, for `finish()` to parse.

    Held back: everything from the first `<tool_call>` on, text that might be the start of that tag, and a reply
    that opens with `{` (a bare JSON call) until it ends.
    """

    names: set[str]
    held: str = ""
    in_call: bool = False
    started: bool = False  # some text has been let through, so the reply is not a bare JSON call

    def push(self, piece: str) -> str:
        self.held += piece
        if self.in_call:
            return ""
        at = self.held.find(OPEN)
        if at >= 0:
            self.in_call = True
            out, self.held = self.held[:at], self.held[at:]
            return self._out(out)
        if not self.started and (not self.held.strip() or self.held.lstrip().startswith("{")):
            return ""
        keep = next((n for n in range(min(len(OPEN) - 1, len(self.held)), 0, -1) if self.held.endswith(OPEN[:n])), 0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return self._out(out)

    def _out(self, text: str) -> str:
        self.started = self.started or bool(text)
        return text

    def finish(self) -> tuple[str, list[dict]]:
        """Any text still held back, and the parsed calls."""
        held, self.held = self.held, ""
        if self.started and not self.in_call:
            return held, []
        return parse_calls(held, self.names)
