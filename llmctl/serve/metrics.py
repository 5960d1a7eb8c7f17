"""Prometheus metrics of the server, kept in a registry of their own per app.

A registry per app (rather than prometheus-client's global one) lets several servers run in
one process, as the tests do, without metric names colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets in seconds: inter-token latency on a CPU is a few ms to a few hundred ms,
# time to first token grows with the prompt and the queue.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """The counters, gauges and histograms ``GET /metrics`` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llmctl_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "llmctl_prompt_tokens", "Prompt tokens processed.", ["model"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "llmctl_generation_tokens", "Tokens generated.", ["model"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "llmctl_time_to_first_token_seconds", "Seconds from admission to the first generated token.",
            ["model"], buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "llmctl_inter_token_latency_seconds", "Seconds between consecutive generated tokens of one sequence.",
            ["model"], buckets=ITL_BUCKETS, registry=self.registry,
        )
        self.request_duration = Histogram(
            "llmctl_request_duration_seconds", "Seconds from admission to the end of a generation request.",
            ["model"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "llmctl_queue_depth", "Requests waiting for a free slot.", registry=self.registry
        )
        self.running = Gauge(
            "llmctl_running_requests", "Requests holding a slot (generating or scoring).", registry=self.registry
        )
        self.cancelled = Counter(
            "llmctl_cancelled_requests", "Generations cancelled because the client disconnected.", ["model"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)
