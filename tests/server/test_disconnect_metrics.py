"""A client that goes away cancels its generation and frees its cache slot; /metrics is
Prometheus text whose counters and gauges follow the requests."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import NAME

LONG = {"model": NAME, "prompt": "Hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


def metrics(server) -> dict[tuple[str, tuple], float]:
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def cancelled(server, endpoint):
    return metrics(server).get(("jaxmoe_requests_finished_total",
                                (("endpoint", endpoint), ("finish_reason", "cancelled"))), 0.0)


def _until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stream_disconnect_cancels_and_frees_the_slot(server, held_engine):
    """The engine pauses (a gate before each step) after three steps, so the request cannot
    finish by itself while the client disconnects; resumed, its slot is freed at the next
    step, long before its 400 tokens."""
    server.wait_idle()
    before = cancelled(server, "/v1/completions")
    try:
        with server.http.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith("data: "))  # generating now
            (stream,) = list(server.state._streams)
            handle = stream._handle
            assert handle is not None and handle.finish_reason is None
            r.close()
            _until(lambda: stream.cancelled)
    finally:
        held_engine.set()
    _until(lambda: handle.finish_reason is not None)
    server.wait_idle(timeout=10)
    assert handle.finish_reason == "cancelled" and len(handle.output_ids) < LONG["max_tokens"]
    assert cancelled(server, "/v1/completions") == before + 1
    m = metrics(server)
    assert m[("jaxmoe_cache_slots_in_use", ())] == 0 and m[("jaxmoe_requests_in_flight", ())] == 0


def test_plain_request_disconnect_cancels_it(server, model):
    """A client that times out on a plain (non-streamed) request: cancelled before it ran."""
    server.wait_idle()
    before = cancelled(server, "/v1/chat/completions")
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "ignore_eos": True}
    with model.engine._lock:  # the request's thread waits to submit; the client gives up
        with pytest.raises(httpx.ReadTimeout):
            server.http.post("/v1/chat/completions", json=body, timeout=1.0)
        (stream,) = list(server.state._streams)
        _until(lambda: stream.cancelled)
    server.wait_idle(timeout=10)
    assert cancelled(server, "/v1/chat/completions") == before + 1


def test_metrics_follow_the_requests(server, model):
    server.wait_idle()
    m0 = metrics(server)
    out = server.client().completions.create(model=NAME, prompt="Hello", max_tokens=5, temperature=0)
    m1 = metrics(server)

    def delta(name, labels=()):
        return m1.get((name, labels), 0.0) - m0.get((name, labels), 0.0)

    assert delta("jaxmoe_prompt_tokens_total") == out.usage.prompt_tokens
    assert delta("jaxmoe_generation_tokens_total") == out.usage.completion_tokens
    assert delta("jaxmoe_time_to_first_token_seconds_count") == 1
    assert delta("jaxmoe_time_per_output_token_seconds_count") == (1 if out.usage.completion_tokens > 1 else 0)
    reason = out.choices[0].finish_reason
    assert delta("jaxmoe_requests_finished_total", (("endpoint", "/v1/completions"), ("finish_reason", reason))) == 1
    assert delta("jaxmoe_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200"))) == 1
    server.http.get("/no/such/path")
    m2 = metrics(server)
    assert m2[("jaxmoe_http_requests_total", (("endpoint", "other"), ("status", "404")))] >= 1
    assert m2[("jaxmoe_cache_slots", ())] == model.engine.n_slots
    for gauge in ("jaxmoe_cache_slots_in_use", "jaxmoe_requests_in_flight", "jaxmoe_requests_waiting"):
        assert m2[(gauge, ())] == 0
    types = {f.name: f.type for f in text_string_to_metric_families(server.http.get("/metrics").text)}
    assert types["jaxmoe_time_to_first_token_seconds"] == "histogram"
    assert types["jaxmoe_time_per_output_token_seconds"] == "histogram"
    assert types["jaxmoe_generation_tokens"] == "counter" and types["jaxmoe_cache_slots_in_use"] == "gauge"
