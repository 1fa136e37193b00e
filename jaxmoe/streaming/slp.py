"""Stream-loading prefill (SLP) and its SmallEP form over two devices (DSLP).

A long prompt is compute-bound, so its routed experts run on the accelerator although they
live in host memory: per MoE layer the experts' weights, as the host copy holds them (e.g. FP8
+ fp32 block scales), are `jax.device_put` from that single copy (the expert store's slabs in the
CPU kernels' tiled layout, `cpu.tiled.StoreExperts`, un-tiled on the device; or zero-copy views
of the checkpoint's mmap, `loading.expert_source.CheckpointExperts`) to the accelerator(s), and
the model's own grouped matmul (`moe.routed_experts`: tokens sorted by expert, `lax.ragged_dot`
on weights dequantized on the device) runs there. Everything else (embeddings, MLA, dense
MLPs, router, shared experts, lm_head) is resident and replicated on every device of the mesh.

Pipeline (per chunk; the weights are streamed once per chunk), over stream units u = (MoE
layer, part) in layer order:

    issue T(0)                                   # before the first layer's attention
    per layer: dispatch attention (+ dense MLP, or router + shared experts)
        per unit u of an MoE layer:
            dispatch C(u)                        # grouped matmul on the streamed weights
            await C(u-1), drop its weights       # so at most two units are resident
            issue T(u+1)                         # overlaps C(u) and the next attention
    await the last unit; final norm + lm_head

T(u+1) is issued before C(u) is awaited (the prefetch overlaps), and at most two units'
weights are resident on a device; with `buffers` > 2 it is T(u+buffers-1), up to `buffers`
units resident (small units can then load through a long attention). The order holds whether
`device_put` returns at once or blocks until the copy is done (C(u) is queued either way).
Transfers are staged through the pinned-host memory kind where the device offers one (see
`ExpertMesh`). Every step is recorded in `log` as ("transfer" | "compute" | "await", layer,
part) for the tests.

stream_dense=True (the planner's `PrefillEstimate.stream_dense`, when device memory is better
spent on buffers): each MoE layer's non-expert weights (MLA projections and norms, router,
shared experts) are not resident either: they travel from their host copy (the dense weights
as passed; `place_dense` leaves those layers where they are) with the layer's first unit, by
the experts' path (`ExpertMesh.put_replicated`), logged ("dense", layer, 0) just before that
unit's "transfer" -- so issued ahead of the layer's attention, in the same prefetch window --
and dropped with that unit when it is awaited. Dense layers (first_k_dense_replace),
embeddings, final norm and lm_head stay resident.

Strategies: "slp" streams all experts to one device; "dslp" streams each device only its
windows of each layer (`streaming.expert_parallel`) and sums with one psum. attention=
"replicated" (default): every device repeats attention and the dense work for the whole chunk;
"sequence": each device does them for its share of the chunk's tokens
(`streaming.sequence_split`; the planner's `PrefillEstimate.attention` when it is the strategy).
Engine hook: `slp_prefill_chunk` (one chunk, the engine's shape); `slp_prefill` loops chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.model import forward
from jaxmoe.model.cache import KVCache
from jaxmoe.model.forward import final_logits
from jaxmoe.model.weights import Weights, has_routed_experts, split_experts
from jaxmoe.planning.strategies import STREAMED, PrefillStrategy
from jaxmoe.streaming.expert_parallel import ExpertMesh, expert_mesh
from jaxmoe.streaming.sequence_split import SequenceSplit

Event = tuple[str, int, int]  # (kind, layer, part)
ExpertSource = Callable[[int], Any] | Sequence[Any]


def layer_experts(source: ExpertSource, layer: int) -> Any:
    """One layer's routed experts from a source: a callable or a per-layer sequence (e.g.
    the second result of `model.weights.split_experts`)."""
    experts = source(layer) if callable(source) else source[layer]
    if experts is None:
        raise ValueError(f"expert source has no routed experts for MoE layer {layer}")
    return experts


# ---- the device programs ------------------------------------------------------------------


def _no_moe(x):
    """An empty MoE output [B*T, H] (as the routed program returns): one layer program per layer kind."""
    return jnp.zeros((x.shape[0] * x.shape[1], x.shape[2]), x.dtype)


def _embed(weights: Weights, tokens):
    x = weights.embed_tokens[tokens]
    return x, _no_moe(x)


def _layer_program(cfg, prefill_layer, lw, x, routed, cache, layer, positions):
    """One layer minus its routed experts: add the previous layer's MoE output (shared +
    routed), then the family's `prefill_layer` (DeepSeek-V3: `layer_until_experts` with expanded
    attention, as in prefill).
    -> (x, MoE output so far: zeros or the shared experts', routing or None, cache)."""
    x = x + routed.reshape(x.shape).astype(x.dtype)
    x, moe_in, cache = prefill_layer(cfg, lw, x, cache, layer, positions)
    if moe_in is None:
        return x, _no_moe(x), None, cache
    flat, ids, weights, shared = moe_in
    return x, shared, (flat, ids, weights), cache


def _final_program(cfg, weights, x, routed, logit_index):
    x = x + routed.reshape(x.shape).astype(x.dtype)
    return final_logits(cfg, weights, x, logit_index)


_embed_jit = jax.jit(_embed)
_layer_jit = jax.jit(_layer_program, static_argnums=(0, 1), donate_argnums=5)
_final_jit = jax.jit(_final_program, static_argnums=0)
ATTENTION = ("replicated", "sequence")


class _Replicated:
    """The replicated programs (`SequenceSplit`'s interface)."""

    def __init__(self, ep: ExpertMesh, prefill_layer: Callable):
        self.ep, self.prefill_layer = ep, prefill_layer

    def pad(self, tokens, positions, max_len: int):
        return self.ep.replicate((jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32)))

    def embed(self, weights, tokens):
        return _embed_jit(weights, tokens)

    def layer(self, cfg, lw, x, routed, cache, layer, positions):
        return _layer_jit(cfg, self.prefill_layer, lw, x, routed, cache, layer, positions)

    def routed(self, acc, x, ids, weights, experts, bounds):
        return self.ep.routed(acc, x, ids, weights, experts, bounds)

    def final(self, cfg, weights, x, routed, logit_index, n_tokens: int):
        return _final_jit(cfg, weights, x, routed, logit_index)


