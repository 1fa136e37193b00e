"""Fixtures for the server tests: the tiny synthetic FP8 checkpoint (with its tokenizer),
loaded once on the pure JAX path (its compiled steps are shared with every tiny model loaded
that way, e.g. the CLI tests'), and live uvicorn servers on 127.0.0.1 (a free port each) in
background threads, over that one model: the engine's continuous batching is shared by all."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import jaxmoe
from jaxmoe.config import ModelConfig
from jaxmoe.loading.synthetic import write_synthetic_checkpoint
from jaxmoe.server.app import create_app

NAME = "tiny"
API_KEY = "test-key-123"


class LiveServer:
    """An app served by uvicorn in a thread: `url`, `client()` (openai), `http` (httpx)."""

    def __init__(self, app, graceful_s: int = 5):
        self.app = app
        self.state = app.state.server
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_s))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def client(self, api_key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def wait_idle(self, timeout: float = 30) -> None:
        """Until nothing is in flight and every cache slot is free."""
        engine = self.state.model.engine
        deadline = time.monotonic() + timeout
        while self.state.in_flight() or engine.scheduler.running or engine.scheduler.waiting:
            assert time.monotonic() < deadline, "requests still in flight"
            time.sleep(0.01)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def live(model, graceful_s: int = 5, **kw):
    s = LiveServer(create_app(model, served_model_name=NAME, **kw), graceful_s)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("server") / "tiny-fp8"
    write_synthetic_checkpoint(path, ModelConfig.named("tiny"), fmt="fp8", seed=0, with_tokenizer=True)
    return path


@pytest.fixture(scope="session")
def model(tiny_ckpt) -> jaxmoe.Model:
    return jaxmoe.load(tiny_ckpt, cpu_kernels=False)


@pytest.fixture(scope="session")
def server(model):
    with live(model) as s:
        yield s


@pytest.fixture
def held_engine(model, monkeypatch):
    """The model's engine held after three more steps (a gate before each step) until the
    returned event is set, so a request cannot finish by itself; released at the end."""
    engine = model.engine
    gate, step, start = threading.Event(), engine.step, engine.steps_run

    def gated_step():
        if engine.steps_run >= start + 3:
            gate.wait()
        return step()

    monkeypatch.setattr(engine, "step", gated_step)
    yield gate
    gate.set()
