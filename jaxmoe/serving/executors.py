"""Step executors: the jitted programs that run one engine step over [n_slots, width] tokens.

- `FusedStep` (cpu-only, or everything on one accelerator): one jitted program over all
  layers (with the cpu_ext custom calls inside when the weights are on the CPU kernels); no
  per-layer Python in the hot loop. It runs only the busy slots, padded to a power-of-two row
  bucket, over the columns their longest row needs (`step_shapes.width_bucket`); a step that
  mixes decode rows with prompt chunks runs them as two groups, width 1 and the chunks' width,
  in one program for narrow chunks (`model.groups.run_groups`), else in two.
  Any model family: the forward and the cache widths are the family's (`models.registry`).
- `StagedStep` (routed experts on the host; any family: its `stage_layer`): per layer, an accelerator program (attention,
  router, shared experts, and the previous layer's combine), a host program (routed
  experts), and a final program (lm_head + sampling). The slots form two micro-batches,
  each with its own latent cache on its own accelerator (one GPU: both on it). With
  `overlap`, the dispatch order is attention(A, l), experts(A, l), attention(B, l),
  experts(B, l), attention(A, l+1), ...: JAX's asynchronous dispatch then runs B's attention
  on the accelerator while the CPU runs A's experts. Only the sampled token ids are awaited.
  Without overlap, A runs through all layers, then B. Same programs, same values either way.
  Each micro-batch runs all its slots at the step's width; one with no busy slot is skipped
  (a lone request costs one pass, not two).

Both implement `Executor`: the step itself, the paged cache's pools (`model.cache`: blocks of
`block_size` positions; each step reads and writes through the rows' block tables, which the
engine's `serving.kv_blocks.KVBlocks` fills), and what the engine's streamed-prompt runner asks
of them (the weights already on each device, the host copy of the routed experts, a slot's
device, and writing a request's latents through its block table). FusedStep has one pool;
StagedStep one per accelerator its micro-batches use (one GPU: both share one pool).
Attention takes the form `step_shapes.attention_form` gives for the step's width and key
window: absorbed (latent space) for decode and narrow chunks, expanded for prompt chunks wide
enough that expanding the window's keys once costs fewer multiply-adds than absorbing every query.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.model.cache import KVCache, init_paged_cache, paged_slots
from jaxmoe.model.forward import final_logits
from jaxmoe.model.moe import routed_experts
from jaxmoe.model.weights import Weights, split_experts
from jaxmoe.models.registry import family_of
from jaxmoe.serving.presets import Devices
from jaxmoe.serving.sampling import sample_rows
from jaxmoe.step_shapes import groups_in_one_program, kv_window, row_bucket, width_bucket


class Executor(Protocol):
    """What the engine needs of a step executor."""

    max_len: int  # cache positions per sequence; a position >= max_len is padding (never stored)
    pool_blocks: list[int]  # blocks in each pool (block 0 of each is the null block)

    def __call__(self, tokens, positions, last_index, seeds, steps, temperature, top_k, top_p, *,
                 kv_len: int, block_tables: np.ndarray) -> np.ndarray:
        """Run one step over numpy [n_slots, width] tokens and positions (per-slot sampling
        parameters [n_slots]; block_tables [n_slots, blocks per sequence], ids in the slot's
        pool; kv_len static: attend over that many positions) -> the next token of every slot,
        numpy int32 [n_slots]."""

    def slot_pool(self, slot: int) -> int:
        """The pool `slot`'s blocks come from."""

    def dense_copies(self) -> dict[jax.Device, Weights]:
        """The non-expert weights already placed on each device (no copy is made)."""

    def host_experts(self) -> tuple[Any, ...] | None:
        """The per-layer routed experts the host programs read, or None when the weights' own are used."""

    def slot_device(self, slot: int) -> jax.Device:
        """The device holding `slot`'s latent cache."""

    def write_latents(self, slot: int, c_kv: jax.Array, k_pe: jax.Array, positions: jax.Array, table: np.ndarray) -> None:
        """Write latents [L, T, .] at positions [T] (on `slot_device`) through block table [n]
        (the slot's pool); positions >= max_len are dropped."""

    def read_latents(self, slot: int, table: np.ndarray, n: int) -> tuple[jax.Array, jax.Array]:
        """The first n positions' latents through block table [n_blocks] of `slot`'s pool (on its
        device): c_kv [L, n, .], k_pe [L, n, .]."""

    def read_block(self, pool: int, block: int) -> dict[str, np.ndarray]:
        """One block's contents in host memory: {"c_kv": [L, block_size, r], "k_pe": [L, block_size, rope]}."""

    def write_block(self, pool: int, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Fill one block with contents `read_block` gave (ValueError if their shapes or dtypes differ)."""

    def copy_block(self, pool: int, src: int, dst: int) -> None:
        """Copy block `src`'s contents into block `dst` (same pool, on its device)."""


@functools.partial(jax.jit, donate_argnums=0)
def _write_blocks(cache: KVCache, c_kv, k_pe, table, positions) -> KVCache:
    block, offset = paged_slots(cache.replace(block_table=table[None]), positions[None])
    return cache.replace(
        c_kv=cache.c_kv.at[:, block[0], offset[0]].set(c_kv.astype(cache.c_kv.dtype), mode="drop"),
        k_pe=cache.k_pe.at[:, block[0], offset[0]].set(k_pe.astype(cache.k_pe.dtype), mode="drop"),
    )


@functools.partial(jax.jit, donate_argnums=0)
def _fill_block(cache: KVCache, block, c_kv, k_pe) -> KVCache:
    return cache.replace(c_kv=cache.c_kv.at[:, block].set(c_kv), k_pe=cache.k_pe.at[:, block].set(k_pe))


@functools.partial(jax.jit, static_argnums=2)
def read_latents(cache: KVCache, table, n: int) -> tuple[jax.Array, jax.Array]:
    def seq(a):
        a = a[:, table[: -(-n // a.shape[2])]]  # [L, nb, bs, d]
        return a.reshape(a.shape[0], -1, a.shape[-1])[:, :n]

    return seq(cache.c_kv), seq(cache.k_pe)


@functools.partial(jax.jit, donate_argnums=0)
def copy_block(cache: KVCache, src, dst) -> KVCache:
    return cache.replace(c_kv=cache.c_kv.at[:, dst].set(cache.c_kv[:, src]), k_pe=cache.k_pe.at[:, dst].set(cache.k_pe[:, src]))


def read_block(cache: KVCache, block: int) -> dict[str, np.ndarray]:
    return {"c_kv": np.asarray(cache.c_kv[:, block]), "k_pe": np.asarray(cache.k_pe[:, block])}


def write_block(cache: KVCache, block: int, arrays: dict[str, np.ndarray]) -> KVCache:
    """`cache` with one block replaced by `arrays` (as `read_block` gives them)."""
    for name in ("c_kv", "k_pe"):
        want, got = getattr(cache, name)[:, block], arrays.get(name)
        if got is None or tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            found = None if got is None else (tuple(got.shape), str(got.dtype))
            raise ValueError(f"cache block {name}: expected {tuple(want.shape)} {want.dtype}, got {found}")
    return _fill_block(cache, np.int32(block), arrays["c_kv"], arrays["k_pe"])


def paged_pool(cfg: Any, positions: int, block_size: int, max_len: int, cache_dtype) -> KVCache:
    """A pool holding `positions` cache positions (rounded up to blocks) plus the null block, at
    the widths of cfg's family."""
    return init_paged_cache(cfg, -(-positions // block_size) + 1, block_size, max_len, cache_dtype,
                            widths=family_of(cfg).cache_widths(cfg))


def _fused_program(cfg, weights, cache, table, tokens, positions, last_index, seeds, steps, temperature, top_k, top_p, *,
                   kv_len):
    forward = family_of(cfg).step_forward(cfg, tokens.shape[1], kv_len)  # DeepSeek: absorbed or expanded MLA
    logits, cache = forward(cfg, weights, cache.replace(block_table=table), tokens, positions, logit_index=last_index,
                            kv_len=kv_len)
    return sample_rows(logits, seeds, steps, temperature, top_k, top_p), cache.replace(block_table=None)


def _grouped_program(cfg, weights, cache, groups, seeds, steps, temperature, top_k, top_p, *, kv_lens):
    """groups: ((tokens, positions, block table, logit index), ...), as `model.groups.run_groups` takes them."""
    forward = family_of(cfg).grouped_forward(cfg, tuple(int(g[0].shape[1]) for g in groups), kv_lens)
    logits, cache = forward(cfg, weights, cache, groups, kv_lens=kv_lens)
    return sample_rows(logits, seeds, steps, temperature, top_k, top_p), cache


def active_rows(busy: np.ndarray) -> np.ndarray:
    """The step's rows: the busy slots, then idle slots up to the bucket size (their positions
    are max_len: computed, never stored, never read back)."""
    active, idle = np.flatnonzero(busy), np.flatnonzero(~busy)
    n = row_bucket(max(len(active), 1), len(busy))
    return np.concatenate([active, idle[: n - len(active)]]).astype(np.int32)


class FusedStep:
    """Runs only the busy slots (`active_rows`) through the jitted program, with their block
    tables, so kernels, attention and MoE see `bucket` rows, and
    only as many columns as their longest row needs (`width_bucket`). A step that mixes
    one-token rows (decode) with prompt chunks runs them as two groups, width 1 and the
    chunks' width, so no padded token of a decode row goes through the kernels; each group
    attends over the key window its own rows reach (`kv_len` is the step's, at most). Chunks
    narrower than MIN_WIDTH_BUCKET (a TPOT target's, `step_shapes.groups_in_one_program`) run
    with the decode rows in one program where the family has one (`grouped_forward`), which
    reads every weight once; other mixed steps run a program per group."""

    def __init__(self, cfg: Any, weights: Any, device: jax.Device, max_len: int, cache_dtype, *,
                 cache_positions: int, block_size: int):
        self.cfg, self.device = cfg, device
        self.weights = jax.device_put(weights, device)
        self.cache = jax.device_put(paged_pool(cfg, cache_positions, block_size, max_len, cache_dtype), device)
        self.pool_blocks = [int(self.cache.c_kv.shape[1])]
        self._program = jax.jit(_fused_program, static_argnums=0, static_argnames="kv_len", donate_argnums=2)
        self._grouped = None
        if family_of(cfg).grouped_forward is not None:
            self._grouped = jax.jit(_grouped_program, static_argnums=0, static_argnames="kv_lens", donate_argnums=2)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def slot_pool(self, slot: int) -> int:
        return 0

    def dense_copies(self) -> dict[jax.Device, Weights]:
        return {self.device: split_experts(self.weights)[0]}

    def host_experts(self) -> None:
        return None

    def slot_device(self, slot: int) -> jax.Device:
        return self.device

    def write_latents(self, slot: int, c_kv, k_pe, positions, table) -> None:
        self.cache = _write_blocks(self.cache, c_kv, k_pe, np.asarray(table, np.int32), positions)

    def read_latents(self, slot: int, table, n: int):
        return read_latents(self.cache, np.asarray(table, np.int32), n)

    def read_block(self, pool: int, block: int) -> dict[str, np.ndarray]:
        return read_block(self.cache, block)

    def write_block(self, pool: int, block: int, arrays) -> None:
        self.cache = write_block(self.cache, block, arrays)

    def copy_block(self, pool: int, src: int, dst: int) -> None:
        self.cache = copy_block(self.cache, np.int32(src), np.int32(dst))

    def __call__(self, tokens, positions, last_index, seeds, steps, temperature, top_k, top_p, *, kv_len: int,
                 block_tables: np.ndarray) -> np.ndarray:
        busy = positions[:, 0] < self.cache.max_len
        one = busy & (last_index == 0)  # rows with one real token: decode (or a prompt's last token)
        long = busy & ~one
        per_slot = (last_index, seeds, steps, temperature, top_k, top_p)
        self._tables = block_tables
        groups = []
        if one.any() or not long.any():
            groups.append(self._group(one, tokens[:, :1], positions[:, :1], per_slot, kv_len))
        if long.any():
            groups.append(self._group(long, tokens, positions, per_slot, kv_len))
        if len(groups) == 2 and self._grouped is not None and groups_in_one_program(groups[1]["tokens"].shape[1]):
            runs = self._run_grouped(groups, per_slot)
        else:  # (rows, which are real, their next tokens): dispatched first, awaited together
            runs = [self._run(g, per_slot) for g in groups]
        next_tokens = np.zeros(len(busy), np.int32)
        for rows, real, out in runs:
            next_tokens[rows[real]] = np.asarray(out)[real]
        return next_tokens

    def _group(self, busy, tokens, positions, per_slot, kv_len: int) -> dict:
        """The rows of one group (`busy`'s, bucketed), over the columns and the key window they reach."""
        rows = active_rows(busy)
        real = busy[rows]
        last = per_slot[0][rows][real]
        w = width_bucket(int(last.max(initial=0)) + 1, tokens.shape[1])
        # the keys this group's own rows reach: decode rows beside a long prompt's chunk attend over
        # their own window, not the chunk's
        kv_len = min(kv_len, kv_window(int((positions[rows[real], last] + 1).max(initial=1)), self.cache.max_len))
        pos = positions[rows, :w].copy()
        pos[~real] = self.cache.max_len  # padding rows (maybe slots busy in the other group): never stored
        # a padding row's logit index may be another group's: kept inside this group's columns
        last_index = np.minimum(per_slot[0][rows], w - 1).astype(per_slot[0].dtype)
        return {"rows": rows, "real": real, "tokens": tokens[rows, :w], "positions": pos, "last_index": last_index,
                "kv_len": kv_len}

    def _run(self, g: dict, per_slot):
        rows = g["rows"]
        args = [g["tokens"], g["positions"], g["last_index"], *(a[rows] for a in per_slot[1:])]
        out, self.cache = self._program(self.cfg, self.weights, self.cache, self._tables[rows], *args, kv_len=g["kv_len"])
        return g["rows"], g["real"], out

    def _run_grouped(self, groups: list[dict], per_slot):
        """Both groups in one program (`_grouped_program`); its sampled rows come in group order."""
        rows = np.concatenate([g["rows"] for g in groups])
        out, self.cache = self._grouped(
            self.cfg, self.weights, self.cache,
            tuple((g["tokens"], g["positions"], self._tables[g["rows"]], g["last_index"]) for g in groups),
            *(a[rows] for a in per_slot[1:]), kv_lens=tuple(g["kv_len"] for g in groups))
        out = np.asarray(out)
        n = len(groups[0]["rows"])
        return [(g["rows"], g["real"], part) for g, part in zip(groups, (out[:n], out[n:]))]


# ---- staged execution ---------------------------------------------------------------------


def _layer_program(cfg, lw, x, routed, cache, table, layer, positions, *, kv_len: int):
    """Accelerator side of one layer: add the previous layer's routed output, then the family's
    `stage_layer` (DeepSeek-V3: `model.forward.layer_until_experts`, attention absorbed or
    expanded by `attention_form`; GQA families: `layers.gqa_decoder`); the shared experts' output
    joins x here."""
    if routed is not None:
        x = x + routed.reshape(x.shape).astype(x.dtype)
    x, moe_in, cache = family_of(cfg).stage_layer(cfg, lw, x, cache.replace(block_table=table), layer, positions, kv_len)
    cache = cache.replace(block_table=None)
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
                 overlap: bool, cache_positions: int, block_size: int):
        self.cfg, self.devices, self.overlap = cfg, devices, overlap
        dense, experts = split_experts(weights)
        accs = devices.accelerators
        self.mb_slots = [(0, n_slots // 2), (n_slots // 2, n_slots)]
        self.mb_device = [accs[0], accs[-1]]
        # non-expert weights on each micro-batch's accelerator (one copy per distinct device)
        per_device = {d: jax.device_put(dense, d) for d in set(self.mb_device)}
        self.weights = [per_device[d] for d in self.mb_device]
        self.experts = [None if e is None else jax.device_put(e, devices.host) for e in experts]
        pool_devices = list(dict.fromkeys(self.mb_device))  # one pool per distinct accelerator
        self.mb_pool = [pool_devices.index(d) for d in self.mb_device]
        self.caches = [
            jax.device_put(paged_pool(cfg, -(-cache_positions // len(pool_devices)), block_size, max_len, cache_dtype), d)
            for d in pool_devices
        ]
        self.pool_blocks = [int(c.c_kv.shape[1]) for c in self.caches]
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

    def slot_pool(self, slot: int) -> int:
        return self.mb_pool[self._micro_batch(slot)[0]]

    def write_latents(self, slot: int, c_kv, k_pe, positions, table) -> None:
        p = self.slot_pool(slot)
        self.caches[p] = _write_blocks(self.caches[p], c_kv, k_pe, np.asarray(table, np.int32), positions)

    def read_latents(self, slot: int, table, n: int):
        return read_latents(self.caches[self.slot_pool(slot)], np.asarray(table, np.int32), n)

    def read_block(self, pool: int, block: int) -> dict[str, np.ndarray]:
        return read_block(self.caches[pool], block)

    def write_block(self, pool: int, block: int, arrays) -> None:
        self.caches[pool] = write_block(self.caches[pool], block, arrays)

    def copy_block(self, pool: int, src: int, dst: int) -> None:
        self.caches[pool] = copy_block(self.caches[pool], np.int32(src), np.int32(dst))

    def _start(self, mb: int, tokens, positions, block_tables):
        lo, hi = self.mb_slots[mb]
        tok, pos, table = jax.device_put((tokens[lo:hi], positions[lo:hi], block_tables[lo:hi]), self.mb_device[mb])
        return {"x": self.weights[mb].embed_tokens[tok], "routed": None, "positions": pos, "table": table}

    def _layer_step(self, mb: int, layer: int, st: dict, kv_len: int) -> None:
        w = self.weights[mb].layers[layer]
        dense = self.experts[layer] is None
        self.dispatch_log.append(("attention", mb, layer))
        p = self.mb_pool[mb]
        st["x"], moe_in, self.caches[p] = self._layer(
            self.cfg, w, st["x"], st["routed"], self.caches[p], st["table"], np.int32(layer), st["positions"], kv_len=kv_len
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

    def __call__(self, tokens, positions, last_index, seeds, steps, temperature, top_k, top_p, *, kv_len: int,
                 block_tables: np.ndarray) -> np.ndarray:
        self.dispatch_log.clear()
        n_layers = self.cfg.num_hidden_layers
        busy = positions[:, 0] < self.caches[0].max_len
        active = [mb for mb, (lo, hi) in enumerate(self.mb_slots) if busy[lo:hi].any()] or [0]  # idle: skipped
        states = {mb: self._start(mb, tokens, positions, block_tables) for mb in active}
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


def make_executor(cfg: Any, weights: Any, rc: Any, devices: Devices, max_len: int, cache_dtype, *,
                  cache_positions: int) -> Executor:
    """cache_positions: the paged cache's size in positions, over all pools."""
    if rc.staged:
        family_of(cfg).require("staged", f"runtime preset {rc.preset!r} (staged: routed experts on the host, the rest "
                                         f"on accelerators)")
        return StagedStep(cfg, weights, devices, rc.n_slots, max_len, cache_dtype, overlap=rc.overlap,
                          cache_positions=cache_positions, block_size=rc.kv_block_size)
    return FusedStep(cfg, weights, devices.main, max_len, cache_dtype, cache_positions=cache_positions,
                     block_size=rc.kv_block_size)
