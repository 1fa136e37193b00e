"""The MLP blocks: dense SwiGLU MLP, shared experts, and the routed experts.

`routed_experts` dispatches on the type of the experts' weights: the JAX reference below
serves stacked `ExpertsWeights` (any quant format); host-resident expert stores register
their own implementation (cpu_ext) with `routed_experts.register`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig
from jaxmoe.model.router import route
from jaxmoe.model.weights import ExpertsWeights, MLPWeights, MoEWeights
from jaxmoe.quant import dequantize, linear


def mlp(w: MLPWeights, x: jax.Array) -> jax.Array:
    """down(silu(gate(x)) * up(x)) -- dense layers and shared experts."""
    return linear(jax.nn.silu(linear(x, w.gate_proj)) * linear(x, w.up_proj), w.down_proj)


@functools.singledispatch
def routed_experts(experts: Any, x: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
    raise TypeError(f"no routed-experts implementation for {type(experts).__name__}")


@routed_experts.register
def _(experts: ExpertsWeights, x: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
    """Reference: out[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n]); ids < 0 are skipped.

    The (token, expert) pairs are sorted by expert and run as grouped matmuls
    (`lax.ragged_dot`), so every expert's weights are used once for all its tokens; skipped
    pairs sort last, beyond every group, where ragged_dot yields zeros.
    """
    n, k = ids.shape
    n_experts = experts.gate_proj.shape[0]
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(jnp.where(flat_ids < 0, n_experts, flat_ids), stable=True)
    token = order // k
    group_sizes = jnp.bincount(jnp.where(flat_ids < 0, n_experts, flat_ids), length=n_experts + 1)[:n_experts]
    group_sizes = group_sizes.astype(jnp.int32)
    xs = x[token]

    def grouped(a: jax.Array, w: Any) -> jax.Array:  # a [m, in] @ w[e]^T per group
        wt = jnp.swapaxes(dequantize(w, a.dtype), -1, -2)  # [E, in, out]
        return jax.lax.ragged_dot(a, wt, group_sizes, preferred_element_type=jnp.float32).astype(a.dtype)

    h = jax.nn.silu(grouped(xs, experts.gate_proj)) * grouped(xs, experts.up_proj)
    y = grouped(h, experts.down_proj) * weights.reshape(-1)[order][:, None].astype(x.dtype)
    return jnp.zeros_like(x).at[token].add(y)


def moe_prologue(cfg: ModelConfig, w: MoEWeights, x: jax.Array, valid: jax.Array | None = None):
    """What runs beside attention: x [N, H] -> (topk ids, topk weights, shared experts' output).

    Tokens with `valid` [N] False (padding) get ids -1 and weight 0: no expert runs for them.
    """
    ids, weights = route(cfg, w.gate, x)
    if valid is not None:
        ids = jnp.where(valid[:, None], ids, -1)
        weights = jnp.where(valid[:, None], weights, 0.0)
    shared = mlp(w.shared_experts, x) if w.shared_experts is not None else jnp.zeros_like(x)
    return ids, weights, shared


def moe(cfg: ModelConfig, w: MoEWeights, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Routed experts (top-k of n_routed_experts) plus the shared experts, x [..., H];
    `valid` [...] marks real tokens (padding runs no routed expert)."""
    flat = x.reshape(-1, x.shape[-1])
    ids, weights, shared = moe_prologue(cfg, w, flat, None if valid is None else valid.reshape(-1))
    return (routed_experts(w.experts, flat, ids, weights) + shared).reshape(x.shape)
