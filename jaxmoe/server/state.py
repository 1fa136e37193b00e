"""What one server holds: the model, its name, the metrics and the admitted generations.

Admission is bounded: at most `n_slots + max_queue` generations are in flight (the engine's
cache slots, plus `max_queue` requests waiting for one); one more is refused with a 503 and
`Retry-After` before anything is submitted. A generation counts until its thread is done,
so a cancelled request's place is free once the engine has dropped it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
import time
from pathlib import Path

from jaxmoe.generate import Model, stream_generate
from jaxmoe.server.bridge import GenerationStream
from jaxmoe.server.errors import APIError, invalid
from jaxmoe.server.jobs import Job
from jaxmoe.server.metrics import Metrics
from jaxmoe.server.tool_calls import TOOL_MARKERS

RETRY_AFTER_S = 1


def _fingerprint(model: Model) -> str:
    try:
        version = importlib.metadata.version("jaxmoe")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    return f"fp_jaxmoe-{version}-{Path(str(model.runtime.preset)).stem}"


class ServerState:
    def __init__(self, model: Model, *, served_model_name: str, max_queue: int):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        engine = model.engine  # created now (its cache allocated), not on the first request
        self.model = model
        self.served_model_name = served_model_name
        self.n_slots = engine.n_slots
        self.max_queue = max_queue
        self.created = int(time.time())
        self.fingerprint = _fingerprint(model)
        self._lock = threading.Lock()
        self._streams: set[GenerationStream] = set()
        self.metrics = Metrics(slots_in_use=lambda: len(engine.scheduler.running),
                               waiting=lambda: len(engine.scheduler.waiting),
                               in_flight=self.in_flight, n_slots=self.n_slots)

    @property
    def capacity(self) -> int:
        return self.n_slots + self.max_queue

    def in_flight(self) -> int:
        return len(self._streams)

    def start(self, job: Job) -> GenerationStream:
        """Validate `job` with stream_generate's own checks (400), admit it (503 when full),
        and start its thread."""
        stream = GenerationStream(asyncio.get_running_loop(), on_done=lambda: self._release(stream))
        try:
            it = stream_generate(self.model, job.prompt_ids, max_new_tokens=job.max_tokens, on_submit=stream.submitted,
                                 keep_special_tokens=TOOL_MARKERS if job.tools else (), **job.sampling)
        except ValueError as e:
            raise invalid(str(e), _param_of(str(e))) from None
        with self._lock:
            if len(self._streams) >= self.capacity:
                raise APIError(503, f"The server is overloaded: {len(self._streams)} requests in flight "
                                    f"({self.n_slots} cache slots + a queue of {self.max_queue}). Retry later.",
                               code="engine_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
            self._streams.add(stream)
        stream.start(it)
        return stream

    def _release(self, stream: GenerationStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def cancel_all(self, reason: str, timeout: float = 10.0) -> int:
        """Cancel every generation in flight and wait up to `timeout` s for their threads."""
        with self._lock:
            streams = list(self._streams)
        for s in streams:
            s.cancel(reason)
        deadline = time.monotonic() + timeout
        for s in streams:
            s.join(max(0.0, deadline - time.monotonic()))
        return len(streams)


_PARAMS = ("temperature", "top_k", "top_p", "seed", "stop", "max_new_tokens", "prompt")


def _param_of(message: str) -> str | None:
    """The parameter a jaxmoe ValueError names first (its messages start with it)."""
    for p in _PARAMS:
        if message.startswith(p):
            return "max_tokens" if p == "max_new_tokens" else p
    return None
