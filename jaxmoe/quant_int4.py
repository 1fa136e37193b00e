"""Group-wise symmetric INT4 weights: numpy quantization, the storage layout, and the
`Int4Weight` pytree that the pure-JAX path dequantizes.

A Linear weight W [N, K] (out, in) is cut along K into groups of `group` columns (32 by
default; a multiple of 32 up to 256). Each group has one float16 scale
s = amax(|w|) / 7 (rounded to f16 first) and values q = clip(rint(w / s), -7, 7).

Storage (the converted checkpoint, and what `Int4Weight` holds):
- `qweight` uint8 [..., N, Kg/2] with Kg = ceil(K/group)*group: byte j holds column 2j in
  its low nibble and column 2j+1 in its high nibble, each as u = q + 8 (offset binary);
- `scales` float16 [..., N, Kg/group].
K not divisible by the group size is padded: the last group is quantized over its real
columns, padding columns hold q = 0, and `k` (the logical width) is kept beside the arrays.

The CPU kernels (cpu_ext, `HostMatrix.int4`) repack this into their streaming tile layout
with the f16 scales inline; the JAX reference dequantizes it (`quant.dequantize`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxmoe import quant

QMAX = 7
DEFAULT_GROUP = 32


def check_group(group: int) -> int:
    if not isinstance(group, (int, np.integer)) or group < 32 or group > 256 or group % 32:
        raise ValueError(f"INT4 group size must be a multiple of 32 in [32, 256], got {group!r}")
    return int(group)


def padded_k(k: int, group: int) -> int:
    return -(-k // group) * group


def quantize_int4(w: np.ndarray, group: int = DEFAULT_GROUP, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """float [..., N, K] -> (qweight uint8 [..., N, Kg/2], scales float16 [..., N, Kg/group])."""
    group = check_group(group)
    w = np.asarray(w, np.float32)
    if w.ndim < 2:
        raise ValueError(f"{name}: INT4 quantization needs a [..., N, K] matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name}: cannot quantize non-finite values to INT4")
    *lead, n, k = w.shape
    kg = padded_k(k, group)
    pad = np.zeros((*lead, n, kg), np.float32)
    pad[..., :k] = w
    g = pad.reshape(*lead, n, kg // group, group)
    amax = np.abs(g).max(axis=-1)
    scale32 = amax / QMAX
    if np.any(scale32 > np.finfo(np.float16).max):
        raise ValueError(f"{name}: |w| up to {amax.max():.4g} overflows the float16 INT4 group scale")
    scales = scale32.astype(np.float16)
    s = scales.astype(np.float32)[..., None]
    q = np.where(s > 0, np.rint(g / np.where(s > 0, s, 1.0)), 0.0)
    u = (np.clip(q, -QMAX, QMAX) + 8).astype(np.uint8).reshape(*lead, n, kg)
    packed = u[..., 0::2] | (u[..., 1::2] << 4)
    return np.ascontiguousarray(packed), scales


def unpack_int4(qweight: np.ndarray) -> np.ndarray:
    """uint8 [..., N, Kg/2] -> int8 q [..., N, Kg] (u - 8)."""
    q = np.asarray(qweight, np.uint8)
    out = np.empty(q.shape[:-1] + (2 * q.shape[-1],), np.int8)
    out[..., 0::2] = (q & 15).astype(np.int8) - 8
    out[..., 1::2] = (q >> 4).astype(np.int8) - 8
    return out


def dequantize_int4(qweight: np.ndarray, scales: np.ndarray, k: int, group: int = DEFAULT_GROUP,
                    dtype=np.float32) -> np.ndarray:
    """numpy twin of `dequantize(Int4Weight)`: [..., N, k]."""
    q = unpack_int4(qweight).astype(np.float64)
    s = np.repeat(np.asarray(scales, np.float64), group, axis=-1)
    if s.shape != q.shape:
        raise ValueError(f"INT4 scales {np.shape(scales)} do not match qweight {np.shape(qweight)} with group {group}")
    return (q * s)[..., :k].astype(dtype)


@struct.dataclass
class Int4Weight:
    """Group-quantized INT4 Linear weight (layout in the module docstring)."""

    qweight: jax.Array  # uint8 [..., N, Kg/2]
    scales: jax.Array  # float16 [..., N, Kg/group]
    k: int = struct.field(pytree_node=False)
    group: int = struct.field(pytree_node=False, default=DEFAULT_GROUP)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.qweight.shape[:-1], self.k)

    @classmethod
    def from_float(cls, w, group: int = DEFAULT_GROUP, name: str = "weight") -> Int4Weight:
        q, s = quantize_int4(np.asarray(w, np.float32), group, name)
        return cls(qweight=jnp.asarray(q), scales=jnp.asarray(s), k=int(np.shape(w)[-1]), group=group)


@quant.dequantize.register
def _(w: Int4Weight, dtype=jnp.float32) -> jax.Array:
    q = w.qweight
    u = jnp.stack([q & 15, q >> 4], axis=-1).reshape(*q.shape[:-1], 2 * q.shape[-1])
    vals = u.astype(jnp.float32) - 8.0
    s = jnp.repeat(w.scales.astype(jnp.float32), w.group, axis=-1)
    return (vals * s)[..., : w.k].astype(dtype)
