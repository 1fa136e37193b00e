"""Every refusal is OpenAI's error JSON with the right status: 400 for invalid or unsupported
parameters and a context overflow (with the numbers), 400 (not 422) for a body that does not
validate, 401 without the API key, 404 for an unknown model or path, 503 with Retry-After when
the admission queue is full."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from .conftest import API_KEY, NAME, live

MSG = [{"role": "user", "content": "Hi"}]


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def chat(**kw):
    return {"model": NAME, "messages": MSG, "max_tokens": 2, "temperature": 0} | kw


def comp(**kw):
    return {"model": NAME, "prompt": "Hi", "max_tokens": 2, "temperature": 0} | kw


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/chat/completions", chat(n=2), "n", "n=2"),
    ("/v1/chat/completions", chat(logprobs=True), "logprobs", "not supported"),
    ("/v1/chat/completions", chat(top_logprobs=3), "top_logprobs", "not supported"),
    ("/v1/completions", comp(logprobs=2), "logprobs", "not supported"),
    ("/v1/completions", comp(prompt=["a", "b"]), "prompt", "2 prompts"),
    ("/v1/completions", comp(prompt=[[1, 2], [3]]), "prompt", "2 prompts"),
    ("/v1/completions", comp(echo=True), "echo", "echo"),
    ("/v1/completions", comp(best_of=3), "best_of", "best_of"),
    ("/v1/completions", comp(prompt=""), "prompt", "empty"),
    ("/v1/completions", comp(prompt=[]), "prompt", "empty"),
    ("/v1/completions", comp(prompt=[1, 99999]), "prompt", "vocabulary"),
    ("/v1/chat/completions", chat(temperature=-1), "temperature", "temperature"),
    ("/v1/chat/completions", chat(top_p=0), "top_p", "top_p"),
    ("/v1/chat/completions", chat(top_k=-3), "top_k", "top_k"),
    ("/v1/chat/completions", chat(seed=2**40), "seed", "seed"),
    ("/v1/chat/completions", chat(stop=[""]), "stop", "stop"),
    ("/v1/chat/completions", chat(max_tokens=0), "max_tokens", ">= 1"),
    ("/v1/chat/completions", chat(presence_penalty=0.5), "presence_penalty", "not supported"),
    ("/v1/chat/completions", chat(tool_choice="required", tools=[{"type": "function", "function": {"name": "f"}}]),
     "tool_choice", "required"),
    ("/v1/chat/completions", chat(response_format={"type": "json_object"}), "response_format", "not supported"),
    ("/v1/chat/completions", chat(stream_options={"include_usage": True}), "stream_options", "stream"),
    ("/v1/chat/completions", chat(messages=[]), "messages", "non-empty"),
])
def test_invalid_or_unsupported_parameters_are_400(server, path, body, param, words):
    err = _error(server.http.post(path, json=body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"]


def test_context_overflow_names_the_numbers(server, model):
    limit = model.context_len
    err = _error(server.http.post("/v1/completions", json=comp(prompt=[5] * 100, max_tokens=limit)), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    for n in (limit, 100, limit + 100):
        assert str(n) in err["message"]
    err = _error(server.http.post("/v1/completions", json=comp(prompt=[5] * limit, max_tokens=None)), 400)
    assert err["code"] == "context_length_exceeded" and str(limit) in err["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x " * limit}],
                                                max_tokens=4)


@pytest.mark.parametrize("content, body", [
    ("application/json", b"{"),
    ("application/json", b"[]"),
    ("application/json", b"null"),
    ("application/json", b""),
    ("application/json", b'{"messages": 5}'),
    ("application/json", b'{"messages": [{"role": "robot", "content": "x"}]}'),
    ("application/json", b'{"messages": [{"role": "user", "content": 7}]}'),
    ("application/json", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "lots"}'),
    ("application/json", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
    ("application/json", b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}'),
    ("application/json", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1' + b"0" * 5000 + b"}"),
    ("application/json", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}'),
    ("text/plain", b"hello"),
    ("application/json", b"\xff\xfe"),
])
def test_malformed_bodies_are_400_not_422_or_500(server, content, body):
    _error(server.http.post("/v1/chat/completions", content=body, headers={"content-type": content}), 400)


def test_unknown_model_and_path_are_404(server):
    err = _error(server.http.post("/v1/chat/completions", json=chat(model="gpt-4")), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4" in err["message"]
    _error(server.http.post("/v1/completions", json=comp(model="nope")), 404)
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("nope")
    _error(server.http.get("/v1/nothing"), 404)
    _error(server.http.get("/v1/chat/completions"), 405)


@pytest.fixture(scope="module")
def keyed(model):
    """A second app over the same model: an API key, and no queue beyond the engine's slots."""
    with live(model, api_key=API_KEY, max_queue=0) as s:
        yield s


def test_api_key_is_required_except_for_health(keyed):
    for method, path in [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                         ("GET", "/metrics"), ("GET", "/openapi.json")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            err = _error(keyed.http.request(method, path, json=chat(), headers=headers), 401)
            assert err["code"] == "invalid_api_key"
    # the key is checked before the body is read: a bad body without a key is still a 401
    _error(keyed.http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}), 401)
    assert keyed.http.get("/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").models.list()
    assert keyed.client(API_KEY).models.list().data[0].id == NAME
    out = keyed.client(API_KEY).chat.completions.create(model=NAME, messages=MSG, max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_full_queue_is_503_with_retry_after(keyed, model):
    """max_queue=0: n_slots requests in flight fill it. The engine is held (its lock) so that
    they stay in flight; one more is refused at once; released, the others complete."""
    n = keyed.state.n_slots
    statuses, headers = [], {"Authorization": f"Bearer {API_KEY}"}
    engine = model.engine
    with engine._lock:
        threads = [threading.Thread(target=lambda: statuses.append(
            keyed.http.post("/v1/completions", json=comp(max_tokens=2), headers=headers).status_code)) for _ in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while keyed.state.in_flight() < n:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = keyed.http.post("/v1/completions", json=comp(), headers=headers)
        err = _error(r, 503)
        assert int(r.headers["Retry-After"]) >= 1 and err["code"] == "engine_overloaded" and str(n) in err["message"]
        with pytest.raises(openai.APIStatusError) as e:
            keyed.client(API_KEY).completions.create(model=NAME, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 503
    for t in threads:
        t.join(timeout=60)
    assert statuses == [200] * n
    keyed.wait_idle()
    assert keyed.http.post("/v1/completions", json=comp(), headers=headers).status_code == 200
