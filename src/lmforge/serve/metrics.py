"""Prometheus metrics for `/metrics`: requests, tokens, batch occupancy, queue depth and latency histograms.

Each server owns its registry (not the process-global one), so tests can run several servers in one process.
This module only defines and renders the metrics; the routes and the scheduler's callbacks update them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, occupancy: Callable[[], float], queue_depth: Callable[[], float]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP API requests", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("lmforge_completion_tokens", "tokens generated", registry=r)
        self.cancelled = Counter(
            "lmforge_cancelled_sequences", "sequences dropped unfinished (client gone)", registry=r
        )
        Gauge("lmforge_batch_occupancy", "pool rows in use (decoding or prefilling)", registry=r).set_function(
            occupancy
        )
        Gauge("lmforge_queue_depth", "requests waiting for a free row", registry=r).set_function(queue_depth)
        self.decode_batch = Histogram(
            "lmforge_decode_batch_size", "rows per decode step", buckets=(1, 2, 4, 8, 12, 16, 32, 64), registry=r
        )
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds", "request arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "lmforge_request_duration_seconds", "request arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
