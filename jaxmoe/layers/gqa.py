"""Grouped-query attention (Qwen3-MoE, GLM-4.5, ...) over a per-layer key/value cache.

q_proj / k_proj / v_proj / o_proj (each with an optional bias), optional per-head RMSNorm of queries and keys
(`q_norm` / `k_norm`, over head_dim), rotary embedding on the first `rotary_dim` dims of each
head (the rest pass through; pairs (x_i, x_{i+rotary_dim/2}) as transformers' rotate_half, or
interleaved pairs with `rope_interleave`), causal softmax attention in float32 where query head
i reads key/value head i // (heads / kv_heads), o_proj.

The cache is jaxmoe.model.cache's `KVCache`, used shape-agnostically: per layer, `c_kv` holds
the rotated keys and `k_pe` the values, each flattened to [.., kv_heads * head_dim]
(`init_gqa_cache` builds one). Chunks of several queries over more than `block` cache slots
attend blocked over the keys (`jaxmoe.model.mla.key_blocked_attention`, online softmax).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxmoe.model.cache import KVCache, read_layer, write_layer
from jaxmoe.model.mla import key_block_for, key_blocked_attention
from jaxmoe.model.norm import rms_norm
from jaxmoe.model.rope import apply_rope
from jaxmoe.quant import linear


@dataclasses.dataclass(frozen=True)
class GQAConfig:
    """The static shape of one attention layer (hashable: a static jit argument)."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int  # rotary on dims [0, rotary_dim) of each head; == head_dim for full rotary
    rope_theta: float
    rms_norm_eps: float = 1e-6
    rope_interleave: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")

    @property
    def kv_width(self) -> int:
        """Numbers per token per layer in each of the cache's two arrays."""
        return self.num_key_value_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5


@struct.dataclass
class GQAWeights:
    q_proj: object  # Linear [heads * head_dim, H]
    k_proj: object  # Linear [kv_heads * head_dim, H]
    v_proj: object  # Linear [kv_heads * head_dim, H]
    o_proj: object  # Linear [H, heads * head_dim]
    q_norm: jax.Array | None = None  # [head_dim]
    k_norm: jax.Array | None = None  # [head_dim]
    q_proj_bias: jax.Array | None = None  # [heads * head_dim]
    k_proj_bias: jax.Array | None = None  # [kv_heads * head_dim]
    v_proj_bias: jax.Array | None = None  # [kv_heads * head_dim]
    o_proj_bias: jax.Array | None = None  # [H]


