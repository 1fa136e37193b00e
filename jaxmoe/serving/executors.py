"""Step executors: the jitted programs that run one engine step over [n_slots, width] tokens.

- `FusedStep` (cpu-only, or everything on one accelerator): one jitted program over all
  layers (with the cpu_ext custom calls inside when the weights are on the CPU kernels); no
  per-layer Python in the hot loop. It runs only the busy slots, padded to a power-of-two row
  bucket, over the columns their longest row needs (`step_shapes.width_bucket`); a step that
  mixes decode rows with prompt chunks runs as two programs, width 1 and the chunks' width.
- `StagedStep` (routed experts on the host): per layer, an accelerator program (attention,
  router, shared experts, and the previous layer's combine), a host program (routed
  experts), and a final program (lm_head + sampling). The slots form two micro-batches,
  each with its own latent cache on its own accelerator (one GPU: both on it). With
  `overlap`, the dispatch order is attention(A, l), experts(A, l), attention(B, l),
  experts(B, l), attention(A, l+1), ...: JAX's asynchronous dispatch then runs B's attention
  on the accelerator while the CPU runs A's experts. Only the sampled token ids are awaited.
  Without overlap, A runs through all layers, then B. Same programs, same values either way.
  Each micro-batch runs all its slots at the step's width; one with no busy slot is skipped
  (a lone request costs one pass, not two).

Both implement `Executor`: the step itself, and what the engine's streamed-prompt runner asks
of them (the weights already on each device, the host copy of the routed experts, a slot's
device, and writing a slot's latents). Attention takes the form `step_shapes.attention_form`
gives for the step's width and key window: absorbed (latent space) for decode and narrow
chunks, expanded for prompt chunks wide enough that expanding the window's keys once costs
fewer multiply-adds than absorbing every query.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.model.cache import KVCache, init_cache
from jaxmoe.model.forward import final_logits, forward_absorbed, forward_expanded, layer_until_experts
from jaxmoe.model.moe import routed_experts
from jaxmoe.model.rope import rope_cos_sin
from jaxmoe.model.weights import Weights, split_experts
from jaxmoe.serving.presets import Devices
from jaxmoe.serving.sampling import sample_rows
from jaxmoe.step_shapes import attention_form, row_bucket, width_bucket


class Executor(Protocol):
    """What the engine needs of a step executor."""

    max_len: int  # cache positions per slot; a position >= max_len is padding (never stored)

    def __call__(self, tokens, positions, last_index, seeds, steps, temperature, top_k, top_p, *,
                 kv_len: int) -> np.ndarray:
        """Run one step over numpy [n_slots, width] tokens and positions (per-slot sampling
        parameters [n_slots]; kv_len static: attend over that many cache slots) -> the next
        token of every slot, numpy int32 [n_slots]."""

    def dense_copies(self) -> dict[jax.Device, Weights]:
        """The non-expert weights already placed on each device (no copy is made)."""

    def host_experts(self) -> tuple[Any, ...] | None:
        """The per-layer routed experts the host programs read, or None when the weights' own are used."""

    def slot_device(self, slot: int) -> jax.Device:
        """The device holding `slot`'s latent cache."""

    def write_latents(self, slot: int, c_kv: jax.Array, k_pe: jax.Array, positions: jax.Array) -> None:
        """Write latents [L, T, .] into `slot` at positions [T] (on `slot_device`); positions
        >= max_len are dropped."""


@functools.partial(jax.jit, donate_argnums=0)
def _write_slot(cache: KVCache, c_kv, k_pe, slot, positions) -> KVCache:
    return cache.replace(
        c_kv=cache.c_kv.at[:, slot, positions].set(c_kv.astype(cache.c_kv.dtype), mode="drop"),
        k_pe=cache.k_pe.at[:, slot, positions].set(k_pe.astype(cache.k_pe.dtype), mode="drop"),
    )


def _fused_program(cfg, weights, cache, tokens, positions, last_index, seeds, steps, temperature, top_k, top_p, *, kv_len):
    forward = forward_absorbed if attention_form(cfg, tokens.shape[1], kv_len) == "absorbed" else forward_expanded
    logits, cache = forward(cfg, weights, cache, tokens, positions, logit_index=last_index, kv_len=kv_len)
    return sample_rows(logits, seeds, steps, temperature, top_k, top_p), cache


def active_rows(busy: np.ndarray) -> np.ndarray:
    """The step's rows: the busy slots, then idle slots up to the bucket size (their positions
    are max_len: computed, never stored, never read back)."""
    active, idle = np.flatnonzero(busy), np.flatnonzero(~busy)
    n = row_bucket(max(len(active), 1), len(busy))
    return np.concatenate([active, idle[: n - len(active)]]).astype(np.int32)


