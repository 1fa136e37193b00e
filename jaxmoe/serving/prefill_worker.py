"""Stream-loaded prompts beside the decode steps (`RuntimeConfig.prefill_beside_decode`).

Without it the engine runs one streamed chunk, then the other slots' step, in turn: the
decoders wait for every chunk. With it a worker thread streams the prompt's chunks through
the SLP pipeline (`StreamedPromptRunner.compute_chunk`) back to back while the engine's thread
keeps running decode steps; on an accelerator the two share the device's queue only for as
long as one stream unit of the pipeline computes (it awaits each unit before the next).

Everything that touches the engine's state stays on the engine's thread: the worker only
computes. It posts each chunk's latents (already on the slot's device) and, with the last
chunk, the sampled first token; the engine applies them between its steps (`Engine._collect`:
latents written through the request's block table, the prompt's progress and first token
through the scheduler), and drops the results of a request it no longer runs (cancelled:
its blocks may already serve another request, so nothing of it is written). The prefill
cache of a request with a cached prefix is prepared on the engine's thread before the worker
starts (it reads the pool). One prompt at a time, oldest first.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from typing import Any

from jaxmoe.serving.request import Status
from jaxmoe.serving.scheduler import RowPlan, Scheduler, StepPlan


@dataclasses.dataclass
class ChunkDone:
    row: RowPlan  # the chunk (its request, tokens, start, whether it sampled)
    latents: tuple[Any, Any, Any]  # (c_kv, k_pe, positions) for Executor.write_latents
    token: int | None  # the first token, when the chunk ended the prompt


@dataclasses.dataclass
class PromptFailed:
    request: Any
    error: BaseException


@dataclasses.dataclass
class PromptLeft:
    request: Any  # the worker is done with it (finished, cancelled or failed)


class PrefillWorker:
    """Streams one prompt at a time in a daemon thread; results in `results` (a queue of
    ChunkDone, PromptFailed, PromptLeft). The thread ends when it has no prompt left (it holds
    the runner, and through it the weights: an engine let go keeps none of it alive) and starts
    again with the next one."""

    def __init__(self, runner: Any, chunk_size: int):
        self.runner, self.chunk_size = runner, chunk_size
        self.results: queue.Queue = queue.Queue()
        self.current: Any = None  # the request being streamed (until its PromptLeft is collected)
        self._jobs: collections.deque = collections.deque()  # guarded by _lock
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the thread's end against the next start

    @property
    def busy(self) -> bool:
        return self.current is not None

    def start(self, req: Any, table: Any) -> None:
        """Stream `req`'s prompt from req.n_prefilled on (call on the engine's thread, while idle)."""
        if self.busy:
            raise RuntimeError("the prefill worker streams one prompt at a time")
        self.runner.prepare(req, table)
        self.current = req
        with self._lock:
            self._jobs.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="jaxmoe-prefill", daemon=True)
                self._thread.start()

    def start_next(self, scheduler: Scheduler, table_of) -> None:
        """While idle, start the oldest running request whose prompt is streamed (engine's thread)."""
        if self.busy:
            return
        waiting = [r for r in scheduler.running.values() if r.status is Status.PREFILL and r.streamed]
        if waiting:
            req = min(waiting, key=lambda r: r.id)
            self.start(req, table_of(req))

    def collect(self, scheduler: Scheduler, table_of, *, wait: bool) -> None:
        """Apply the results posted so far (with `wait`, at least one, or 0.5 s) on the engine's
        thread: latents written through the request's block table, progress and first token
        through `scheduler.update`; a failure fails the request; results of a request no longer
        running are dropped."""
        items = []
        try:
            items.append(self.results.get(timeout=0.5) if wait else self.results.get_nowait())
            while True:
                items.append(self.results.get_nowait())
        except queue.Empty:
            pass
        for item in items:
            req = item.row.request if isinstance(item, ChunkDone) else item.request
            if isinstance(item, PromptLeft):
                if self.current is req:
                    self.current = None
            elif scheduler.running.get(req.slot) is not req or req.cancelled:
                continue  # cancelled (its blocks may serve another request now): nothing is written
            elif isinstance(item, PromptFailed):
                scheduler.forget(req)
                req.fail(item.error)
            else:
                self.runner.executor.write_latents(req.slot, *item.latents, table_of(req))
                plan = StepPlan(1, {}, {req.slot: item.row})
                scheduler.update(plan, {req.slot: item.token} if item.row.samples else {})

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread = None
                    return
                req = self._jobs.popleft()
            try:
                pos, n_prompt = req.n_prefilled, len(req.prompt_ids)
                while pos < n_prompt and not req.cancelled:
                    n = min(self.chunk_size, n_prompt - pos)
                    row = RowPlan(req, req.prompt_ids[pos:pos + n], pos, pos + n == n_prompt)
                    latents, token = self.runner.compute_chunk(row)
                    self.results.put(ChunkDone(row, latents, token))
                    pos += n
            except BaseException as e:  # handed to the engine, which fails the request
                self.results.put(PromptFailed(req, e))
            finally:
                self.runner.drop(req)
                self.results.put(PromptLeft(req))
