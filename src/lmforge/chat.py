"""`lmforge chat`: a multi-turn terminal chat that streams replies as they are generated.

The conversation is a list of OpenAI-style messages rendered with the model's own chat template; the engine
re-uses the cached prefix, so each turn only prefills the new message. Commands: /reset, /system TEXT, /exit.
On a terminal, input is read with prompt_toolkit (line editing that handles CJK widths) and replies are rendered
as markdown while they stream; piped input and output stay plain text so that scripts can drive it.
With a reward scorer (`--best-of N --reward RM_DIR`) each reply is the best of N sampled together (align/bestof.py):
nothing streams, the chosen reply is printed whole and kept in the history.
This module does not load models or sample tokens itself.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from lmforge.engine import Engine, Stats
from lmforge.errors import LmforgeError
from lmforge.sampling import SamplingParams

if TYPE_CHECKING:
    from lmforge.align.reward import RewardScorer

HELP = "Commands: /reset (new conversation), /system TEXT (set the system prompt), /exit. 命令：/reset /system /exit"


def _reader(interactive: bool) -> Callable[[str], str]:
    if interactive:
        from prompt_toolkit import PromptSession

        session: PromptSession[str] = PromptSession()
        return lambda prompt: session.prompt(prompt)
    return lambda prompt: _plain_input(prompt)


def _plain_input(prompt: str) -> str:
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def run_chat(
    engine: Engine, params: SamplingParams, system: str | None, model_name: str,
    scorer: RewardScorer | None = None, best_of: int = 1,
) -> None:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    console = Console(highlight=False)
    read = _reader(interactive)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    console.print(f"[bold]lmforge chat[/bold] · {model_name} · {HELP}")
    while True:
        try:
            line = read("\n>>> ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            engine.reset()
            console.print("[dim]conversation cleared / 对话已清空[/dim]")
            continue
        if line.startswith("/system"):
            text = line[len("/system") :].strip()
            messages = ([{"role": "system", "content": text}] if text else []) + [
                m for m in messages if m["role"] != "system"
            ]
            console.print(f"[dim]system prompt {'set' if text else 'cleared'}[/dim]")
            continue
        if line.startswith("/"):
            console.print(f"[dim]unknown command {line.split()[0]}. {HELP}[/dim]")
            continue
        messages.append({"role": "user", "content": line})
        if scorer is None:
            reply = _answer(engine, messages, params, console, interactive)
        else:
            reply = _answer_best(engine, scorer, best_of, messages, params, console, interactive)
        if reply is None:
            messages.pop()
        else:
            messages.append({"role": "assistant", "content": reply})


class _ReplyView:
    """Shows a reply as it grows: re-rendered as markdown on a terminal, written through as plain text elsewhere.

    Markdown is re-parsed at most every RENDER_EVERY seconds: parsing the whole reply on every token would cost
    more than decoding it.
    """

    RENDER_EVERY = 0.15

    def __init__(self, console: Console, interactive: bool) -> None:
        self.pieces: list[str] = []
        self.live = Live(console=console, vertical_overflow="visible", auto_refresh=False) if interactive else None
        self.rendered_at = 0.0
        if self.live:
            self.live.start()

    def add(self, piece: str) -> None:
        self.pieces.append(piece)
        if self.live is None:
            sys.stdout.write(piece)
            sys.stdout.flush()
        elif time.monotonic() - self.rendered_at > self.RENDER_EVERY:
            self._render()

    def close(self) -> str:
        if self.live:
            self._render()
            self.live.stop()
        return "".join(self.pieces)

    def _render(self) -> None:
        assert self.live is not None
        self.live.update(Markdown("".join(self.pieces)), refresh=True)
        self.rendered_at = time.monotonic()


def _answer(
    engine: Engine, messages: list[dict[str, str]], params: SamplingParams, console: Console, interactive: bool
) -> str | None:
    """Stream one reply; return its text, or None if nothing was produced (the turn is then dropped)."""
    stats = Stats()
    view = _ReplyView(console, interactive)
    try:
        ids = engine.tokenizer.encode(engine.tokenizer.render_chat(messages, add_generation_prompt=True))
        for piece in engine.stream(ids, params, stats):
            view.add(piece)
    except KeyboardInterrupt:
        engine.reset()  # the cache holds a reply we are discarding
        console.print("\n[dim](interrupted)[/dim]")
    except LmforgeError as e:
        view.close()
        console.print(f"\n[red]{e}[/red]")
        return None
    text = view.close()
    console.print(
        f"\n[dim]{stats.completion_tokens} tokens · {stats.decode_tps:.1f} tok/s · "
        f"prompt {stats.prompt_tokens - stats.cached_tokens} new tokens at {stats.prefill_tps:.0f} tok/s[/dim]"
    )
    return text or None


def _answer_best(
    engine: Engine, scorer: RewardScorer, n: int, messages: list[dict[str, str]], params: SamplingParams,
    console: Console, interactive: bool,
) -> str | None:
    """The best of n sampled replies, printed whole; None if the turn failed or was interrupted."""
    from lmforge.align.bestof import best_of

    try:
        with console.status(f"sampling {n} replies…") if interactive else contextlib.nullcontext():
            result = best_of(engine, scorer, messages, n, params)
    except KeyboardInterrupt:
        console.print("\n[dim](interrupted)[/dim]")
        return None
    except LmforgeError as e:
        console.print(f"\n[red]{e}[/red]")
        return None
    if interactive:
        console.print(Markdown(result.text))
    else:
        sys.stdout.write(result.text)
        sys.stdout.flush()
    scores = " ".join(f"{c.score:.2f}" for c in result.candidates)
    tokens = sum(c.tokens for c in result.candidates)
    console.print(f"\n[dim]best of {n} (#{result.best + 1}) · scores {scores} · {tokens} tokens in all[/dim]")
    return result.text or None
