"""The `lmforge` command as a user runs it: a real subprocess, real files, one error line for each mistake."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.checkpoint import make_lineage, save_checkpoint
from tests.tiny import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = make_tiny_model("qwen2-tiny")
    save_checkpoint(directory, model.cfg, model.state_dict(), make_tiny_tokenizer(), make_lineage("test"))
    return directory


def lmforge(
    *args: str, stdin: str = "", cache: Path | None = None, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **env_vars)
    if cache is not None:
        env["LMFORGE_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_generate_json(tiny_dir: Path) -> None:
    proc = lmforge("generate", "你好 hello", "--model", str(tiny_dir), "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["completion_tokens"] <= 6
    assert out["finish_reason"] in ("stop", "length")
    assert {"text", "prompt_tokens", "prefill_tokens_per_s", "decode_tokens_per_s"} <= out.keys()


def test_generate_chat_template_is_applied(tiny_dir: Path) -> None:
    plain = lmforge("generate", "hi", "--model", str(tiny_dir), "--max-new-tokens", "1", "--json")
    chat = lmforge("generate", "hi", "--chat", "--model", str(tiny_dir), "--max-new-tokens", "1", "--json")
    assert json.loads(chat.stdout)["prompt_tokens"] > json.loads(plain.stdout)["prompt_tokens"]


def test_chat_session_through_a_pipe(tiny_dir: Path, tmp_path: Path) -> None:
    script = "你好\n/system Answer briefly.\nhello again\n/reset\n/bogus\nthird\n/exit\n"
    proc = lmforge("chat", "--model", str(tiny_dir), "--max-new-tokens", "5", stdin=script, cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(re.findall(r"\d+ tokens · [\d.]+ tok/s", proc.stdout)) == 3  # one stats line per answer
    assert "system prompt set" in proc.stdout
    assert "conversation cleared" in proc.stdout
    assert "unknown command /bogus" in proc.stdout


def test_chat_runs_int8_on_a_cpu_says_so_and_shows_the_first_quantization(tiny_dir: Path, tmp_path: Path) -> None:
    args = ("chat", "--model", str(tiny_dir), "--max-new-tokens", "3")
    first = lmforge(*args, stdin="hi\n/exit\n", cache=tmp_path, TTY_COMPATIBLE="1")  # stderr drawn as a terminal
    assert first.returncode == 0, first.stderr
    assert first.stderr.startswith("lmforge: int8 weights") and "--quant none" in first.stderr.splitlines()[0]
    assert re.search(r"quantizing to int8 .*(?<!\d)(\d+)/\1(?!\d)", first.stderr)  # the bar, run to its end
    again = lmforge(*args, stdin="hi\n/exit\n", cache=tmp_path)
    assert again.stderr.splitlines() == [first.stderr.splitlines()[0]]  # made once: no second quantization
    plain = lmforge(*args, "--quant", "none", stdin="hi\n/exit\n", cache=tmp_path)
    assert plain.returncode == 0 and plain.stderr == ""
    assert len(list((tmp_path / "quantized").iterdir())) == 1


def test_unknown_model_name(tmp_path: Path) -> None:
    proc = lmforge("generate", "x", "--model", "no-such-model", cache=tmp_path)
    assert_one_line_error(proc, "no-such-model", "smollm2-135m-instruct")


def test_corrupt_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    proc = lmforge("generate", "x", "--model", str(bad), cache=tmp_path / "cache")
    assert_one_line_error(proc, "broken.gguf")
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # nothing half-converted is left behind


def test_directory_without_a_model(tmp_path: Path) -> None:
    proc = lmforge("generate", "x", "--model", str(tmp_path), cache=tmp_path / "cache")
    assert_one_line_error(proc, str(tmp_path))


def test_bad_sampling_flag(tiny_dir: Path) -> None:
    proc = lmforge("generate", "x", "--model", str(tiny_dir), "--top-p", "1.5")
    assert_one_line_error(proc, "top_p")


def test_prompt_longer_than_the_context(tiny_dir: Path) -> None:
    proc = lmforge("generate", "你好 hello " * 200, "--model", str(tiny_dir), "--max-context", "64")
    assert_one_line_error(proc, "context is 64")


def test_models_lists_the_catalog_offline(tmp_path: Path) -> None:
    proc = lmforge("models", "--json", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = {row["name"] for row in json.loads(proc.stdout)}
    assert {"qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"} <= names
    table = lmforge("models", cache=tmp_path, COLUMNS="160")
    assert table.returncode == 0, table.stderr
    assert "qwen2.5-coder-0.5b-instruct (default)" in table.stdout and "MiB" in table.stdout


def test_generation_falls_back_when_native_kernels_cannot_build(tiny_dir: Path, tmp_path: Path) -> None:
    args = ("generate", "hello", "--model", str(tiny_dir), "--max-new-tokens", "4", "--json")
    native = lmforge(*args, cache=tmp_path / "a")
    fallback = lmforge(*args, cache=tmp_path / "b", CC="/bin/false")
    assert fallback.returncode == 0, fallback.stderr
    assert fallback.stderr.count("native kernels unavailable") == 1
    assert json.loads(fallback.stdout)["text"] == json.loads(native.stdout)["text"]


def test_chat_survives_a_message_over_the_context(tiny_dir: Path, tmp_path: Path) -> None:
    script = "你好 hello " * 60 + "\nhi\n/exit\n"
    proc = lmforge("chat", "--model", str(tiny_dir), "--max-new-tokens", "4", "--max-context", "64", stdin=script,
                   cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "context is 64" in proc.stdout
    assert len(re.findall(r"\d+ tokens · [\d.]+ tok/s", proc.stdout)) == 1  # the short message is still answered