def init_gqa_cache(num_layers: int, c: GQAConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache: keys in `c_kv`, values in `k_pe`, both [L, batch, max_len, kv_heads*head_dim]."""
    shape = (num_layers, batch, max_len, c.kv_width)
    return KVCache(c_kv=jnp.zeros(shape, dtype), k_pe=jnp.zeros(shape, dtype))


def rope_inv_freq(c: GQAConfig) -> np.ndarray:
    """inv_freq [rotary_dim / 2] float32: theta^(-2i / rotary_dim)."""
    exponent = np.arange(0, c.rotary_dim, 2, dtype=np.float32) / np.float32(c.rotary_dim)
    return (1.0 / (np.float32(c.rope_theta) ** exponent)).astype(np.float32)


def rope_cos_sin(c: GQAConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., rotary_dim / 2] (float32) for integer `positions` [...]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(c))
    return jnp.cos(freqs), jnp.sin(freqs)


def _rotate(c: GQAConfig, x: jax.Array, cos, sin) -> jax.Array:
    """Rotary on x [B, T, heads, head_dim]'s first rotary_dim dims (rotated pairs laid out as halves)."""
    if c.rotary_dim == x.shape[-1]:
        return apply_rope(x, cos, sin, c.rope_interleave)
    rotated = apply_rope(x[..., : c.rotary_dim], cos, sin, c.rope_interleave)
    return jnp.concatenate([rotated, x[..., c.rotary_dim :]], axis=-1)


def _project(x, w, bias, heads: int, head_dim: int):
    y = linear(x, w)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.reshape(*x.shape[:2], heads, head_dim)


def gqa_qkv(c: GQAConfig, w: GQAWeights, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, H] -> (q [B, T, heads, d], k [B, T, kv_heads, d], v [B, T, kv_heads, d]); q, k
    normed (when q_norm / k_norm) and rotated."""
    q = _project(x, w.q_proj, w.q_proj_bias, c.num_attention_heads, c.head_dim)
    k = _project(x, w.k_proj, w.k_proj_bias, c.num_key_value_heads, c.head_dim)
    v = _project(x, w.v_proj, w.v_proj_bias, c.num_key_value_heads, c.head_dim)
    if w.q_norm is not None:
        q = rms_norm(q, w.q_norm, c.rms_norm_eps)
    if w.k_norm is not None:
        k = rms_norm(k, w.k_norm, c.rms_norm_eps)
    return _rotate(c, q, cos, sin), _rotate(c, k, cos, sin), v


def gqa(c: GQAConfig, w: GQAWeights, x: jax.Array, cache: KVCache, layer: int, positions, cos, sin,
        kv_len: int | None = None, block: int | None = None) -> tuple[jax.Array, KVCache]:
    """Write the new tokens' keys/values at `positions` [B, T] (positions >= cache.max_len are
    dropped: padding), then attend over the cache. -> (out [B, T, H], cache).

    kv_len (static): attend over the first kv_len cache slots only; None = all.
    block (static): key slots per block of the blocked attention (None: step_shapes.attention_key_block).
    """
    q, k, v = gqa_qkv(c, w, x, cos, sin)
    b, t = x.shape[:2]
    cache = write_layer(cache, layer, positions, k.reshape(b, t, -1), v.reshape(b, t, -1))
    return attend(c, w, q, cache, layer, positions, kv_len, block), cache


def attend(c: GQAConfig, w: GQAWeights, q: jax.Array, cache: KVCache, layer: int, positions,
           kv_len: int | None = None, block: int | None = None) -> jax.Array:
    """Queries q [B, T, heads, d] at `positions` over the cache as written -> o_proj'd out [B, T, H]."""
    b, t, h, d = q.shape
    kvh, groups = c.num_key_value_heads, h // c.num_key_value_heads
    keys, values = read_layer(cache, layer, kv_len)
    n_keys = keys.shape[1]
    keys = keys.astype(q.dtype).reshape(b, n_keys, kvh, d)
    values = values.astype(q.dtype).reshape(b, n_keys, kvh, d)
    qg = q.reshape(b, t, kvh, groups, d)

    def scores_of(k):
        return jnp.einsum("btkgd,bskd->btkgs", qg, k).reshape(b, t, h, k.shape[1]) * c.softmax_scale

    def contract(p, v):
        p = p.reshape(b, t, kvh, groups, v.shape[1])
        return jnp.einsum("btkgs,bskd->btkgd", p, v).reshape(b, t, h, d)

    blk = key_block_for(t, n_keys, block)
    if blk is not None:

        def block_fn(start, size):
            k = jax.lax.dynamic_slice_in_dim(keys, start, size, axis=1)
            return scores_of(k), jax.lax.dynamic_slice_in_dim(values, start, size, axis=1), contract

        out = key_blocked_attention(block_fn, positions, n_keys, blk, (b, t, h, d), q.dtype)
    else:
        visible = jnp.arange(n_keys)[None, None, None, :] <= positions[:, :, None, None]
        scores = jnp.where(visible, scores_of(keys).astype(jnp.float32), -jnp.inf)
        out = contract(jax.nn.softmax(scores, axis=-1).astype(q.dtype), values)
    out = linear(out.reshape(b, t, h * d), w.o_proj)
    return out if w.o_proj_bias is None else out + w.o_proj_bias.astype(out.dtype)
