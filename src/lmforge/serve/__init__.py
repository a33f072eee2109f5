"""`lmforge serve`: an OpenAI-compatible HTTP API with continuous batching and a bilingual web chat page.

The package: `scheduler` (one thread, continuous batching over a KV slot pool), `protocol` (OpenAI request models
and error shape), `tools` (tool-call prompting and parsing), `service` (limits, auth, submissions), `metrics`
(Prometheus), `app` (FastAPI routes) and `web/` (the chat page, plain HTML/JS/CSS). This module holds the stage's
config and `main`; FastAPI, uvicorn and torch are imported only when a server starts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from lmforge.errors import LmforgeError

DEFAULT_CONTEXT = 4096  # per sequence; the slot pool holds max_batch of these, so it bounds KV memory


@dataclass
class ServeConfig:
    model: str | None = None
    quant: str | None = None
    adapter: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure_no_auth: bool = False  # the user accepts serving without a key on a non-loopback address
    max_batch: int = 16
    max_context: int | None = None  # default: the model's context, capped at DEFAULT_CONTEXT
    max_body_bytes: int = 4 * 2**20
    model_id: str | None = None  # the name clients pass as `model` (default: the catalog name or directory name)
    reward: str | None = None  # a reward model directory: requests may then ask for best_of > 1
    best_of: int = 1  # candidates per non-streaming sampled request that does not say (needs `reward` when > 1)

    def check(self) -> None:
        if not _is_loopback(self.host) and not self.api_key and not self.insecure_no_auth:
            raise LmforgeError(
                f"--host {self.host} is reachable from other machines: pass --api-key KEY (clients send it as "
                "'Authorization: Bearer KEY'), or --insecure-no-auth if anyone on that network may use the model"
            )
        if not 1 <= self.max_batch <= 256:
            raise LmforgeError(f"--max-batch must be between 1 and 256, got {self.max_batch}")
        if self.max_context is not None and self.max_context < 16:
            raise LmforgeError(f"--max-context must be at least 16 tokens, got {self.max_context}")
        if not 0 <= self.port <= 65535:
            raise LmforgeError(f"--port must be between 0 and 65535, got {self.port}")
        if not 1 <= self.best_of <= 16:
            raise LmforgeError(f"--best-of must be between 1 and 16, got {self.best_of}")
        if self.best_of > 1 and not self.reward:
            raise LmforgeError("--best-of needs --reward RM_DIR: the reward model that picks the best candidate")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def main(cfg: ServeConfig) -> None:
    cfg.check()  # before loading: a refused configuration should not cost a model load
    import uvicorn

    from lmforge.loader import open_model
    from lmforge.serve.app import create_app
    from lmforge.serve.scheduler import Scheduler
    from lmforge.serve.service import Limits, Service

    loaded = open_model(cfg.model, cfg.quant, cfg.adapter)
    scorer = None
    if cfg.reward:
        from lmforge.align.reward import RewardScorer

        scorer = RewardScorer(cfg.reward)
    model_len = loaded.model.cfg.max_seq_len - loaded.model.prefix_len  # a P-Tuning prefix takes positions too
    max_len = min(cfg.max_context or DEFAULT_CONTEXT, model_len)
    scheduler = Scheduler(loaded.model, loaded.tokenizer, cfg.max_batch, max_len)
    model_id = cfg.model_id or _model_id(cfg.model, loaded.directory)
    limits = Limits(max_len, cfg.max_body_bytes)
    svc = Service(scheduler, loaded.tokenizer, model_id, limits, cfg.api_key, scorer, cfg.best_of)
    scheduler.start()
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"lmforge: serving {model_id!r} at http://{shown}:{cfg.port}/ (OpenAI API under /v1)", flush=True)
    try:
        uvicorn.run(create_app(svc), host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=3)
    finally:
        scheduler.stop()


def _model_id(spec: str | None, directory) -> str:  # noqa: ANN001 - a Path
    """A catalog name as given; a path by its last meaningful component (a checkpoint dir's parent is its name)."""
    if spec and "/" not in spec and not spec.endswith(".gguf"):
        return spec
    return directory.parent.name if directory.name == "checkpoint" else directory.name
