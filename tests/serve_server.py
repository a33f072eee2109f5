"""A real `lmforge serve` in a subprocess on a free loopback port, for the serve tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lmforge.checkpoint import make_lineage, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from tests.tiny import make_tiny_tokenizer

# The tiny shape with a long context, so that a stream can run long enough to be cut off mid-way.
TINY_LONG = ModelConfig(
    vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=4096
)


def write_tiny_checkpoint(directory: Path) -> Path:
    import torch

    torch.manual_seed(0)
    model = Transformer(TINY_LONG)
    model.init_weights(std=0.2)
    save_checkpoint(directory, model.cfg, model.state_dict(), make_tiny_tokenizer(), make_lineage("test"))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path | str, *args: str, threads: int | None = None, startup_s: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", str(model), "--port", str(self.port), *args]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start in time")

    def metric(self, name: str, headers: dict | None = None) -> float:
        """The value of one unlabelled sample in /metrics."""
        text = httpx.get(self.url + "/metrics", headers=headers).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