# ---- the pipeline -------------------------------------------------------------------------


class SlpPipeline:
    """SLP (one device) or DSLP (two: SmallEP) over an expert mesh.

    parts_per_layer: stream each layer in this many sequential units (fewer bytes resident).
    buffers: how many units may be resident at once (2: double buffering; more lets the
    transfers run further ahead, e.g. through a long attention, when units are small).
    The planner picks both from the device memory. pinned: see `ExpertMesh`.
    attention: "replicated" or "sequence" (attention and the per-token dense work split over
    the mesh by the chunk's tokens: `streaming.sequence_split`).
    stream_dense: the MoE layers' non-expert weights streamed with their first unit instead of
    resident (see the module docstring).
    family: the model family's layers (`models.registry.ModelFamily`, or anything with these two):
    `prefill_layer`, (cfg, layer weights, x, cache, layer, positions) -> (x, None | (h, ids,
    weights, shared), cache), and for "sequence" attention `split_layer` (the same for one share
    of the chunk's tokens); None: DeepSeek-V3's (`model.forward`).
    """

    def __init__(self, cfg: Any, devices: Sequence[jax.Device], *, parts_per_layer: int = 1,
                 buffers: int = 2, pinned: bool | None = None, attention: str = "replicated",
                 stream_dense: bool = False, family: Any = None):
        if parts_per_layer < 1 or buffers < 2:
            raise ValueError(f"need parts_per_layer >= 1 and buffers >= 2, got {parts_per_layer}, {buffers}")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.attention = attention
        self.stream_dense = bool(stream_dense)
        self.cfg = cfg
        self.parts = parts_per_layer
        self.buffers = buffers
        self.ep: ExpertMesh = expert_mesh(tuple(devices), pinned)
        self.moe_layers = tuple(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
        layers = family or forward
        self.programs = (SequenceSplit(self.ep.mesh, layers.split_layer) if attention == "sequence"
                         else _Replicated(self.ep, layers.prefill_layer))

    def place(self, dense_weights: Weights) -> Weights:
        """The non-expert weights replicated on the mesh (a no-op when already there); with
        stream_dense, the MoE layers' stay where they are (their host copy, streamed per chunk)."""
        return _place(self.ep, dense_weights, self.stream_dense)

    def __call__(self, dense_weights: Weights, source: ExpertSource, cache: KVCache, tokens, positions, *,
                 logit_index=None, log: list[Event] | None = None) -> tuple[jax.Array, KVCache]:
        cfg, ep, prog = self.cfg, self.ep, self.programs
        log = [] if log is None else log
        weights = self.place(dense_weights)
        for i, lw in enumerate(weights.layers):
            if has_routed_experts(lw.mlp) != (i in self.moe_layers):
                raise ValueError(f"layer {i}: weights and config disagree on whether it is an MoE layer")
        n_tokens = np.shape(tokens)[1]
        cache = ep.replicate(cache)
        tokens, positions = prog.pad(tokens, positions, cache.max_len)
        units = [(layer, part) for layer in self.moe_layers for part in range(self.parts)]
        loaded: dict[int, Any] = {}  # unit index -> device experts (at most `buffers`)
        dense: dict[int, Any] = {}  # stream_dense: unit index -> its layer's streamed non-expert weights
        computed: dict[int, jax.Array] = {}

        def issue(u: int) -> None:
            if u < len(units):
                layer, part = units[u]
                if self.stream_dense and part == 0:
                    dense[u] = ep.put_replicated(weights.layers[layer])
                    log.append(("dense", layer, 0))
                loaded[u] = ep.put_part(layer_experts(source, layer), self.parts, part)
                log.append(("transfer", layer, part))

        def await_(u: int) -> None:
            if u in computed:
                computed.pop(u).block_until_ready()
                loaded.pop(u, None)
                dense.pop(u, None)
                log.append(("await", *units[u]))

        for v in range(self.buffers - 1):
            issue(v)
        x, routed = prog.embed(weights, tokens)
        u = 0
        for i, lw in enumerate(weights.layers):
            if self.stream_dense and i in self.moe_layers:
                lw = dense[u]  # issued with the layer's first unit, ahead of this attention
            x, routed, moe_in, cache = prog.layer(cfg, lw, x, routed, cache, np.int32(i), positions)
            if moe_in is None:
                continue
            flat, ids, gate_w = moe_in
            for part in range(self.parts):
                bounds = ep.bounds(cfg.n_routed_experts, self.parts, part)
                routed = prog.routed(routed, flat, ids, gate_w, loaded[u], bounds)
                computed[u] = routed
                log.append(("compute", i, part))
                await_(u - 1)
                issue(u + self.buffers - 1)
                u += 1
        await_(u - 1)
        return prog.final(cfg, weights, x, routed, logit_index, n_tokens), cache


def _place(ep: ExpertMesh, dense_weights: Weights, stream_dense: bool) -> Weights:
    dense, _ = split_experts(dense_weights)
    if not stream_dense:
        return ep.replicate(dense)
    moe = [has_routed_experts(lw.mlp) for lw in dense.layers]
    resident = ep.replicate(dense.replace(layers=tuple(None if m else lw for m, lw in zip(moe, dense.layers))))
    return resident.replace(layers=tuple(lw if m else r for m, lw, r in zip(moe, dense.layers, resident.layers)))


@functools.lru_cache(maxsize=8)
def _streamer(cfg: Any, devices: tuple[jax.Device, ...], parts: int, buffers: int, pinned: bool | None,
              attention: str, stream_dense: bool = False, family: Any = None) -> SlpPipeline:
    return SlpPipeline(cfg, devices, parts_per_layer=parts, buffers=buffers, pinned=pinned, attention=attention,
                       stream_dense=stream_dense, family=family)


def _stream_dense(strategy: Any, stream_dense: bool | None) -> bool:
    return bool(getattr(strategy, "stream_dense", False) if stream_dense is None else stream_dense)


def _strategy_devices(strategy: Any, devices: Sequence[jax.Device]) -> tuple[jax.Device, ...]:
    name = strategy if isinstance(strategy, str) else strategy.strategy  # a name or a planner estimate
    if name not in STREAMED:
        raise ValueError(f"streaming strategy must be one of {[s.value for s in STREAMED]}, got {name!r}")
    n = PrefillStrategy(name).accelerators
    if len(devices) < n:
        raise ValueError(f"strategy {name!r} needs {n} device(s), got {len(devices)}")
    return tuple(devices[:n])


def slp_prefill_chunk(cfg: Any, dense_weights: Weights, expert_source: ExpertSource, cache: KVCache,
                      tokens, positions, *, devices: Sequence[jax.Device], strategy: Any = "slp",
                      logit_index=None, parts_per_layer: int | None = None, buffers: int | None = None,
                      pinned: bool | None = None, attention: str | None = None, stream_dense: bool | None = None,
                      family: Any = None, log: list[Event] | None = None) -> tuple[jax.Array, KVCache]:
    """One prefill chunk, tokens/positions [B, T], with the routed experts streamed.

    dense_weights: the model without routed experts (`model.weights.split_experts(w)[0]`; experts,
    if present, are ignored), best placed once with `place_dense`. expert_source: layer ->
    that layer's experts on the host (numpy views, e.g. `loading.expert_source.CheckpointExperts`, or host jax arrays).
    strategy: "slp" | "dslp" or a planner `PrefillEstimate` (its parts_per_layer, buffers,
    attention and stream_dense are used unless given). stream_dense: the MoE layers' non-expert
    weights streamed from `dense_weights` (their host copy; place with the same stream_dense).
    devices: the accelerators (the strategy takes the first 1 or 2).
    attention: "replicated" (default) or "sequence"; family: the model family's layers (see
    `SlpPipeline`; None: DeepSeek-V3's).
    Returns (float32 logits [B, T, V], or [B, 1, V] at `logit_index` [B]; the cache with the
    chunk's latents, replicated on the strategy's devices).
    """
    devs = _strategy_devices(strategy, devices)
    parts = parts_per_layer or getattr(strategy, "parts_per_layer", 1)
    buffers = buffers or getattr(strategy, "buffers", 2)
    attention = attention or getattr(strategy, "attention", "replicated")
    run = _streamer(cfg, devs, int(parts), int(buffers), pinned, attention, _stream_dense(strategy, stream_dense),
                    family)
    return run(dense_weights, expert_source, cache, tokens, positions, logit_index=logit_index, log=log)


def place_dense(dense_weights: Weights, devices: Sequence[jax.Device], strategy: Any = "slp", *,
                stream_dense: bool | None = None) -> Weights:
    """Place the non-expert weights once where `slp_prefill_chunk` wants them (with stream_dense,
    from the strategy's estimate unless given, the MoE layers' stay where they are: the host copy)."""
    devs = _strategy_devices(strategy, devices)
    return _place(expert_mesh(devs), dense_weights, _stream_dense(strategy, stream_dense))


def slp_prefill(cfg: Any, dense_weights: Weights, expert_source: ExpertSource, cache: KVCache,
                tokens, positions, *, chunk_size: int, devices: Sequence[jax.Device], strategy: Any = "slp",
                logit_index=None, **kw) -> tuple[jax.Array, KVCache]:
    """A whole prompt [B, T] in chunks of `chunk_size` tokens (the weights streamed once per
    chunk). Returns (logits [B, T, V], or [B, 1, V] at `logit_index` [B] -- then each chunk
    computes only one row of logits per sequence --, cache)."""
    tokens, positions = np.asarray(tokens, np.int32), np.asarray(positions, np.int32)
    weights = place_dense(dense_weights, devices, strategy, stream_dense=kw.get("stream_dense"))
    index = None if logit_index is None else np.asarray(logit_index, np.int32)
    outs = []
    for s in range(0, tokens.shape[1], chunk_size):
        t = tokens[:, s : s + chunk_size]
        local = None if index is None else np.clip(index - s, 0, t.shape[1] - 1).astype(np.int32)
        logits, cache = slp_prefill_chunk(cfg, weights, expert_source, cache, t, positions[:, s : s + chunk_size],
                                          devices=devices, strategy=strategy, logit_index=local, **kw)
        outs.append(logits)
    if index is None:
        return jnp.concatenate(outs, axis=1), cache
    which = np.minimum(index // chunk_size, len(outs) - 1)  # the chunk holding each row's index
    return jnp.stack(outs)[which, np.arange(len(index))], cache
