"""Prometheus metrics of one server (its own registry, so several apps can live in a process).

- `jaxmoe_http_requests_total{endpoint, status}`: every HTTP answer (unknown paths as "other");
- `jaxmoe_requests_finished_total{endpoint, finish_reason}`: generations by how they ended
  (stop, length, tool_calls, cancelled, error);
- `jaxmoe_prompt_tokens_total`, `jaxmoe_generation_tokens_total`;
- `jaxmoe_time_to_first_token_seconds`, `jaxmoe_time_per_output_token_seconds` (histograms);
- `jaxmoe_requests_in_flight` (admitted, not finished), `jaxmoe_requests_waiting` (in the
  engine's queue, waiting for a cache slot), `jaxmoe_cache_slots_in_use`, `jaxmoe_cache_slots`.

The gauges read the engine's scheduler when scraped (lengths only, without its lock: a
scrape never waits for a step).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from jaxmoe.generate import Timings

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, slots_in_use: Callable[[], int], waiting: Callable[[], int], in_flight: Callable[[], int],
                 n_slots: int):
        self.registry = r = CollectorRegistry()
        self.http = Counter("jaxmoe_http_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.finished = Counter("jaxmoe_requests_finished", "Generation requests by how they ended",
                                ["endpoint", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("jaxmoe_prompt_tokens", "Prompt tokens of the generation requests", registry=r)
        self.generation_tokens = Counter("jaxmoe_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("jaxmoe_time_to_first_token_seconds", "Time to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("jaxmoe_time_per_output_token_seconds", "Time per generated token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        Gauge("jaxmoe_requests_in_flight", "Generation requests admitted and not finished",
              registry=r).set_function(in_flight)
        Gauge("jaxmoe_requests_waiting", "Requests waiting for a cache slot in the engine", registry=r).set_function(waiting)
        Gauge("jaxmoe_cache_slots_in_use", "Cache slots held by running requests", registry=r).set_function(slots_in_use)
        Gauge("jaxmoe_cache_slots", "Cache slots of the engine", registry=r).set(n_slots)

    def http_answer(self, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        self.http.labels(endpoint, str(status)).inc()

    def generation(self, endpoint: str, finish_reason: str, prompt_tokens: int, timings: Timings | None) -> None:
        """One generation request ended (`timings`: its last response's, None before any token)."""
        self.finished.labels(endpoint, finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        if timings is None:
            return
        self.generation_tokens.inc(timings.generated_tokens)
        if timings.generated_tokens >= 1:
            self.ttft.observe(timings.ttft_s)
        if timings.generated_tokens >= 2 and timings.decode_tok_s > 0:
            self.tpot.observe(1.0 / timings.decode_tok_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
