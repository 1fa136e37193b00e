"""Fuzzed request bodies never make the server answer 500: schemathesis against the app's own
OpenAPI document (bodies that fit it and bodies that do not), and a hypothesis strategy that
mutates valid bodies (wrong types, missing fields, huge numbers, unicode, odd JSON).

The fuzzed server's generations are cancelled as soon as they are admitted: everything up to
the engine -- parsing, validation, the chat template, stream_generate's own checks, admission
-- runs for real, but no fuzzed request spends time generating (the other tests do that)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import NAME, live

schemathesis = pytest.importorskip("schemathesis")


def _schemathesis_loads() -> str | None:
    """Why schemathesis cannot load a schema here, or None. (A `packaging` directory of tests on
    pytest's sys.path hides the `packaging` library schemathesis imports.)"""
    try:
        from schemathesis.specs.openapi import schemas  # noqa: F401
    except ImportError as e:
        return f"schemathesis cannot load schemas here: {e}"
    return None

FUZZ = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_server(model):
    with live(model, max_queue=1000) as s:
        start = s.state.start

        def start_and_cancel(job):
            stream = start(job)
            stream.cancel("shutdown")
            return stream

        s.state.start = start_and_cancel
        yield s
        s.wait_idle()


def _assert_not_500(r: httpx.Response) -> None:
    assert r.status_code < 500 or r.status_code == 503, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_500(fuzz_server, mode):
    if why := _schemathesis_loads():
        pytest.skip(why)
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    strategy = schema.as_strategy(GenerationMode(mode))
    seen = set()

    @FUZZ
    @given(case=strategy)
    def check(case):
        seen.add(f"{case.method} {case.path}")
        kwargs = case.as_transport_kwargs(base_url=fuzz_server.url)
        r = httpx.request(kwargs["method"], kwargs["url"], headers=kwargs.get("headers"), params=kwargs.get("params"),
                          json=kwargs["json"] if "json" in kwargs else None, content=kwargs.get("data"), timeout=60)
        _assert_not_500(r)

    check()
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= seen


VALID = {
    "/v1/chat/completions": {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                             "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["\n"], "stream": False,
                             "stream_options": None, "n": 1, "tools": None, "tool_choice": None},
    "/v1/completions": {"model": NAME, "prompt": "Hi", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "seed": 1,
                        "stop": "\n", "stream": False, "n": 1, "logprobs": None, "echo": False},
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@st.composite
def mutated_bodies(draw):
    path = draw(st.sampled_from(sorted(VALID)))
    body = dict(VALID[path])
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(body)) | st.text(max_size=6))
        action = draw(st.sampled_from(["replace", "delete", "huge", "unicode"]))
        if action == "delete":
            body.pop(key, None)
        elif action == "huge":
            body[key] = draw(st.sampled_from([10**30, -(10**30), 1e308, -1, 0, 2**64]))
        elif action == "unicode":
            body[key] = draw(st.text(alphabet=st.characters(codec="utf-8"), max_size=30))
        else:
            body[key] = draw(json_values)
    if draw(st.booleans()) and isinstance(body.get("messages"), list):
        body["messages"] = [draw(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool", "x"])},
                                                       optional={"content": json_values, "tool_calls": json_values}))]
    return path, body


@FUZZ
@given(mutated_bodies())
def test_mutated_bodies_find_no_500(fuzz_server, case):
    path, body = case
    _assert_not_500(fuzz_server.http.post(path, json=body))


@FUZZ
@given(path=st.sampled_from(sorted(VALID)), raw=st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_raw_bytes_find_no_500(fuzz_server, path, raw):
    r = fuzz_server.http.post(path, content=raw, headers={"content-type": "application/json"})
    _assert_not_500(r)
    try:
        json.loads(raw)
    except ValueError:
        assert r.status_code == 400
