"""The report every data stage writes: `stats.json`, `report.md` and `lengths.png`.

Counts are gathered while the stage streams (documents and characters in and out, removals per reason, language
mix, a length histogram over fixed power-of-two bins so it never holds the lengths themselves), then written once.
It does not decide what to remove; stages call `removed(reason)`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.io import InputIssues
from lmforge.fileio import atomic_path, write_json, write_text

BINS = 32  # bin k holds lengths in [2^k, 2^(k+1)); 2^32 characters is more than any document


def length_bin(n: int) -> int:
    return min(max(n, 1).bit_length() - 1, BINS - 1)


@dataclass
class StageStats:
    stage: str
    docs_in: int = 0
    chars_in: int = 0
    docs_out: int = 0
    chars_out: int = 0
    removed_by: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=lambda: [0] * BINS)
    extra: dict = field(default_factory=dict)

    def seen(self, text: str) -> None:
        self.docs_in += 1
        self.chars_in += len(text)

    def kept(self, text: str, lang: str | None, length: int | None = None) -> None:
        """`length` is what the histogram counts (tokens, say); characters by default."""
        self.docs_out += 1
        self.chars_out += len(text)
        self.languages[lang or "unknown"] += 1
        self.lengths[length_bin(len(text) if length is None else length)] += 1

    def removed(self, reason: str) -> None:
        self.removed_by[reason] += 1

    def to_dict(self, issues: InputIssues | None = None) -> dict:
        d = {
            "stage": self.stage,
            "documents_in": self.docs_in,
            "documents_out": self.docs_out,
            "characters_in": self.chars_in,
            "characters_out": self.chars_out,
            "removed": dict(sorted(self.removed_by.items(), key=lambda kv: (-kv[1], kv[0]))),
            "languages": dict(sorted(self.languages.items(), key=lambda kv: (-kv[1], kv[0]))),
            "length_histogram": {f"{1 << k}-{(1 << (k + 1)) - 1}": c for k, c in enumerate(self.lengths) if c},
            **self.extra,
        }
        if issues is not None:
            d["input_problems"] = dict(issues.counts)
            d["input_problem_locations"] = issues.locations
        return d


def _markdown(d: dict) -> str:
    pct = 100.0 * d["documents_out"] / d["documents_in"] if d["documents_in"] else 0.0
    lines = [
        f"# lmforge data {d['stage']}",
        "",
        f"- documents: {d['documents_in']:,} in, {d['documents_out']:,} out ({pct:.1f}% kept)",
        f"- characters: {d['characters_in']:,} in, {d['characters_out']:,} out",
        "",
        "## Removed, by reason",
        "",
        "| reason | documents |",
        "|---|---|",
        *[f"| {k} | {v:,} |" for k, v in d["removed"].items()],
        "",
        "## Languages kept",
        "",
        "| language | documents |",
        "|---|---|",
        *[f"| {k} | {v:,} |" for k, v in d["languages"].items()],
    ]
    for key in ("cluster_sizes", "tokens"):
        if key in d:
            lines += ["", f"## {key.replace('_', ' ')}", "", f"`{d[key]}`"]
    if d.get("input_problems"):
        lines += ["", "## Input problems (counted and skipped or replaced)", ""]
        for kind, n in d["input_problems"].items():
            where = ", ".join(d["input_problem_locations"].get(kind, [])[:5])
            lines.append(f"- {kind}: {n:,} (first: {where})")
    lines += ["", "![document lengths](lengths.png)", ""]
    return "\n".join(lines)


def _histogram_png(lengths: list[int], path: Path, unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    top = max((k for k, c in enumerate(lengths) if c), default=0) + 1
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([f"2^{k}" for k in range(top)], lengths[:top])
    ax.set_xlabel(f"document length ({unit}, power-of-two bins)")
    ax.set_ylabel("documents")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def write_report(out: Path, stats: StageStats, issues: InputIssues | None = None, unit: str = "characters") -> dict:
    d = stats.to_dict(issues)
    write_json(out / "stats.json", d)
    write_text(out / "report.md", _markdown(d))
    _histogram_png(stats.lengths, out / "lengths.png", unit)
    return d