class FusedStep:
    """Runs only the busy slots (`active_rows`) through the jitted program: their cache slots
    are addressed through `KVCache.rows`, so kernels, attention and MoE see `bucket` rows, and
    only as many columns as their longest row needs (`width_bucket`). A step that mixes
    one-token rows (decode) with prompt chunks runs them as two programs, width 1 and the
    chunks' width, so no padded token of a decode row goes through the kernels."""

    def __init__(self, cfg: ModelConfig, weights: Weights, device: jax.Device, n_slots: int, max_len: int, cache_dtype):
        self.cfg, self.device = cfg, device
        self.weights = jax.device_put(weights, device)
        self.cache = jax.device_put(init_cache(cfg, n_slots, max_len, cache_dtype), device)
        self._program = jax.jit(_fused_program, static_argnums=0, static_argnames="kv_len", donate_argnums=2)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def dense_copies(self) -> dict[jax.Device, Weights]:
        return {self.device: split_experts(self.weights)[0]}

    def host_experts(self) -> None:
        return None

    def slot_device(self, slot: int) -> jax.Device:
        return self.device

    def write_latents(self, slot: int, c_kv, k_pe, positions) -> None:
        self.cache = _write_slot(self.cache, c_kv, k_pe, np.int32(slot), positions)

    def __call__(self, tokens, positions, last_index, seeds, steps, temperature, top_k, top_p, *, kv_len: int) -> np.ndarray:
        busy = positions[:, 0] < self.cache.max_len
        one = busy & (last_index == 0)  # rows with one real token: decode (or a prompt's last token)
        long = busy & ~one
        per_slot = (last_index, seeds, steps, temperature, top_k, top_p)
        runs = []  # (rows, which are real, their next tokens): dispatched first, awaited together
        if one.any() or not long.any():
            runs.append(self._run(one, tokens[:, :1], positions[:, :1], per_slot, kv_len))
        if long.any():
            runs.append(self._run(long, tokens, positions, per_slot, kv_len))
        next_tokens = np.zeros(len(busy), np.int32)
        for rows, real, out in runs:
            next_tokens[rows[real]] = np.asarray(out)[real]
        return next_tokens

    def _run(self, busy, tokens, positions, per_slot, kv_len: int):
        rows = active_rows(busy)
        real = busy[rows]
        w = width_bucket(int(per_slot[0][rows][real].max(initial=0)) + 1, tokens.shape[1])
        pos = positions[rows, :w].copy()
        pos[~real] = self.cache.max_len  # padding rows (maybe slots busy in the other run): never stored
        args = [tokens[rows, :w], pos, *(a[rows] for a in per_slot)]
        out, cache = self._program(self.cfg, self.weights, self.cache.replace(rows=rows), *args, kv_len=kv_len)
        self.cache = cache.replace(rows=None)
        return rows, real, out


# ---- staged execution ---------------------------------------------------------------------


def _layer_program(cfg, lw, x, routed, cache, layer, positions, *, kv_len: int):
    """Accelerator side of one layer: add the previous layer's routed output, then
    `layer_until_experts` (attention absorbed or expanded: `attention_form`); the shared experts'
    output joins x here."""
    if routed is not None:
        x = x + routed.reshape(x.shape).astype(x.dtype)
    cos, sin = rope_cos_sin(cfg, positions)
    x, moe_in, cache = layer_until_experts(cfg, lw, x, cache, layer, positions, cos, sin,
                                           form=attention_form(cfg, x.shape[1], kv_len), kv_len=kv_len)
    if moe_in is None:
        return x, None, cache
    flat, ids, weights, shared = moe_in
    return x + shared.reshape(x.shape), (flat, ids, weights), cache


def _final_program(cfg, weights, x, routed, last_index, seeds, steps, temperature, top_k, top_p):
    if routed is not None:
        x = x + routed.reshape(x.shape).astype(x.dtype)
    logits = final_logits(cfg, weights, x, last_index)
    return sample_rows(logits, seeds, steps, temperature, top_k, top_p)


