"""The step time a TPOT target sizes prompt chunks by (cpu-only engine, `tpot_target_ms`).

`StepModel(decode rows, prompt chunks' lengths, the decode rows' end, each chunk's end)` ->
seconds: the planner's CPU step model (`planning.kernel_model.KernelModel.mixed_step`) for the
programs FusedStep runs, each group of rows over the key window its own rows reach (a one-token
chunk runs with the decode rows; narrower chunks, with `grouped`, in one program with them:
`step_shapes.groups_in_one_program`), times a correction measured on this machine, now:

- after each step the target sized, the engine reports its wall time (`measured`);
- the correction is the largest measured / modelled time of the last `HISTORY` such steps
  (about their 94th percentile: the target bounds the decoders' p99, so a step must fit it
  however this one runs), kept apart for steps with and without a chunk program, whose errors
  differ (the second program's fixed cost);
- a kind's ratios age while it is not chosen: after each HISTORY measured steps of the other
  kind, its oldest ratio is dropped, and a kind with none takes the other's correction. One slow
  step (a page fault storm, a first run) would otherwise keep the larger chunks out for good:
  none would run again to be measured;
- a step that ran a program for the first time is left out: it may have compiled it, which
  says nothing of the next one. `compiled` tells the scheduler which steps would not compile
  (a new program stalls every decoder for as long as XLA takes), so it prefers them.
"""

from __future__ import annotations

import collections

from jaxmoe.step_shapes import MIN_WIDTH_BUCKET, groups_in_one_program, kv_window, narrow_width, row_bucket, width_bucket

HISTORY = 16


class StepModel:
    def __init__(self, km, n_slots: int, max_len: int, cap: int, grouped: bool = False):
        """km: the planner's KernelModel of this model on this hardware; cap: the widest chunk
        beside decode rows (decode_chunk_size); grouped: the executor runs narrow chunks in one
        program with the decode rows (the model family has `grouped_forward`)."""
        self.km, self.n_slots, self.max_len, self.cap, self.grouped = km, n_slots, max_len, cap, grouped
        self.ratios = {False: collections.deque(maxlen=HISTORY), True: collections.deque(maxlen=HISTORY)}
        self._ran: set[tuple] = set()  # the programs the steps it measured ran
        self._stale = {False: 0, True: 0}  # measured steps of the other kind since a kind's last ratio
        self._modelled: dict[tuple, float] = {}

    def shape(self, decoders: int, chunks: list[int], end: int, chunk_ends: list[int]) -> tuple:
        """(decode rows, chunk lengths, the decode program's key window, the chunk program's)."""
        one = [e for n, e in zip(chunks, chunk_ends) if n == 1]
        long = [e for n, e in zip(chunks, chunk_ends) if n > 1]
        return (decoders, tuple(chunks), kv_window(max([end, *one]), self.max_len),
                kv_window(max(long, default=1), self.max_len))

    def programs(self, shape: tuple) -> frozenset:
        """The programs a step of `shape` runs, as FusedStep compiles them: ("decode", rows,
        window) for the one-token rows, ("chunks", rows, width, window) for the others, or the
        two in one ("grouped", decode's, chunks')."""
        decoders, chunks, window, chunk_window = shape
        ones = decoders + sum(1 for n in chunks if n == 1)
        long = [n for n in chunks if n > 1]
        out = []
        if ones:
            out.append(("decode", row_bucket(ones, self.n_slots), window))
        if long:
            out.append(("chunks", row_bucket(len(long), self.n_slots), self._columns(max(long)), chunk_window))
        if self._grouped(shape) and len(out) == 2:
            return frozenset([("grouped", *out)])
        return frozenset(out)

    def _grouped(self, shape: tuple) -> bool:
        """Whether a step of `shape` runs its decode rows and chunks in one program."""
        return self.grouped and groups_in_one_program(self._columns(max(shape[1], default=1)))

    def _columns(self, longest: int) -> int:
        """The chunk program's columns for its longest chunk, as the scheduler plans them and
        FusedStep runs them: a narrow step under MIN_WIDTH_BUCKET, else the width bucket."""
        return width_bucket(longest, self.cap) if longest >= MIN_WIDTH_BUCKET else narrow_width(longest)

    def compiled(self, decoders: int, chunks: list[int], end: int, chunk_ends: list[int]) -> bool:
        """Whether every program such a step runs has run in a step measured here."""
        return self.programs(self.shape(decoders, chunks, end, chunk_ends)) <= self._ran

    def modelled(self, shape: tuple) -> float:
        """The step model's seconds for a `shape`, memoised."""
        t = self._modelled.get(shape)
        if t is None:
            decoders, chunks, window, chunk_window = shape
            t = self._modelled[shape] = self.km.mixed_step(decoders, list(chunks), window, self.n_slots,
                                                           self._columns(max(chunks, default=1)), chunk_window,
                                                           grouped=self._grouped(shape)).seconds
        return t

    def correction(self, chunk_program: bool) -> float:
        return max(self.ratios[chunk_program] or self.ratios[not chunk_program], default=1.0)

    def __call__(self, decoders: int, chunks: list[int], end: int, chunk_ends: list[int]) -> float:
        s = self.shape(decoders, chunks, end, chunk_ends)
        return self.modelled(s) * self.correction(max(chunks, default=0) > 1)

    def measured(self, decode_ends: list[int], chunks: list[int], chunk_ends: list[int], seconds: float) -> None:
        """A step the target sized took `seconds`: its decode rows ended at `decode_ends`, its
        chunks had `chunks` tokens ending at `chunk_ends`."""
        s = self.shape(len(decode_ends), chunks, max(decode_ends, default=0), chunk_ends)
        programs = self.programs(s)
        if programs <= self._ran:
            kind = max(chunks, default=0) > 1
            self.ratios[kind].append(seconds / self.modelled(s))
            self._stale[kind] = 0
            self._stale[not kind] += 1
            if self._stale[not kind] >= HISTORY and self.ratios[not kind]:
                self.ratios[not kind].popleft()
                self._stale[not kind] = 0
        self._ran |= programs
