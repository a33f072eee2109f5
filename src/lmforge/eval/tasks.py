"""Task names: what `--tasks` accepts, and the shipped tasks.

A task is a kind plus a path. The user's own files are named `KIND:PATH` (`mmlu:/data/mmlu`,
`gsm8k:/data/gsm8k/test.jsonl`); the tasks shipped with lmforge (files in `lmforge/datasets/`, written for this
project) by their names alone. Kinds and their file layouts:

  perplexity  a UTF-8 text file (or a shipped text name: heldout, heldout-en, heldout-zh)
  mmlu        a directory with dev/<subject>_dev.csv and test/<subject>_test.csv; rows question,A,B,C,D,answer;
              no header (the original release)
  ceval       a directory with dev/<subject>_dev.csv and val/<subject>_val.csv, CSV with a header naming
              question, A-D and answer (C-Eval; its test split has no answers)
  cmmlu       a directory with dev/<subject>.csv and test/<subject>.csv, CSV with a header (CMMLU)
  mc          a JSONL file, one {"question", "choices": [...], "answer": letter or index} per line; k-shot
              examples from a sibling <stem>_dev.jsonl when there is one
  gsm8k       a JSONL file of {"question", "answer"} with the number after "####" (GSM8K); few-shot examples
              from a sibling <stem>_dev.jsonl or train.jsonl when there is one

This module parses names and checks that paths exist; reading the files is each kind's module's job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

from lmforge.errors import LmforgeError

KINDS = ("perplexity", "mmlu", "ceval", "cmmlu", "mc", "gsm8k")
T = TypeVar("T")


@dataclass(frozen=True)
class Task:
    name: str  # what results and the report card call it
    kind: str  # one of KINDS
    path: Path


def datasets_dir() -> Path:
    return Path(str(resources.files("lmforge") / "datasets"))


def shipped_tasks() -> dict[str, Task]:
    root = datasets_dir()
    return {
        "heldout": Task("heldout", "perplexity", Path("heldout")),  # the bilingual text pair (perplexity.TEXTS)
        "knowledge": Task("knowledge", "mc", root / "knowledge_mc.jsonl"),
        "arith": Task("arith", "gsm8k", root / "arith.jsonl"),
    }


def parse_tasks(spec: str) -> list[Task]:
    """`--tasks a,b,KIND:PATH` as tasks, each checked to exist; duplicate names are refused."""
    shipped = shipped_tasks()
    tasks = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        kind, sep, rest = item.partition(":")
        if item in shipped:
            tasks.append(shipped[item])
        elif sep and kind in KINDS:
            tasks.append(_user_task(kind, Path(rest).expanduser()))
        else:
            raise LmforgeError(
                f"unknown task {item!r}; shipped tasks: {', '.join(shipped)}; "
                f"for your own files write KIND:PATH with KIND one of {', '.join(KINDS)}"
            )
    names = [t.name for t in tasks]
    if not tasks:
        raise LmforgeError("--tasks names no task")
    if len(set(names)) != len(names):
        raise LmforgeError(f"--tasks names a task twice ({', '.join(names)})")
    return tasks


def _user_task(kind: str, path: Path) -> Task:
    wants_dir = kind in ("mmlu", "ceval", "cmmlu")
    if kind == "perplexity" and not path.exists():
        from lmforge.eval.perplexity import TEXTS

        if str(path) in TEXTS:
            return Task(str(path), kind, path)
    if wants_dir and not path.is_dir():
        raise LmforgeError(f"{path}: {kind} tasks read a directory (with dev/ and test/ or val/); none is there")
    if not wants_dir and not path.is_file():
        raise LmforgeError(f"{path}: no such file for the {kind} task")
    name = f"{kind}:{path.name if wants_dir else path.stem}"
    return Task(name, kind, path)


def take(items: list[T], limit: int | None, lang: Callable[[T], str]) -> list[T]:
    """`limit` items drawn in turn from each language (first ones first), kept in file order.

    Bilingual files list one language after the other, so the first N items would measure only the first
    language; a limit should shrink the task, not change what it measures.
    """
    if not limit or limit >= len(items):
        return items
    queues: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        queues.setdefault(lang(item), []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        for queue in queues.values():
            if depth < len(queue) and len(picked) < limit:
                picked.append(queue[depth])
        depth += 1
    return [items[i] for i in sorted(picked)]
