"""Weight formats as pytrees, and the one quant-aware matmul every model block uses.

A Linear weight is `weight[..., N, K]` (out, in) as stored in the checkpoint, and
`linear(x, w)` computes `x @ W^T`. Model code calls `linear` and never looks at the format:

- `DenseWeight`: bf16/f32 values.
- `Fp8Weight`: float8_e4m3fn values with fp32 `weight_scale_inv` per (bn x bk) block,
  shape [..., ceil(N/bn), ceil(K/bk)] (edge blocks partial). Real value = fp8 * scale.

Other formats (host-resident handles run by cpu_ext) register themselves on the weight-type
dispatchers `linear_for` and `dequantize` (`functools.singledispatch` on the weight).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0


@struct.dataclass
class DenseWeight:
    weight: jax.Array  # [..., N, K]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


@struct.dataclass
class Fp8Weight:
    weight: jax.Array  # float8_e4m3fn [..., N, K]
    weight_scale_inv: jax.Array  # float32 [..., ceil(N/bn), ceil(K/bk)]
    block: tuple[int, int] = struct.field(pytree_node=False, default=(128, 128))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


Weight = Any  # DenseWeight | Fp8Weight | a registered host format


def expand_block_scales(scale: jax.Array, n: int, k: int, block: tuple[int, int]) -> jax.Array:
    """[..., ceil(n/bn), ceil(k/bk)] block scales -> [..., n, k] per element."""
    bn, bk = block
    s = jnp.repeat(scale, bn, axis=-2)[..., :n, :]
    return jnp.repeat(s, bk, axis=-1)[..., :k]


@functools.singledispatch
def dequantize(w: Any, dtype=jnp.float32) -> jax.Array:
    raise TypeError(f"no dequantize rule for weight type {type(w).__name__}")


@dequantize.register
def _(w: DenseWeight, dtype=jnp.float32) -> jax.Array:
    return w.weight.astype(dtype)


@dequantize.register
def _(w: Fp8Weight, dtype=jnp.float32) -> jax.Array:
    n, k = w.weight.shape[-2:]
    s = expand_block_scales(w.weight_scale_inv.astype(jnp.float32), n, k, w.block)
    return (w.weight.astype(jnp.float32) * s).astype(dtype)


def linear(x: jax.Array, w: Any) -> jax.Array:
    """y[..., N] = x[..., K] @ W[N, K]^T for any weight format (dispatch on the weight's type)."""
    return linear_for(w, x)


@functools.singledispatch
def linear_for(w: Any, x: jax.Array) -> jax.Array:
    """Default: dequantize to x's dtype and matmul with f32 accumulation."""
    return jnp.einsum(
        "...k,nk->...n", x, dequantize(w, x.dtype), preferred_element_type=jnp.float32
    ).astype(x.dtype)


# ---- host-side (numpy) quantization, used by the checkpoint writer and the tests ----------


def quantize_fp8_blocks(w: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Block-quantize a float [N, K] matrix to (e4m3 values [N, K], fp32 scale_inv [ceil(N/bn), ceil(K/bk)]).

    scale_inv = amax(block) / 448, values = clip(w / scale_inv, +-448) (ml_dtypes does not
    saturate on cast: 500 -> NaN, hence the clip).
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    bn, bk = block
    gn, gk = -(-n // bn), -(-k // bk)
    pad = np.zeros((gn * bn, gk * bk), np.float32)
    pad[:n, :k] = w
    blocks = np.abs(pad.reshape(gn, bn, gk, bk)).max(axis=(1, 3))
    scale = np.where(blocks > 0, blocks / FP8_MAX, 1.0).astype(np.float32)
    full = np.repeat(np.repeat(scale, bn, 0), bk, 1)[:n, :k]
    q = np.clip(w / full, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


@functools.cache
def _fp8_table() -> np.ndarray:
    return np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def dequantize_fp8_blocks(q: np.ndarray, scale: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """numpy twin of `dequantize(Fp8Weight)` (float32): e4m3 values through a 256-entry table,
    each block multiplied by its scale in place (no full-size scale array; edge blocks padded)."""
    q = np.asarray(q)
    n, k = q.shape
    bn, bk = block
    gn, gk = -(-n // bn), -(-k // bk)
    values = np.take(_fp8_table(), q.view(np.uint8))
    out = values if (n, k) == (gn * bn, gk * bk) else np.zeros((gn * bn, gk * bk), np.float32)
    if out is not values:
        out[:n, :k] = values
    out.reshape(gn, bn, gk, bk).__imul__(np.asarray(scale, np.float32)[:gn, None, :gk, None])
    return out if out is values else np.ascontiguousarray(out[:n, :k])
