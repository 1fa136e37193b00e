"""Softmax top-k routing (Qwen3-MoE, Mixtral, ...).

softmax over all experts' logits, top-k of the probabilities, renormalised to sum 1 when
`norm_topk_prob`. Computed in float32. Returns the (ids, weights) pair that
`jaxmoe.model.moe.routed_experts` consumes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SoftmaxRouterWeights:
    weight: jax.Array  # [E, H], checkpoint `mlp.gate.weight`


def route_softmax(w: SoftmaxRouterWeights, x: jax.Array, top_k: int, norm_topk_prob: bool,
                  valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [N, H] -> (topk_ids [N, k] int32, topk_weights [N, k] float32).

    `valid` [N] (optional): tokens marked False (padding) get ids -1 and weight 0, so no
    expert runs for them."""
    logits = jnp.einsum("nh,eh->ne", x.astype(jnp.float32), w.weight.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    ids = ids.astype(jnp.int32)
    if valid is not None:
        ids = jnp.where(valid[:, None], ids, -1)
        weights = jnp.where(valid[:, None], weights, 0.0)
    return ids, weights
