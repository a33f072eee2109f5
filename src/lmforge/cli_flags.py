"""Command-line flags made from a stage's config dataclass, so a default or a help text exists in one place.

Each field becomes `--field-name` with its type, its `help` metadata and the dataclass default shown; booleans get
`--flag/--no-flag`, lists take several values. Every flag defaults to None, meaning "not given": `config_from`
then builds the dataclass from the given flags only, and the dataclass supplies the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

C = TypeVar("C")
SCALARS = {"int": int, "float": float, "str": str}


def add_flags(
    parser: argparse.ArgumentParser, cls: type, choices: dict[str, tuple[str, ...]] | None = None,
    skip: tuple[str, ...] = (), require: bool = True,
) -> None:
    """Add one flag per field of `cls` (but `skip`); `choices` restricts string fields. Fields without a default are
    required flags unless `require` is off (when a settings file may supply them instead)."""
    choices = choices or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" | None", "")
        required = require and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = "" if required else f" (default {_shown(f)})"
        text = f.metadata.get("help", f.name.replace("_", " ")) + default
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind.startswith("list["):
            parser.add_argument(flag, nargs="+", default=None, required=required, help=text)
        else:
            parser.add_argument(flag, type=SCALARS.get(kind, str), choices=choices.get(f.name), default=None,
                                required=required, help=text)


def _shown(f: dataclasses.Field) -> Any:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return " ".join(map(str, value)) if isinstance(value, list) else value


def config_from(cls: type[C], args: argparse.Namespace) -> C:
    """The dataclass from the flags that were given; the rest keep the dataclass defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})
