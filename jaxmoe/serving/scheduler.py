"""Continuous batching over cache slots: which request runs which tokens in the next step.

Pure bookkeeping, no arrays and no clock: the engine asks for a `StepPlan`, runs it, and
reports the sampled tokens back. Policy:

- requests wait in FIFO order and take a free slot as soon as one exists and (with `blocks`,
  the paged cache's `serving.kv_blocks.KVBlocks`) the cache blocks for prompt + max_new_tokens
  can be reserved -- sharing the longest cached prefix of its prompt, whose positions then
  count as prefilled; a request that can never fit (prompt + max_new_tokens > cache length,
  or more blocks than a pool has) is refused when it is added; blocks are given back when a
  request finishes, and its full blocks are registered for sharing as they fill;
- every decoding request advances one token per step;
- prefilling requests get the rest of the step's token budget in chunks of at most
  `chunk_size` tokens (chunked prefill), or `decode_chunk_size` while other requests decode
  (they wait for the step), so a long prompt never stalls the decoders for long; with
  `step_overhead` (columns: the cpu-only engine, whose dense Linears compute a step's padding)
  a prompt's last tokens are cut where the padding of one step would cost more than another
  step (`step_shapes.next_chunk`: 151 tokens run as 128 + 23, not in one 256-wide step);
- with a TPOT target (`tpot_target_s` and a `step_time` model: the engine passes the planner's
  CPU step model, `planning.kernel_model.KernelModel.mixed_step`), a step that carries decode
  rows takes the widest prompt chunk (`chunk_buckets`: 1, 2, 4, 8 tokens, then the width
  buckets MIN_WIDTH_BUCKET, 2x, ... up to `decode_chunk_size`) whose predicted step time
  (decode rows + the chunk; the engine's model corrects itself by the steps it measures) stays
  within the target -- the widest that compiles no new program where one fits, as the model
  tells (a new program stalls the decoders while it compiles) -- and at least one token, so
  the prompt always advances; a chunk
  under MIN_WIDTH_BUCKET makes the step that narrow (`step_shapes.narrow_width`; one token runs
  with the decode rows); without decoders the chunk is `chunk_size`. Only the chunking
  changes, never a token;
- a step with any prefill work is `chunk_size` (or `decode_chunk_size`) wide, a pure decode
  step is 1 wide: at most three planned widths (the fused executor narrows them to
  the buckets of `step_shapes`);
- a request whose prompt is stream-loaded (`Request.streamed`: SLP/DSLP) is kept out of the
  steps' rows while it prefills: each step carries one chunk of the oldest such prompt in
  `StepPlan.streamed`, run by the engine beside (before) the step of the other slots.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from jaxmoe.serving.request import Request, RequestRefused, Status
from jaxmoe.step_shapes import MIN_WIDTH_BUCKET, narrow_width, next_chunk


@dataclasses.dataclass
class RowPlan:
    request: Request
    tokens: list[int]
    start: int  # position of tokens[0]
    samples: bool  # does the last token's logit produce the request's next token?

    @property
    def end(self) -> int:
        """The position after its last token: the keys it reaches."""
        return self.start + len(self.tokens)

    @property
    def decodes(self) -> bool:
        """A decode row (one token fed back), not a prompt chunk; as planned, before `update`."""
        return len(self.tokens) == 1 and self.request.status is Status.DECODE


@dataclasses.dataclass
class StepPlan:
    width: int
    rows: dict[int, RowPlan]  # slot -> work
    streamed: dict[int, RowPlan] = dataclasses.field(default_factory=dict)  # slot -> a stream-loaded chunk
    predicted_s: float | None = None  # the step model's time of the step, where the TPOT target sized its chunk

    @property
    def n_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows.values())


# (decode rows, prompt chunks' lengths, the decode rows' end, each chunk's end) -> seconds
StepTimeModel = Callable[[int, list[int], int, list[int]], float]


def chunk_buckets(cap: int) -> list[int]:
    """The prompt chunks a step with decode rows may take under a TPOT target, smallest first:
    one token (it runs with the decode rows), the narrow widths 2, 4, 8 (`narrow_width`), then
    the width buckets the executor compiles for steps of at most `cap` columns (MIN_WIDTH_BUCKET,
    2x, ... below `cap`, then `cap`)."""
    out, b = [], 1
    while b < cap:
        out.append(b)
        b *= 2
    return [*out, cap]


class Scheduler:
    """`tpot_target_s` with `step_time`: size the prompt chunk of steps with decode rows so that
    the predicted step time stays within the target (module docstring)."""

    def __init__(self, n_slots: int, max_len: int, chunk_size: int, token_budget: int | None = None,
                 decode_chunk_size: int | None = None, *, tpot_target_s: float | None = None,
                 step_time: StepTimeModel | None = None, blocks=None, step_overhead: int | None = None):
        if n_slots < 1 or chunk_size < 1 or (decode_chunk_size is not None and decode_chunk_size < 1):
            raise ValueError("n_slots, chunk_size and decode_chunk_size must be >= 1")
        if tpot_target_s is not None and (tpot_target_s <= 0 or step_time is None):
            raise ValueError("tpot_target_s must be > 0 and comes with a step_time model")
        self.tpot_target_s, self.step_time = tpot_target_s, step_time
        self.n_slots = n_slots
        self.max_len = max_len
        self.chunk_size = chunk_size
        self.decode_chunk_size = min(decode_chunk_size or chunk_size, chunk_size)
        self.token_budget = token_budget or max(chunk_size, n_slots)
        self.blocks = blocks  # KVBlocks, or None: no block accounting (slots only)
        self.step_overhead = step_overhead  # a step's fixed cost in columns: cut prompts' last tokens (None: never)
        self.stream_chunks = True  # hand streamed prompts' chunks to the steps (False: the engine's prefill worker runs them)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}

    # ---- admission ------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if not req.prompt_ids:
            raise RequestRefused("empty prompt: a request needs at least one token")
        if req.total_len > self.max_len:
            raise RequestRefused(
                f"request needs {len(req.prompt_ids)} prompt + {req.max_new_tokens} new = "
                f"{req.total_len} positions but the engine's cache holds {self.max_len} per sequence"
            )
        if self.blocks is not None and not self.blocks.fits_ever(req.total_len):
            raise RequestRefused(
                f"request needs {req.total_len} positions ({self.blocks.blocks_needed(req.total_len)} cache blocks) but "
                f"the engine's paged cache has fewer blocks (raise memory_budget_bytes)"
            )
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        free = [s for s in range(self.n_slots) if s not in self.running]
        while free and self.waiting:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                req.finish("cancelled")
                continue
            if self.blocks is not None and not self.blocks.admit(req, free[0]):
                break  # the pool is short: it waits (first in, first out) for blocks to come back
            self.waiting.popleft()
            req.slot, req.status = free.pop(0), Status.PREFILL
            self.running[req.slot] = req

    def drop_cancelled(self) -> list[Request]:
        gone = [r for r in self.running.values() if r.cancelled]
        for r in gone:
            self.release(r, "cancelled")
        kept = collections.deque()
        for r in self.waiting:
            if r.cancelled:
                r.finish("cancelled")
                gone.append(r)
            else:
                kept.append(r)
        self.waiting = kept
        return gone

    def release(self, req: Request, reason: str) -> None:
        self.forget(req, reusable=True)
        req.finish(reason)

    def forget(self, req: Request, *, reusable: bool = False) -> None:
        """Take a request out of its slot and give back its cache blocks (without finishing it);
        `reusable`: its cache positions are whole (not a failed step), keep them for prefixes."""
        if self.running.get(req.slot) is req:
            del self.running[req.slot]
        if self.blocks is not None:
            self.blocks.release(req, reusable=reusable)

    # ---- planning -------------------------------------------------------------------------
    def plan(self) -> StepPlan | None:
        self.drop_cancelled()
        self._admit()
        if not self.running:
            return None
        rows: dict[int, RowPlan] = {}
        budget = self.token_budget
        for slot, req in sorted(self.running.items()):
            if req.status is Status.DECODE:
                rows[slot] = RowPlan(req, [req.output_ids[-1]], req.next_position - 1, True)
                budget -= 1
        chunk = self.decode_chunk_size if rows else self.chunk_size
        streamed: dict[int, RowPlan] = {}
        prompts = []  # (slot, request) prefilling through the step, oldest first
        for slot, req in sorted(self.running.items(), key=lambda kv: kv[1].id):
            if req.status is Status.PREFILL and req.streamed:
                if self.stream_chunks and not streamed:  # one streamed chunk per step, oldest prompt first
                    streamed[slot] = self._chunk(req, self.chunk_size)
            elif req.status is Status.PREFILL:
                prompts.append((slot, req))
        predicted = None
        if rows and prompts and self.tpot_target_s is not None:
            chunks, predicted = self._sized_chunks(rows, prompts, chunk, budget)
        else:
            chunks = self._chunks(prompts, chunk, min(budget, chunk) if rows else budget)
        rows.update(chunks)
        width = 1 if all(r.decodes for r in rows.values()) else chunk
        longest = max((len(r.tokens) for r in chunks.values()), default=0)
        if predicted is not None and longest < MIN_WIDTH_BUCKET:  # the target's narrow chunks run narrow
            width = narrow_width(longest)
        return StepPlan(width, rows, streamed, predicted)

    def _chunks(self, prompts, limit: int, budget: int) -> dict[int, RowPlan]:
        """Chunks of at most `limit` tokens for the prompts in order while `budget` lasts."""
        out = {}
        for slot, req in prompts:
            if budget <= 0:
                break
            out[slot] = self._chunk(req, min(limit, budget), self.step_overhead)
            budget -= len(out[slot].tokens)
        return out

    def _sized_chunks(self, decode: dict[int, RowPlan], prompts, cap: int, budget: int):
        """The prompt chunks of a step with decode rows under the TPOT target: the widest bucket
        whose predicted step time fits, else one token; with a model that knows what has been
        compiled (`step_time.compiled`), the widest that fits without compiling where one does.
        Returns (chunks, predicted seconds)."""
        end = max((r.end for r in decode.values()), default=0)
        compiled = getattr(self.step_time, "compiled", None)
        best = best_compiled = None
        for c in chunk_buckets(cap):
            chunks = self._chunks(prompts, c, min(budget, c))
            n, ends = [len(r.tokens) for r in chunks.values()], [r.end for r in chunks.values()]
            t = self.step_time(len(decode), n, end, ends)
            if best is None or t <= self.tpot_target_s:
                best = (chunks, t)
                if t <= self.tpot_target_s and compiled is not None and compiled(len(decode), n, end, ends):
                    best_compiled = best
            if t > self.tpot_target_s or sum(n) < min(budget, c):  # too slow, or wider takes no more tokens
                break
        return best_compiled or best

    @staticmethod
    def _chunk(req: Request, limit: int, overhead: int | None = None) -> RowPlan:
        n = next_chunk(len(req.prompt_ids) - req.n_prefilled, limit, overhead)
        toks = req.prompt_ids[req.n_prefilled : req.n_prefilled + n]
        return RowPlan(req, toks, req.n_prefilled, req.n_prefilled + n == len(req.prompt_ids))

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[Request]:
        """Apply a step's outcome (slot -> sampled token for rows that sample). Returns finished requests."""
        done = []
        for slot, row in [*plan.streamed.items(), *plan.rows.items()]:
            req = row.request
            if req.status is Status.PREFILL:
                req.n_prefilled += len(row.tokens)
            if row.samples:
                req.status = Status.DECODE
                req.emit(sampled[slot])
            if self.blocks is not None:  # positions written so far: the prompt's, then each token fed back
                self.blocks.commit(req, req.n_prefilled + max(len(req.output_ids) - 1, 0))
            if not row.samples:
                continue
            reason = req.check_stop()
            if reason is not None:
                self.release(req, reason)
                done.append(req)
        return done
