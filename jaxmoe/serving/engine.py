"""The serving engine: requests in, tokens out, one jitted step at a time.

Each step is schedule -> execute -> update:
- schedule: `Scheduler.plan()` picks, per cache slot, the tokens to run (decode tokens and
  chunks of prompts, mixed in one step);
- execute: the executor (`serving.executors`: fused, or staged with dual-batch overlap)
  runs the model over the plan's [n_slots, width] tokens (width 1 for pure decode, else the
  prompt chunk width) against a power-of-two window of cache slots that follows the longest
  sequence (`step_shapes.kv_window`), takes each row's last logit and samples it with that
  request's own parameters and key. The fused executor runs only the busy rows, in
  power-of-two row and width buckets, decode rows apart from prompt chunks
  (`step_shapes`), so each shape compiles once;
- update: tokens are handed to their requests, stop conditions checked, slots freed.

The latent KV cache is paged (`model.cache`, `serving.kv_blocks`): a pool of blocks of
`kv_block_size` positions, sized from the memory budget (else n_slots x max_len positions); each
request reserves the blocks its prompt + max_new_tokens can fill when it takes a slot, and with
`prefix_caching` (the default) starts from the longest run of full blocks another request
already computed for the same leading tokens (`Request.cached_tokens`), prefilling only the rest.
Concurrent callers `submit()` from any thread; a background thread drives the steps while
there is work (or call `step()` / `run_until_idle()` yourself).
A step attends in the form `step_shapes.attention_form` gives for its width and key window:
in latent space (absorbed MLA) when it is 1 wide (decode) or narrow, expanded (keys and values
through kv_b_proj) when it is wide enough that expanding the window's keys once costs fewer
multiply-adds (prompt chunks). The two forms compute the same attention, padding is never
stored, and each row samples with its own request's parameters and key: the requests sharing
a step change a request's tokens at most through rounding (the rows of one program set its
width and key window, so the form they attend in).

With `tpot_target_ms` (RuntimeConfig, cpu-only) the scheduler sizes the prompt chunk of each
step that also carries decode rows from the hardware profile's CPU step model
(`planning.kernel_model.KernelModel.mixed_step`): the widest chunk whose predicted step time
stays within the target, down to one token (which runs with the decode rows), corrected by
the measured step times (scheduler.py, step_model.py).

Prefill strategy per request (`serving.prompt_runner`): at `submit` the planner (or the
user: `prefill_strategy=`, JAXMOE_PREFILL_STRATEGY) decides whether the prompt runs through
the steps ("cpu") or is stream-loaded ("slp" / "dslp": routed experts streamed from host
memory to the accelerators, one chunk per step, written into the request's cache slot while
the other slots keep decoding). `Request.prefill_strategy` records the choice.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.models import registry
from jaxmoe.serving.executors import make_executor
from jaxmoe.serving.kv_blocks import KVBlocks
from jaxmoe.serving.prefill_worker import PrefillWorker
from jaxmoe.serving.prefix_store import PrefixStore, prefix_fingerprint
from jaxmoe.serving.presets import RuntimeConfig, resolve_devices
from jaxmoe.serving.prompt_runner import StreamedPromptRunner, default_hardware
from jaxmoe.serving.request import Request, RequestRefused
from jaxmoe.serving.sampling import SamplingParams
from jaxmoe.serving.scheduler import Scheduler, StepPlan
from jaxmoe.serving.step_model import StepModel
from jaxmoe.step_shapes import STEP_OVERHEAD_COLUMNS, kv_window


def cache_bytes_per_position(cfg: Any, dtype=jnp.float32) -> int:
    """KV-cache bytes per position of one sequence, over all layers, at the widths of cfg's family."""
    return registry.cache_bytes_per_position(cfg, dtype)


