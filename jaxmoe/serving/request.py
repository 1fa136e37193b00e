"""A generation request and its life in the engine: waiting -> prefilling -> decoding -> finished."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from jaxmoe.planning.strategies import STREAMED
from jaxmoe.serving.sampling import SamplingParams

_ids = itertools.count()


class RequestRefused(ValueError):
    """The request can never run on this engine (e.g. longer than the cache can hold)."""


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclasses.dataclass
class TokenEvent:
    """One emitted token (or the final event, token=None, with finish_reason set)."""

    token: int | None
    index: int
    finish_reason: str | None = None
    time: float = 0.0


@dataclasses.dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    eos_token_ids: tuple[int, ...] = ()
    stop_token_ids: tuple[tuple[int, ...], ...] = ()
    id: int = dataclasses.field(default_factory=lambda: next(_ids))

    # engine-owned state
    prefill_strategy: str | None = None  # "cpu" | "resident" | "slp" | "dslp", set at submit
    prefill_plan: Any = None  # the planner's PrefillEstimate behind it (None when forced without one)
    status: Status = Status.WAITING
    slot: int | None = None
    n_prefilled: int = 0
    cached_tokens: int = 0  # prompt positions taken from the prefix cache, not computed
    output_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    _events: queue.Queue = dataclasses.field(default_factory=queue.Queue, repr=False)
    _cancel: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    @property
    def total_len(self) -> int:
        """Positions the request occupies at most: prompt + generated tokens."""
        return len(self.prompt_ids) + self.max_new_tokens

    @property
    def streamed(self) -> bool:
        """Is the prompt prefilled by stream-loading (SLP/DSLP) instead of the engine's steps?"""
        return self.prefill_strategy in STREAMED

    @property
    def next_position(self) -> int:
        return self.n_prefilled + len(self.output_ids)

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (finish_reason "cancelled")."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, token: int) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.output_ids.append(token)
        self._events.put(TokenEvent(token, len(self.output_ids) - 1, None, now))

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finished_at = time.perf_counter()
        self._events.put(TokenEvent(None, len(self.output_ids), reason, self.finished_at))

    def fail(self, error: BaseException) -> None:
        self.status = Status.FINISHED
        self.finish_reason = "error"
        self.finished_at = time.perf_counter()
        self._events.put(error)

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Blocking iterator over this request's tokens, ending with the final event."""
        while True:
            ev = self._events.get(timeout=timeout)
            if isinstance(ev, BaseException):
                raise ev
            yield ev
            if ev.finish_reason is not None:
                return

    def check_stop(self) -> str | None:
        """The finish reason after the last emitted token, or None to go on."""
        out = self.output_ids
        if out and out[-1] in self.eos_token_ids:
            return "eos"
        for seq in self.stop_token_ids:
            if seq and len(out) >= len(seq) and tuple(out[-len(seq) :]) == seq:
                return "stop"
        if len(out) >= self.max_new_tokens:
            return "length"
        return None
