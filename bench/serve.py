"""Serving throughput and latency under concurrent streaming clients: lmforge's server against llama.cpp's.

    python bench/serve.py --model smollm2-135m-instruct [--clients 1,4,16] [--tokens 64] [--rounds 2]

Each server runs in its own subprocess on the same model: `lmforge serve` on the catalog checkpoint, and
llama.cpp's OpenAI server (`python -m llama_cpp.server`, from llama-cpp-python[server]) on the original GGUF file
when that package imports. For each client count, that many clients each stream `rounds` chat completions (a
distinct prompt each, so no server can reuse a cached prefix) and the run reports aggregate completion tokens per
second over the wall time, and p50/p95 time to first token. Sampling is greedy; lmforge ignores EOS so every
reply has `--tokens` tokens, llama.cpp's replies may stop earlier (tokens are counted from each reply's usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

TOPICS = ["the sea", "a lighthouse", "mountains", "a robot", "the moon", "a library", "rain", "a train", "autumn",
          "a garden", "the desert", "a city at night", "an old map", "a violin", "snow", "a river"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, threads: int, timeout: float = 600) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # The log goes to a file: llama.cpp logs so much that an unread pipe would fill and block it.
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{cmd[2]} exited: {log.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int) -> tuple[float, int]:
    """Stream one chat completion; return (time to first token, completion tokens)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            usage = data.get("usage") or usage
            delta = (data.get("choices") or [{}])[0].get("delta", {})
            if delta.get("content"):
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), (usage or {}).get("completion_tokens", chunks)


async def level(url: str, model: str, clients: int, rounds: int, tokens: int) -> dict:
    async def client_loop(i: int, client: httpx.AsyncClient) -> list[tuple[float, int]]:
        out = []
        for r in range(rounds):
            topic = TOPICS[(i + r * clients) % len(TOPICS)]
            prompt = f"Client {i}, round {r}: write a long, detailed story about {topic}."
            out.append(await one_request(client, url, model, prompt, tokens))
        return out

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - t0
    flat = [x for per_client in results for x in per_client]
    ttfts = sorted(t for t, _ in flat)
    total = sum(n for _, n in flat)
    return {
        "clients": clients,
        "requests": len(flat),
        "tokens": total,
        "wall_s": round(wall, 2),
        "tok_per_s": round(total / wall, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3),
    }


def bench_server(name: str, cmd: list[str], url: str, model: str, args: argparse.Namespace) -> list[dict]:
    proc = start(cmd, url, args.threads)
    try:
        asyncio.run(one_request(httpx.AsyncClient(timeout=600), url, model, "Hello!", 8))  # warm-up
        rows = []
        for c in args.clients:
            row = {"server": name, **asyncio.run(level(url, model, c, args.rounds, args.tokens))}
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a catalog name")
    p.add_argument("--clients", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--tokens", type=int, default=64, help="max_tokens per reply")
    p.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--no-llama-cpp", action="store_true")
    args = p.parse_args()

    from lmforge.catalog import resolve_model

    directory = resolve_model(args.model)
    rows = []
    port = free_port()
    ours = [sys.executable, "-m", "lmforge.cli", "serve", "--model", args.model, "--port", str(port)]
    ours += ["--max-batch", str(args.max_batch), "--max-context", "1024"]
    rows += bench_server("lmforge", ours, f"http://127.0.0.1:{port}", args.model, args)

    gguf = sorted(directory.parent.glob("*.gguf"))
    if args.no_llama_cpp or not gguf or not _importable("llama_cpp.server"):
        print("llama.cpp: skipped (no GGUF beside the checkpoint, or llama-cpp-python[server] not installed)")
    else:
        port = free_port()
        theirs = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf[0]), "--port", str(port)]
        theirs += ["--n_ctx", "1024", "--n_threads", str(args.threads), "--model_alias", args.model]
        theirs += ["--interrupt_requests", "False"]  # by default a new request cuts off the running stream
        rows += bench_server("llama.cpp", theirs, f"http://127.0.0.1:{port}", args.model, args)

    print(f"\n{args.model}, {args.tokens} tokens per reply, {args.rounds} rounds per client, {args.threads} threads")
    print(f"{'server':<10} {'clients':>7} {'tok/s':>8} {'x single':>8} {'TTFT p50':>9} {'TTFT p95':>9}")
    for r in rows:
        single = next(x["tok_per_s"] for x in rows if x["server"] == r["server"] and x["clients"] == args.clients[0])
        print(
            f"{r['server']:<10} {r['clients']:>7} {r['tok_per_s']:>8.1f} {r['tok_per_s'] / single:>7.1f}x "
            f"{r['ttft_p50_s']:>8.2f}s {r['ttft_p95_s']:>8.2f}s"
        )


def _importable(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


if __name__ == "__main__":
    main()
