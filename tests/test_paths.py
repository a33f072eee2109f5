"""The cache directory: one place, in the lowest layer, that every cache user asks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.paths import cache_dir


def test_cache_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LMFORGE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "lmforge"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lmforge"
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
