"""The engine's streamed-prompt runner: the prefill strategy of each request (the planner's
choice, or the user's), and the streamed (SLP / DSLP) prompt chunks that write into the
engine's slotted latent cache.

Strategies (`RuntimeConfig.prefill_strategy`, overridable by keyword and, while it is "auto",
by the environment variable JAXMOE_PREFILL_STRATEGY):
- "cpu": the engine's step path (routed experts where the preset puts them: on the host's
  kernels, or resident on the accelerator -- then recorded as "resident");
- "slp" / "dslp": the prompt's chunks go through `streaming.slp_prefill_chunk`, the routed
  experts streamed from the single host copy (the one the decode steps' host programs read:
  the expert store's slabs, see `cpu.tiled`; or an open checkpoint's mmap for formats the
  slabs do not hold, e.g. INT4) to one / two accelerators; dslp's attention (replicated, or
  split by sequence: `streaming.sequence_split`) is the planner's, carried by its estimate, as
  is `stream_dense` (the MoE layers' MLA, router and shared experts streamed with their first
  expert unit from one host copy: the engine's dense weights where they are host arrays, else
  one `jax.device_get` of those layers, made on first use);
- "auto": per request, `planner.plan_prefill` on the hardware profile (`RuntimeConfig.hardware`,
  default from the devices: this-machine-fake-devices for CPU devices standing in for
  accelerators, this-machine without any, h100-box / reference-box on GPUs) among the
  strategies this engine can run; the step path, without the planner, where nothing can stream
  or the planner does not model the family (`models.registry`: Qwen3-MoE and GLM-4.5 stream a
  forced "slp" / "dslp", replicated attention, one unit per layer, double-buffered).
An impossible forced choice (dslp on one accelerator, slp without an accelerator or without
a host expert source, slp / dslp for a family without streamed prefill) raises ValueError naming
`prefill_strategy` when the engine is built.

Execution (`StreamedPromptRunner.run_chunk`): a streaming request owns a batch-1 latent cache on
the strategy's devices for its prompt (a power-of-two window >= the prompt, so attention
costs what the prompt needs; a prefix taken from the prefix cache is copied in from the
engine's pool, and streaming starts after it); each chunk -- the engine's chunk shape,
padded -- runs through the SLP pipeline (`streaming.slp`), and its latents are then written
into the engine's cache through the request's block table. Between two streamed chunks the engine runs a normal step for the other
slots (their decode continues); the request joins the normal steps once its first token is
sampled from the last chunk's logits (same sampling program and key as a normal step).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmoe.config import ModelConfig
from jaxmoe.model.cache import KVCache, init_cache
from jaxmoe.model.weights import ExpertsWeights, has_routed_experts, split_experts
from jaxmoe.models.registry import family_of
from jaxmoe.planning.planner import estimate_prefill, load_hardware, plan_prefill
from jaxmoe.planning.strategies import FORCE_ENV, REQUESTABLE, STREAMED, PrefillStrategy
from jaxmoe.serving.executors import Executor
from jaxmoe.serving.presets import Devices, RuntimeConfig
from jaxmoe.serving.sampling import sample_rows
from jaxmoe.step_shapes import kv_window
from jaxmoe.streaming.slp import slp_prefill_chunk


def requested_strategy(rc: RuntimeConfig) -> tuple[str, str]:
    """(strategy, where it came from): the runtime field, or the environment while it is "auto"."""
    if rc.prefill_strategy == "auto" and os.environ.get(FORCE_ENV):
        name = os.environ[FORCE_ENV]
        if name not in REQUESTABLE:
            raise ValueError(f"environment variable {FORCE_ENV} must be one of {REQUESTABLE}, got {name!r}")
        return name, f"{FORCE_ENV}={name}"
    return rc.prefill_strategy, f"prefill_strategy={rc.prefill_strategy!r}"


def default_hardware(rc: RuntimeConfig, devices: Devices) -> str:
    """The jaxmoe/configs/hardware profile matching the devices in use."""
    if rc.hardware:
        return rc.hardware
    accs = devices.accelerators
    if not accs:
        return "this-machine"
    if all(d.platform == "cpu" for d in accs):
        return "this-machine-fake-devices"
    return "h100-box" if "H100" in getattr(accs[0], "device_kind", "") else "reference-box"


def host_expert_source(experts: tuple[Any, ...]) -> Any:
    """The per-layer routed experts as a streaming source: the arrays themselves when they are
    plain arrays (numpy or jax, FP8 + scales or dense), the expert store's slabs when they are
    cpu_ext handles (`cpu.tiled.StoreExperts`: the copy decode reads); None otherwise."""
    moe = [e for e in experts if e is not None]
    if not moe:
        return None
    if all(type(e).__name__ == "HostExperts" for e in moe):
        from jaxmoe.cpu.tiled import StoreExperts  # noqa: PLC0415  (only where cpu_ext placed them)

        return StoreExperts.of(tuple(experts))
    for e in moe:
        if not isinstance(e, ExpertsWeights):
            return None
        if not all(isinstance(a, (jax.Array, np.ndarray)) for a in jax.tree.leaves(e)):
            return None
    return experts


def _replicated(per_device: dict[jax.Device, Any], devices: tuple[jax.Device, ...], fallback: Any) -> Any:
    """A pytree replicated over `devices` built from copies already on them (no copy), or
    `fallback` put there."""
    sharding = NamedSharding(Mesh(np.array(devices), ("expert",)), P())
    if not all(d in per_device for d in devices):
        return jax.device_put(fallback, sharding)
    trees = [per_device[d] for d in devices]
    return jax.tree.map(lambda *a: jax.make_array_from_single_device_arrays(a[0].shape, sharding, list(a)), *trees)


@functools.partial(jax.jit, static_argnums=2)
def _chunk_latents(cache: KVCache, positions, width: int):
    """Row 0's latents at `positions` [T] (clipped into the cache: padding reads garbage that
    the write drops) -> ([L, T, r], [L, T, rope])."""
    idx = jnp.minimum(positions, width - 1)
    return cache.c_kv[:, 0, idx], cache.k_pe[:, 0, idx]


@jax.jit
def _seed(cache: KVCache, c_kv, k_pe) -> KVCache:
    """Row 0's first positions set to latents [L, n, .]."""
    n = c_kv.shape[1]
    return cache.replace(c_kv=cache.c_kv.at[:, 0, :n].set(c_kv.astype(cache.c_kv.dtype)),
                         k_pe=cache.k_pe.at[:, 0, :n].set(k_pe.astype(cache.k_pe.dtype)))


