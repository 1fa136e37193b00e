"""Run the app under uvicorn: `serve(model, host=..., port=...)` (what `jaxmoe serve` calls).

SIGTERM / SIGINT: uvicorn stops accepting connections and waits up to `shutdown_timeout`
seconds for the requests in flight to finish; then it cancels what remains, and the app's
lifespan cancels their generations in the engine (freeing their slots) before the process
exits. A SIGTERM ends the process with status 0.
"""

from __future__ import annotations

import signal
import threading

import uvicorn

from jaxmoe.generate import Model
from jaxmoe.server.app import DEFAULT_MAX_QUEUE, create_app

DEFAULT_SHUTDOWN_TIMEOUT_S = 30


def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str,
          api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
          shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT_S, log_level: str = "info") -> None:
    app = create_app(model, served_model_name=served_model_name, api_key=api_key, max_queue=max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it shut down on once its handlers are gone: let SIGTERM end
    # here, after the graceful shutdown, instead of killing the process with it.
    if threading.current_thread() is not threading.main_thread():  # no signals there (tests)
        server.run()
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