class Engine:
    """Serve requests on one model: `cfg` of any family of `models.registry` (DeepSeek-V3's
    ModelConfig; Qwen3MoeConfig and Glm4MoeConfig: no planner model yet), `weights`
    its pytree. `runtime` is a RuntimeConfig or a preset name (jaxmoe/configs/runtime/),
    `overrides` replace its fields (n_slots, chunk_size, max_len, memory_budget_bytes, overlap,
    prefill_strategy, hardware, tpot_target_ms, ...). `expert_source`: where
    stream-loaded prefill reads the routed experts (layer -> host arrays, e.g.
    `loading.expert_source.CheckpointExperts`); default: the weights' own experts when they are arrays.
    `prefix_cache_dir`: keep the prefix cache's full blocks on disk there too (at most
    `prefix_cache_bytes`, least recently used out), so later engines start from them;
    `weights_identity` names the weights (with the config, cache dtype and block size it
    fingerprints every block: required with a directory)."""

    def __init__(self, cfg: ModelConfig | Any, weights: Any, runtime: RuntimeConfig | str = "cpu-only", *, cache_dtype=None,
                 expert_source: Any = None, prefix_cache_dir: str | Path | None = None, prefix_cache_bytes: int = 8 << 30,
                 weights_identity: str | None = None, **overrides):
        rc = runtime if isinstance(runtime, RuntimeConfig) else RuntimeConfig.load(runtime, **overrides)
        if isinstance(runtime, RuntimeConfig) and overrides:
            rc = dataclasses.replace(rc, **overrides)
        cache_dtype = cache_dtype or weights.embed_tokens.dtype
        budget_positions = None
        if rc.memory_budget_bytes is not None:
            budget_positions = rc.memory_budget_bytes // cache_bytes_per_position(cfg, cache_dtype)
        max_len = rc.max_len
        if max_len is None:
            max_len = min(cfg.max_position_embeddings, 4096) if budget_positions is None else budget_positions
        max_len = min(int(max_len), cfg.max_position_embeddings)
        if max_len < 2:
            raise ValueError(f"cache of {max_len} positions per sequence is too small (memory budget too low?)")
        cache_positions = rc.n_slots * max_len if budget_positions is None else budget_positions
        self.cfg = cfg
        self.runtime = rc
        self.max_len = max_len
        self.n_slots = rc.n_slots
        self.chunk_size = min(rc.chunk_size, max_len)
        self.devices = resolve_devices(rc)
        self.executor = make_executor(cfg, weights, rc, self.devices, max_len, cache_dtype, cache_positions=cache_positions)
        seed = prefix_fingerprint(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str), jnp.dtype(cache_dtype).name,
                                  str(rc.kv_block_size), weights_identity or "")
        store = None
        if prefix_cache_dir is not None:
            if not rc.prefix_caching:
                raise ValueError("prefix_cache_dir needs prefix_caching (it stores the prefix cache's blocks)")
            if not weights_identity:
                raise ValueError("prefix_cache_dir needs weights_identity= (what names these weights: jaxmoe.load passes "
                                 "the checkpoint's), so that blocks of other weights are never served")
            store = PrefixStore(prefix_cache_dir, seed, max_bytes=prefix_cache_bytes)
        self.blocks = KVBlocks(self.executor.pool_blocks, self.executor.slot_pool, rc.kv_block_size, max_len,
                               prefix_caching=rc.prefix_caching, seed=seed, store=store, io=self.executor)
        self.prefill = StreamedPromptRunner(cfg, rc, self.devices, self.executor, weights, expert_source, self.chunk_size,
                                       max_len, cache_dtype)
        self._cache_dtype = cache_dtype
        self.step_model = None  # predicted seconds of a mixed step, where the TPOT target needs it
        # the cpu-only engine computes a step's padding in its dense Linears: cut prompts' last tokens
        self.scheduler = Scheduler(self.n_slots, max_len, self.chunk_size, decode_chunk_size=rc.decode_chunk_size,
                                   blocks=self.blocks, step_overhead=None if rc.accelerators else STEP_OVERHEAD_COLUMNS)
        self.worker = None  # streamed prompts beside the decode steps (prefill_beside_decode)
        if rc.prefill_beside_decode and self.prefill.possible:
            self.worker = PrefillWorker(self.prefill, self.chunk_size)
            self.scheduler.stream_chunks = False
        self._lock = threading.RLock()
        self.set_tpot_target(rc.tpot_target_ms)
        self._thread: threading.Thread | None = None
        self.steps_run = 0

    def set_tpot_target(self, ms: float | None) -> None:
        """Set (or clear: None) the decoders' TPOT target (RuntimeConfig.tpot_target_ms) from the next step on."""
        with self._lock:
            self.runtime = dataclasses.replace(self.runtime, tpot_target_ms=ms)  # validates it
            if ms is not None and self.step_model is None:
                self.step_model = self._step_model(self._cache_dtype)
            self.scheduler.step_time = self.step_model
            self.scheduler.tpot_target_s = None if ms is None else ms * 1e-3

    def _step_model(self, cache_dtype):
        """The TPOT target's `StepModel` from the hardware profile's CPU step model."""
        from jaxmoe.planning.hardware import load_hardware  # noqa: PLC0415
        from jaxmoe.planning.planner import kernel_model  # noqa: PLC0415

        rc = self.runtime
        if rc.accelerators:
            raise ValueError(f"tpot_target_ms is modelled for the cpu-only runtime only, not {rc.preset!r}")
        registry.family_of(self.cfg).require("planner", "tpot_target_ms (sized by the planner's CPU step model)")
        hw = load_hardware(default_hardware(rc, self.devices))
        if hw.kernels is None:
            raise ValueError(f"tpot_target_ms needs a hardware profile with a cpu_kernels block; {hw.name} has none")
        km = kernel_model(self.cfg, hw)
        km.cache_itemsize = jnp.dtype(cache_dtype).itemsize
        return StepModel(km, self.n_slots, self.max_len, self.scheduler.decode_chunk_size,
                         grouped=registry.family_of(self.cfg).grouped_forward is not None)

    # ---- requests -------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        *,
        eos_token_ids: Sequence[int] = (),
        stop_token_ids: Sequence[Sequence[int]] = (),
        background: bool = True,
        prefill_strategy: str | None = None,
    ) -> Request:
        """Queue a request; its tokens arrive through `request.events()`.

        prefill_strategy: force one for this request ("auto" | "cpu" | "slp" | "dslp"; None:
        the engine's); ValueError if this engine cannot run it.

        Raises RequestRefused when it could never fit in a cache slot. With `background`
        (the default) a thread drives the engine until every request is done.
        """
        ids = [int(t) for t in prompt_ids]
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestRefused(f"token ids out of the vocabulary [0, {self.cfg.vocab_size}): {bad[:8]}")
        if max_new_tokens < 1:
            raise RequestRefused(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        req = Request(
            ids, int(max_new_tokens), sampling or SamplingParams(), tuple(eos_token_ids), tuple(tuple(s) for s in stop_token_ids)
        )
        req.prefill_strategy, req.prefill_plan = self.prefill.choose(len(ids), prefill_strategy)
        with self._lock:
            self.scheduler.add(req)
            if background:
                self._ensure_thread()
        return req

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._drive, name="jaxmoe-engine", daemon=True)
            self._thread.start()

    def _drive(self) -> None:
        while True:
            with self._lock:
                if not self.scheduler.has_work() and not (self.worker is not None and self.worker.busy):
                    self._thread = None
                    return
            self.step()

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one scheduled step. Returns False when there was nothing to do."""
        with self._lock:
            t0 = time.perf_counter()  # a step sized by the TPOT target reports its time, planning included
            if self.worker is not None:
                self.worker.collect(self.scheduler, self.blocks.table, wait=False)
            plan = self.scheduler.plan()
            if self.worker is None:
                self.prefill.retain(self.scheduler.running.values())
            if self.worker is not None:
                if plan is not None:
                    self.worker.start_next(self.scheduler, self.blocks.table)
                if (plan is None or not plan.rows) and self.worker.busy:  # only the worker has work: wait for it
                    self.worker.collect(self.scheduler, self.blocks.table, wait=True)
                    return True
            if plan is None:
                return False
            try:
                sampled = self._execute(plan)
            except BaseException as e:  # a failed step fails the requests in it, not the engine
                for row in [*plan.streamed.values(), *plan.rows.values()]:
                    self.scheduler.forget(row.request)
                    self.prefill.drop(row.request)
                    row.request.fail(e)
                raise
            if plan.predicted_s is not None:
                self._measured_step(plan, time.perf_counter() - t0)  # before update: the rows as they ran
            self.scheduler.update(plan, sampled)
            self.steps_run += 1
            return True

    def _measured_step(self, plan: StepPlan, seconds: float) -> None:
        """Report a step the TPOT target sized to its step model, which corrects itself by it."""
        rows = plan.rows.values()
        chunks = [r for r in rows if not r.decodes]
        self.step_model.measured([r.end for r in rows if r.decodes], [len(r.tokens) for r in chunks],
                                 [r.end for r in chunks], seconds)

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def _execute(self, plan: StepPlan) -> dict[int, int]:
        sampled = {}
        for slot, row in plan.streamed.items():  # stream-loaded chunks first, then the other slots' step
            token = self.prefill.run_chunk(row, self.blocks.table(row.request))
            if token is not None:
                sampled[slot] = token
        if plan.rows:
            sampled.update(self._execute_step(plan))
        return sampled

    def _execute_step(self, plan: StepPlan) -> dict[int, int]:
        b, w = self.n_slots, plan.width
        tokens = np.zeros((b, w), np.int32)
        positions = np.full((b, w), self.max_len, np.int32)  # padding: dropped by the cache
        last = np.zeros(b, np.int32)
        seeds = np.zeros(b, np.uint32)
        steps = np.zeros(b, np.int32)
        temperature = np.zeros(b, np.float32)
        top_k = np.zeros(b, np.int32)
        top_p = np.ones(b, np.float32)
        for slot, row in plan.rows.items():
            n = len(row.tokens)
            tokens[slot, :n] = row.tokens
            positions[slot, :n] = np.arange(row.start, row.start + n)
            last[slot] = n - 1
            s = row.request.sampling
            seeds[slot], steps[slot] = s.seed, len(row.request.output_ids)
            temperature[slot], top_k[slot], top_p[slot] = s.temperature, s.top_k, s.top_p
        end = max(row.end for row in plan.rows.values())
        next_tokens = self.executor(
            tokens, positions, last, seeds, steps, temperature, top_k, top_p, kv_len=kv_window(end, self.max_len),
            block_tables=self.blocks.tables({s: r.request for s, r in plan.rows.items()}, b),
        )
        return {slot: int(next_tokens[slot]) for slot, row in plan.rows.items() if row.samples}