class StagedStep:
    """Routed experts on the host, the rest on the accelerators: stage programs per layer over
    two micro-batches (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, weights: Weights, devices: Devices, n_slots: int, max_len: int, cache_dtype, *,
                 overlap: bool):
        self.cfg, self.devices, self.overlap = cfg, devices, overlap
        dense, experts = split_experts(weights)
        accs = devices.accelerators
        self.mb_slots = [(0, n_slots // 2), (n_slots // 2, n_slots)]
        self.mb_device = [accs[0], accs[-1]]
        # non-expert weights on each micro-batch's accelerator (one copy per distinct device)
        per_device = {d: jax.device_put(dense, d) for d in set(self.mb_device)}
        self.weights = [per_device[d] for d in self.mb_device]
        self.experts = [None if e is None else jax.device_put(e, devices.host) for e in experts]
        self.caches = [
            jax.device_put(init_cache(cfg, hi - lo, max_len, cache_dtype), d)
            for (lo, hi), d in zip(self.mb_slots, self.mb_device)
        ]
        self._layer = jax.jit(_layer_program, static_argnums=0, static_argnames="kv_len", donate_argnums=4)
        self._experts = jax.jit(lambda e, flat, ids, w: routed_experts(e, flat, ids, w))
        self._final = jax.jit(_final_program, static_argnums=0)
        self.dispatch_log: list[tuple[str, int, int]] = []  # (stage, micro-batch, layer), for tests

    @property
    def max_len(self) -> int:
        return self.caches[0].max_len

    def dense_copies(self) -> dict[jax.Device, Weights]:
        return dict(zip(self.mb_device, self.weights))

    def host_experts(self) -> tuple[Any, ...]:
        return tuple(self.experts)

    def _micro_batch(self, slot: int) -> tuple[int, int]:
        """(micro-batch, the slot's row in its cache)."""
        for mb, (lo, hi) in enumerate(self.mb_slots):
            if lo <= slot < hi:
                return mb, slot - lo
        raise ValueError(f"slot {slot} is in no micro-batch (n_slots {self.mb_slots[-1][1]})")

    def slot_device(self, slot: int) -> jax.Device:
        return self.mb_device[self._micro_batch(slot)[0]]

    def write_latents(self, slot: int, c_kv, k_pe, positions) -> None:
        mb, row = self._micro_batch(slot)
        self.caches[mb] = _write_slot(self.caches[mb], c_kv, k_pe, np.int32(row), positions)

    def _start(self, mb: int, tokens, positions):
        lo, hi = self.mb_slots[mb]
        dev = self.mb_device[mb]
        tok = jax.device_put(tokens[lo:hi], dev)
        pos = jax.device_put(positions[lo:hi], dev)
        return {"x": self.weights[mb].embed_tokens[tok], "routed": None, "positions": pos}

    def _layer_step(self, mb: int, layer: int, st: dict, kv_len: int) -> None:
        w = self.weights[mb].layers[layer]
        dense = self.experts[layer] is None
        self.dispatch_log.append(("attention", mb, layer))
        st["x"], moe_in, self.caches[mb] = self._layer(
            self.cfg, w, st["x"], st["routed"], self.caches[mb], np.int32(layer), st["positions"], kv_len=kv_len
        )
        st["routed"] = None
        if not dense:
            self.dispatch_log.append(("experts", mb, layer))
            host_in = jax.device_put(moe_in, self.devices.host)
            routed = self._experts(self.experts[layer], *host_in)
            st["routed"] = jax.device_put(routed, self.mb_device[mb])

    def _finish(self, mb: int, st: dict, last_index, seeds, steps, temperature, top_k, top_p):
        lo, hi = self.mb_slots[mb]
        rows = [jax.device_put(a[lo:hi], self.mb_device[mb]) for a in (last_index, seeds, steps, temperature, top_k, top_p)]
        self.dispatch_log.append(("final", mb, -1))
        return self._final(self.cfg, self.weights[mb], st["x"], st["routed"], *rows)

    def __call__(self, tokens, positions, last_index, seeds, steps, temperature, top_k, top_p, *, kv_len: int) -> np.ndarray:
        self.dispatch_log.clear()
        n_layers = self.cfg.num_hidden_layers
        busy = positions[:, 0] < self.caches[0].max_len
        active = [mb for mb, (lo, hi) in enumerate(self.mb_slots) if busy[lo:hi].any()] or [0]  # idle: skipped
        states = {mb: self._start(mb, tokens, positions) for mb in active}
        if self.overlap:
            for layer in range(n_layers):
                for mb in active:
                    self._layer_step(mb, layer, states[mb], kv_len)
        else:
            for mb in active:
                for layer in range(n_layers):
                    self._layer_step(mb, layer, states[mb], kv_len)
        outs = {mb: self._finish(mb, states[mb], last_index, seeds, steps, temperature, top_k, top_p) for mb in active}
        next_tokens = np.zeros(len(busy), np.int32)
        for mb, out in outs.items():  # the only sync point
            lo, hi = self.mb_slots[mb]
            next_tokens[lo:hi] = np.asarray(out)
        return next_tokens


def make_executor(cfg: ModelConfig, weights: Weights, rc: Any, devices: Devices, max_len: int, cache_dtype) -> Executor:
    if rc.staged:
        return StagedStep(cfg, weights, devices, rc.n_slots, max_len, cache_dtype, overlap=rc.overlap)
    return FusedStep(cfg, weights, devices.main, rc.n_slots, max_len, cache_dtype)
