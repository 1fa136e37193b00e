"""`jaxmoe serve`: its user errors, and shutdown: on SIGTERM the request in flight finishes,
then the process exits 0; a request still running when the graceful wait is over is cancelled
in the engine (its slot freed)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from jaxmoe.cli import main

from .conftest import live


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/ckpt"], "does not exist"),
    (["--port", "70000"], "--port"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--n-slots", "0"], "--n-slots"),
])
def test_serve_user_errors_exit_2(capsys, tiny_ckpt, args, message):
    argv = ["serve", "--model", str(tiny_ckpt), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxmoe: error:") and message in err and "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_finishes_the_request_in_flight_on_sigterm(tiny_ckpt):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxmoe.cli", "serve", "--model", str(tiny_ckpt), "--port", str(port), "--cpu-kernels",
         "off", "--max-seq-len", "64", "--shutdown-timeout", "60", "--log-level", "warning", "--served-model-name", "t"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        body = {"model": "t", "prompt": "Hello", "max_tokens": 24, "temperature": 0, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 1:
                    proc.send_signal(signal.SIGTERM)  # while the request generates
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "jaxmoe serve: 't'" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_request_outliving_the_graceful_wait_is_cancelled(model, held_engine):
    """The engine is held after a few steps so that the request cannot finish; the server is
    stopped with a 1 s graceful wait: uvicorn cancels the response, the app's shutdown cancels
    the generation, and once the engine runs again the request is dropped."""
    engine = model.engine
    body = {"prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    try:
        with live(model, graceful_s=1, shutdown_cancel_timeout=0.5) as s:
            got = []

            def client():
                try:
                    with s.http.stream("POST", "/v1/completions", json=body) as r:
                        got.extend(r.iter_lines())
                except httpx.HTTPError as e:
                    got.append(e)

            t = threading.Thread(target=client)
            t.start()
            deadline = time.monotonic() + 30
            while not (s.state._streams and next(iter(s.state._streams))._handle is not None):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            (stream,) = list(s.state._streams)
            handle = stream._handle
        # live() has closed the server: the graceful wait ran out and the generation was cancelled
        assert stream.cancelled and handle.finish_reason is None
    finally:
        held_engine.set()
    deadline = time.monotonic() + 30
    while handle.finish_reason is None or engine.scheduler.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t.join(timeout=30)
    assert handle.finish_reason == "cancelled" and len(handle.output_ids) < body["max_tokens"]
    assert "data: [DONE]" not in got
