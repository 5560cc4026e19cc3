"""Prometheus metrics for GET /metrics, in one CollectorRegistry per app (tests run many apps).

Latencies are measured in the HTTP layer (what a client sees); queue time comes from the engine's
timestamps. Running and waiting requests are read from `engine.stats()` at scrape time.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Buckets in seconds: CPU decode steps are milliseconds to a second; whole requests up to minutes.
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    """Gauges read from the engine at scrape time (no stale values between requests)."""

    def __init__(self, stats: Callable[[], dict | None]):
        self._stats = stats

    def collect(self):
        stats = self._stats() or {}
        for name, doc in (("running", "Requests being generated."), ("waiting", "Requests queued for a slot.")):
            g = GaugeMetricFamily(f"gpt2serve_requests_{name}", doc)
            g.add_metric([], float(stats.get(name, 0)))
            yield g
        for name, doc in (("kv_blocks_free", "Free KV-cache blocks."), ("kv_blocks_total", "KV-cache blocks in all."),
                          ("kv_cache_bytes", "Bytes allocated for the KV cache (the configured budget, never exceeded).")):
            if name in stats:
                g = GaugeMetricFamily(f"gpt2serve_{name}", doc)
                g.add_metric([], float(stats[name]))
                yield g


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("gpt2serve_time_to_first_token_seconds", "Request arrival to first token.", buckets=_STEP_BUCKETS + (30.0, 60.0), registry=r)
        self.itl = Histogram("gpt2serve_inter_token_latency_seconds", "Time between tokens of one sequence.", buckets=_STEP_BUCKETS, registry=r)
        self.e2e = Histogram("gpt2serve_e2e_request_latency_seconds", "Request arrival to last token.", buckets=_REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("gpt2serve_request_queue_time_seconds", "Time a request waited for its first scheduling.", buckets=_REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gpt2serve_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("gpt2serve_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("gpt2serve_requests", "Finished HTTP generation requests.", ["endpoint", "outcome"], registry=r)
        self.loading = Gauge("gpt2serve_model_loading", "1 while the model loads.", registry=r)
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Per-engine-request timing: call `on_output(t, out, n_new)` for each RequestOutput delta."""

    def __init__(self, metrics: Metrics, start: float):
        self.m = metrics
        self.start = start
        self.first: float | None = None
        self.last: float | None = None
        self.queued_observed = False

    def on_output(self, now: float, out, n_new: int) -> None:
        if not self.queued_observed and getattr(out, "first_scheduled_time", None) is not None and out.arrival_time:
            self.m.queue.observe(max(0.0, out.first_scheduled_time - out.arrival_time))
            self.queued_observed = True
        if n_new <= 0:
            return
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.start)
        elif self.last is not None:
            # one step carries one token of each of the request's sequences: the step gap is the ITL
            self.m.itl.observe(now - self.last)
        self.last = now
        self.m.generation_tokens.inc(n_new)

    def finish(self, now: float) -> None:
        self.m.e2e.observe(now - self.start)
