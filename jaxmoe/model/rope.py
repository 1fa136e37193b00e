"""Rotary position embedding for MLA's decoupled rope dims, with YaRN as the config asks.

DeepSeek lays the rope dims out as interleaved pairs (x0, x1), (x2, x3), ... each rotated by
one frequency (`rope_interleave`, the default). `apply_rope` rotates those pairs and returns
them de-interleaved ([rotated evens | rotated odds]); queries and keys go through the same
permutation, so their dot products -- all attention ever uses -- are those of the
interleaved layout. With `rope_interleave: false` the pairs are (x_i, x_{i+d/2}).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ModelConfig, yarn_get_mscale


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [rope_dim/2] float32, attention_factor) -- YaRN when cfg.rope_scaling is set."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return extrapolation, 1.0

    factor = rs.factor
    if rs.attention_factor is not None:
        attention_factor = float(rs.attention_factor)
    elif rs.mscale and rs.mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, rs.mscale) / yarn_get_mscale(factor, rs.mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(rs.original_max_position_embeddings / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    interpolation = (1.0 / (factor * pos_freqs)).astype(np.float32)
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [..., rope_dim/2] (float32) for integer `positions` [...]."""
    inv_freq, attention_factor = rope_inv_freq(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(freqs) * attention_factor, jnp.sin(freqs) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool = True) -> jax.Array:
    """Rotate the pairs of x [B, T, ..., rope_dim]; cos/sin are [B, T, rope_dim/2]."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:]).astype(x.dtype)
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:]).astype(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., :half], x[..., half:])
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
