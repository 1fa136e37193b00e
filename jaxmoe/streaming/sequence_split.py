"""DSLP with sequence-split attention: the device programs of `SlpPipeline(attention="sequence")`.

With replicated attention (streaming/slp.py) every device of the expert mesh repeats the
whole chunk's attention and dense work; only the routed experts are split. Here each device
owns a contiguous share of the chunk's tokens (the sequence axis of every activation is
sharded over the mesh's "expert" axis, `shard_map`) and does all the per-token work for its
share only: norms, the MLA projections (queries, latents, output), the dense MLP or the
router and shared experts. Per layer the collectives are:

- all_gather (tiled, over the sequence) of the share's new latents (c_kv, k_pe: [B, T, 576]
  for DeepSeek-V3): every device writes the whole chunk's latents into its own copy of the
  latent cache, so the caches stay replicated (the next chunk, and the engine, read either),
  then attends for its share of the queries over the whole key range (`mla.attend_expanded`);
- MoE layers: all_gather of the MoE input (normed hidden [B, T, H], top-k ids and weights):
  SmallEP needs every token on every device (each computes its experts for all of them);
- per stream unit: reduce-scatter (`psum_scatter`, tiled over the sequence) of the devices'
  partial expert outputs [B, T, H], where replicated attention has one psum: each device gets
  the sum for its share only, which is all it needs.

A chunk of T tokens that the n devices do not divide is padded to a multiple of n with
tokens at position `cache.max_len` (as the engine pads: not written to the cache, routed to no
expert, seen by no query) and the padding's logits are dropped. Results equal replicated
attention's up to float summation order inside the matmuls (each device multiplies fewer rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmoe.model.forward import final_logits
from jaxmoe.model.weights import has_routed_experts
from jaxmoe.streaming.expert_parallel import AXIS, local_partial

SEQ = P(None, AXIS)  # [B, T, ...] split over the sequence


def _shard(f, mesh, in_specs, out_specs):
    # the replicated outputs (cache, gathered tokens) are equal on every device by construction
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _gather(a):
    return jax.lax.all_gather(a, AXIS, axis=1, tiled=True)


# ---- per device ------------------------------------------------------------------------------


def _embed_local(weights, tokens):
    x = weights.embed_tokens[tokens]
    return x, jnp.zeros_like(x)


def _layer_local(cfg, split_layer, lw, x, routed, cache, layer, positions, mine):
    """One layer minus its routed experts for this device's tokens (x, routed, mine: [B, T/n, .]);
    positions [B, T]: the whole chunk's, where its gathered cache entries go."""
    x = x + routed.astype(x.dtype)
    x, moe_in, cache = split_layer(cfg, lw, x, cache, layer, positions, mine, _gather)
    if moe_in is None:
        return x, jnp.zeros_like(x), (), cache
    flat, ids, weights, shared = moe_in
    b, t = x.shape[:2]
    return x, shared.reshape(x.shape), tuple(_gather(a.reshape(b, t, -1)) for a in (flat, ids, weights)), cache


def _routed_local(acc, x, ids, weights, experts, bounds):
    """acc [B, T/n, H] (this device's tokens) + the sum over devices of their experts' outputs for
    those tokens; x, ids, weights [B, T, .]: every token (gathered)."""
    b, t, h = x.shape
    y = local_partial(x.reshape(b * t, h), ids.reshape(b * t, -1), weights.reshape(b * t, -1), experts, bounds)
    return acc + jax.lax.psum_scatter(y.reshape(b, t, h), AXIS, scatter_dimension=1, tiled=True).astype(acc.dtype)


# ---- the programs (jitted; one per mesh) -----------------------------------------------------


def _embed(mesh, weights, tokens):
    return _shard(_embed_local, mesh, (P(), SEQ), (SEQ, SEQ))(weights, tokens)


def _layer(cfg, split_layer, mesh, lw, x, routed, cache, layer, positions):
    moe = has_routed_experts(lw.mlp)
    f = _shard(functools.partial(_layer_local, cfg, split_layer), mesh, (P(), SEQ, SEQ, P(), P(), P(), SEQ),
               (SEQ, SEQ, (P(), P(), P()) if moe else (), P()))
    return f(lw, x, routed, cache, layer, positions, positions)


def _routed(mesh, acc, x, ids, weights, experts, bounds):
    f = _shard(_routed_local, mesh, (SEQ, P(), P(), P(), P(AXIS), P(AXIS)), SEQ)
    return f(acc, x, ids, weights, experts, bounds)


def _final(cfg, weights, x, routed, logit_index):
    return final_logits(cfg, weights, x + routed.astype(x.dtype), logit_index)


_embed_jit = jax.jit(_embed, static_argnums=0)
_layer_jit = jax.jit(_layer, static_argnums=(0, 1, 2), donate_argnums=6)
_routed_jit = jax.jit(_routed, static_argnums=0)
_final_jit = jax.jit(_final, static_argnums=0)


class SequenceSplit:
    """The sequence-split programs on one expert mesh, with `streaming.slp`'s replicated
    programs' interface (`embed`, `layer`, `routed`, `final`) plus the chunk's padding (`pad`);
    `split_layer` is the model family's (see the module doc)."""

    def __init__(self, mesh: Mesh, split_layer):
        self.mesh, self.split_layer = mesh, split_layer
        self.n = int(mesh.devices.size)
        self.seq = NamedSharding(mesh, SEQ)
        self.replicated = NamedSharding(mesh, P())

    def pad(self, tokens, positions, max_len: int):
        """tokens, positions [B, T] -> padded to a multiple of the mesh size (padding at position
        max_len), tokens split over the sequence, positions replicated."""
        tokens, positions = np.asarray(tokens, np.int32), np.asarray(positions, np.int32)
        extra = -tokens.shape[1] % self.n
        if extra:
            tokens = np.pad(tokens, ((0, 0), (0, extra)))
            positions = np.pad(positions, ((0, 0), (0, extra)), constant_values=max_len)
        return jax.device_put(tokens, self.seq), jax.device_put(positions, self.replicated)

    def embed(self, weights, tokens):
        return _embed_jit(self.mesh, weights, tokens)

    def layer(self, cfg, lw, x, routed, cache, layer, positions):
        x, routed, moe_in, cache = _layer_jit(cfg, self.split_layer, self.mesh, lw, x, routed, cache, layer, positions)
        return x, routed, (moe_in or None), cache

    def routed(self, acc, x, ids, weights, experts, bounds):
        return _routed_jit(self.mesh, acc, x, ids, weights, experts, bounds)

    def final(self, cfg, weights, x, routed, logit_index, n_tokens: int):
        logits = _final_jit(cfg, weights, x, routed, logit_index)
        return logits if logit_index is not None else logits[:, :n_tokens]
