"""One request's generation in a thread of its own, its tokens handed to the event loop.

`generate.stream_generate` is a blocking iterator (it waits on the engine's per-request
event queue), so each admitted request gets a daemon thread that iterates it and passes
every `StreamResponse` to an `asyncio.Queue` through `loop.call_soon_threadsafe`; the event
loop never blocks on the engine. The engine batches the requests of all these threads.

Cancelling (`GenerationStream.cancel`, from the event loop: a client that went away, a
shutdown) cancels the engine's request directly -- the handle comes from stream_generate's
`on_submit` -- so its cache slot is freed at the engine's next step even while the thread
waits for a token (or for a long prompt's prefill); the thread then sees the request end,
closes the iterator and reports itself done.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from jaxmoe.generate import StreamResponse

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class GenerationStream:
    """Iterate a `stream_generate(..., on_submit=stream.submitted)` in a thread (`start`); read
    its responses on the event loop with `responses()`. `on_done` runs in the thread once the
    generation is over (finished, cancelled or failed)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_done: Callable[[], None] = lambda: None):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._on_done = on_done
        self._cancelled = threading.Event()
        self._handle: Any = None  # the engine's Request, once submitted
        self._thread: threading.Thread | None = None
        self.done = threading.Event()
        self.cancel_reason: str | None = None

    def start(self, it: Iterator[StreamResponse]) -> None:
        self._thread = threading.Thread(target=self._work, args=(it,), name="jaxmoe-request", daemon=True)
        self._thread.start()

    # ---- the request's thread ---------------------------------------------------------------
    def submitted(self, handle: Any) -> None:
        """stream_generate's `on_submit`: the engine's request, to cancel it from the event loop."""
        self._handle = handle
        if self._cancelled.is_set():  # cancelled before the engine had it
            handle.cancel()

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody reads any more
            pass

    def _work(self, it: Iterator[StreamResponse]) -> None:
        try:
            for item in it:
                if self._cancelled.is_set():
                    break
                self._put(item)
        except BaseException as e:  # handed to the reader, which answers with an error
            self._put(_Failed(e))
        finally:
            try:
                if hasattr(it, "close"):
                    it.close()  # stream_generate's finally cancels the engine request
            finally:  # done before the reader sees the end
                self.done.set()
                self._on_done()
                self._put(_END)

    # ---- the event loop ---------------------------------------------------------------------
    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the generation: the engine frees the request's slot at its next step."""
        if self._cancelled.is_set():
            return
        self.cancel_reason = reason
        self._cancelled.set()
        handle = self._handle
        if handle is not None:
            handle.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def responses(self) -> AsyncIterator[StreamResponse]:
        """The responses as they come; raises the generation's error, if any. Ends early (no
        finish_reason) when the request was cancelled."""
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def join(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)