_sample_jit = jax.jit(sample_rows)


class StreamedPromptRunner:
    """The strategy choice and the streamed chunks of one engine (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, rc: RuntimeConfig, devices: Devices, executor: Executor, weights: Any,
                 expert_source: Any, chunk_size: int, max_len: int, cache_dtype):
        self.cfg, self.executor, self.devices = cfg, executor, devices
        self.chunk_size, self.max_len, self.cache_dtype = chunk_size, max_len, cache_dtype
        self.step_path = PrefillStrategy.CPU if rc.routed_experts == "host" else PrefillStrategy.RESIDENT
        self.mode, origin = requested_strategy(rc)
        dense, experts = split_experts(weights)
        self._dense_fallback = dense
        self.source = expert_source
        if expert_source is None and rc.routed_experts == "host":  # experts resident on an accelerator: nothing to stream
            self.source = host_expert_source(executor.host_experts() or experts)
        n_acc = len(devices.accelerators)
        self.family = family_of(cfg)
        streams = self.source is not None and "streamed_prefill" in self.family.supports
        self.possible = tuple(s for s in STREAMED if n_acc >= s.accelerators and streams)
        self.planned = "planner" in self.family.supports  # else "auto" is the step path, a forced stream runs unsized
        self._preset, self._kinds = rc.preset, sorted({type(e).__name__ for e in experts if e is not None})
        self._resident = rc.routed_experts != "host"
        self.check(self.mode, origin)
        self.candidates = (self.step_path, *self.possible)  # what "auto" chooses among (planner names)
        self.hardware = None  # the planner's profile, where a choice or a stream plan needs it
        if self.possible and self.planned:
            hw = load_hardware(default_hardware(rc, devices))
            if hw.gpu is not None and hw.n_gpus != n_acc:
                hw = hw.with_gpus(n_acc)
            self.hardware = hw
        self._dense: dict[tuple[str, bool], Any] = {}
        self._host_layers: tuple[Any, ...] | None = None
        self._cache: tuple[int, KVCache] | None = None  # (request id, its prefill cache)

    def check(self, name: str, origin: str) -> None:
        """Raise ValueError (naming `origin`) unless strategy `name` can run on this engine."""
        if name not in REQUESTABLE:
            raise ValueError(f"{origin}: prefill_strategy must be one of {REQUESTABLE}, got {name!r}")
        if name not in STREAMED or name in self.possible:
            return
        self.family.require("streamed_prefill", f"{origin} (stream-loaded prefill)")
        need, n_acc = PrefillStrategy(name).accelerators, len(self.devices.accelerators)
        if n_acc < need:
            why = f"needs {need} accelerator(s) to stream the routed experts to; runtime preset {self._preset!r} has {n_acc}"
        elif self._resident:
            why = ("the routed experts are resident on the accelerator (routed_experts='accelerator'): nothing to "
                   "stream (pass expert_source= to stream from host arrays anyway)")
        else:
            why = (f"streams the routed experts from host memory, but these weights hold them as {self._kinds} "
                   f"and no expert_source was given (load the model from a checkpoint directory, or pass "
                   f"Engine(..., expert_source=CheckpointExperts(open_checkpoint(path))))")
        raise ValueError(f"{origin} is impossible here: {why}")

    # ---- choice -----------------------------------------------------------------------------
    def choose(self, n_tokens: int, strategy: str | None = None) -> tuple[str, Any]:
        """(strategy, planner estimate or None) for a prompt of n_tokens; `strategy` forces
        one for this request (checked like the engine's own)."""
        mode = self.mode
        if strategy is not None:
            self.check(strategy, f"prefill_strategy={strategy!r}")
            mode = strategy
        if mode == PrefillStrategy.CPU:
            return self.step_path, None
        if mode in STREAMED:  # forced: the profile only sizes parts and buffers (where the planner models the family)
            if not self.planned:
                return mode, None
            est = _estimate(self.cfg, self.hardware, n_tokens, mode)
            return mode, (est if est.feasible else None)
        if len(self.candidates) < 2 or not self.planned:  # nothing to choose, or no model to choose by
            return self.step_path, None
        try:
            choice = _plan(self.cfg, self.hardware, n_tokens, self.candidates).choice
        except ValueError:  # the profile fits none of them (e.g. too little device memory): the step path
            return self.step_path, None
        return choice.strategy, choice

    # ---- execution --------------------------------------------------------------------------
    def _strategy_devices(self, name: str) -> tuple[jax.Device, ...]:
        return tuple(self.devices.accelerators[: PrefillStrategy(name).accelerators])

    def dense_weights(self, name: str, stream_dense: bool = False) -> Any:
        """The non-expert weights replicated over the strategy's devices, from the executor's
        copies where they already are; with stream_dense, the MoE layers' are their host copy
        (`host_moe_layers`), streamed per chunk by the pipeline."""
        key = (name, bool(stream_dense))
        if key not in self._dense:
            devs = self._strategy_devices(name)
            if not stream_dense:
                self._dense[key] = _replicated(self.executor.dense_copies(), devs, self._dense_fallback)
            else:
                host = self.host_moe_layers()
                strip = lambda w: w.replace(layers=tuple(None if h is not None else lw  # noqa: E731
                                                         for h, lw in zip(host, w.layers)))
                copies = {d: strip(w) for d, w in self.executor.dense_copies().items()}
                resident = _replicated(copies, devs, strip(self._dense_fallback))
                self._dense[key] = resident.replace(layers=tuple(r if h is None else h for h, r in zip(host, resident.layers)))
        return self._dense[key]

    def host_moe_layers(self) -> tuple[Any, ...]:
        """Per layer: the MoE layer's non-expert weights in host memory (None for dense layers):
        the engine's own where they are not on an accelerator (CPU devices), else one copy fetched
        from it once."""
        if self._host_layers is None:
            def host(lw):
                on_acc = any(isinstance(a, jax.Array) and any(d.platform != "cpu" for d in a.devices())
                             for a in jax.tree.leaves(lw))
                return jax.device_get(lw) if on_acc else lw

            self._host_layers = tuple(host(lw) if has_routed_experts(lw.mlp) else None
                                      for lw in self._dense_fallback.layers)
        return self._host_layers

    def run_chunk(self, row: Any, table: Any) -> int | None:
        """One streamed chunk of `row.request`'s prompt (a scheduler RowPlan): latents into the
        engine's cache through the request's block table; returns the sampled first token when
        the chunk ends the prompt."""
        self.prepare(row.request, table)
        latents, token = self.compute_chunk(row)
        self.executor.write_latents(row.request.slot, *latents, table)
        return token

    def prepare(self, req: Any, table: Any) -> None:
        """Make `req`'s batch-1 prefill cache (with its cached prefix read from the engine's pool:
        call it where the pool may be read, the engine's thread) unless it exists."""
        if self._cache is None or self._cache[0] != req.id:
            self._cache = (req.id, self._prefill_cache(req, table, kv_window(len(req.prompt_ids), self.max_len)))

    def compute_chunk(self, row: Any) -> tuple[tuple[jax.Array, jax.Array, jax.Array], int | None]:
        """Stream one chunk through the SLP pipeline into the prepared prefill cache (touches
        neither the engine's pool nor its executor's state: may run in another thread).
        Returns ((c_kv [L, C, .], k_pe, positions [C]) on the slot's device, for
        `Executor.write_latents`; padding positions are max_len) and the sampled first token
        when the chunk ends the prompt, else None."""
        req = row.request
        name, est = req.prefill_strategy, req.prefill_plan
        n, start = len(row.tokens), row.start
        width = kv_window(len(req.prompt_ids), self.max_len)
        if self._cache is None or self._cache[0] != req.id:
            raise RuntimeError(f"request {req.id}: prefill cache not prepared")
        tokens = np.zeros((1, self.chunk_size), np.int32)
        positions = np.full((1, self.chunk_size), width, np.int32)  # padding: dropped, routed nowhere
        tokens[0, :n], positions[0, :n] = row.tokens, np.arange(start, start + n)
        dense = self.dense_weights(name, getattr(est, "stream_dense", False))
        logits, cache = slp_prefill_chunk(
            self.cfg, dense, self.source, self._cache[1], tokens, positions,
            devices=self.devices.accelerators, strategy=est if est is not None else name,
            logit_index=np.array([n - 1], np.int32), family=self.family,
        )
        self._cache = (req.id, cache)
        dst = np.full(self.chunk_size, self.max_len, np.int32)
        dst[:n] = np.arange(start, start + n)
        c_kv, k_pe = _chunk_latents(cache, dst, width)
        latents = jax.device_put((c_kv, k_pe, dst), self.executor.slot_device(req.slot))
        if not row.samples:
            return latents, None
        self._cache = None  # the prompt is done: its prefill cache goes
        s = req.sampling
        out = _sample_jit(logits, np.array([s.seed], np.uint32), np.zeros(1, np.int32),
                          np.array([s.temperature], np.float32), np.array([s.top_k], np.int32),
                          np.array([s.top_p], np.float32))
        return latents, int(np.asarray(out)[0])

    def _prefill_cache(self, req: Any, table: Any, width: int) -> KVCache:
        """The request's batch-1 prefill cache, holding the latents of its cached prefix (read
        from the engine's pool through its block table) when it has one."""
        cache = init_cache(self.cfg, 1, width, self.cache_dtype, widths=self.family.cache_widths(self.cfg))
        if req.cached_tokens:
            c_kv, k_pe = jax.device_get(self.executor.read_latents(req.slot, table, req.cached_tokens))
            cache = _seed(cache, c_kv, k_pe)
        return cache

    def drop(self, req: Any) -> None:
        """Forget a request's prefill cache (failed)."""
        if self._cache is not None and self._cache[0] == req.id:
            self._cache = None

    def retain(self, running: Any) -> None:
        """Free the prefill cache of a request no longer running (cancelled mid-prompt)."""
        if self._cache is not None and all(r.id != self._cache[0] for r in running):
            self._cache = None


@functools.lru_cache(maxsize=256)
def _plan(cfg, hw, n_tokens: int, strategies: tuple[str, ...]):
    return plan_prefill(cfg, hw, n_tokens, strategies=strategies, force="auto")  # "auto": not the environment


@functools.lru_cache(maxsize=256)
def _estimate(cfg, hw, n_tokens: int, strategy: str):
    # dslp: the faster attention; slp/dslp: MLA streamed or resident, the faster
    return estimate_prefill(cfg, hw, n_tokens, strategy, attention="auto", stream_dense="auto")
