"""Group-wise symmetric INT4 weights: numpy quantization, the storage layout, and the
`Int4Weight` pytree that the pure-JAX path dequantizes.

A Linear weight W [N, K] (out, in) is cut along K into groups of `group` columns (32 by
default; a multiple of 32 up to 256). Each group has one float16 scale s (signed) and values
q = clip(rint(w / s), -8, 7); w is approximated by s * q. How s is chosen (`scale_rule`):
- "absmax": s = amax(|w|) / 7, so q stays in [-7, 7] (also the rule of a converted
  checkpoint whose marker names none);
- "signed": the group's signed extreme m (its element of largest |w|) maps to -8: s = -m / 8
  (a 12.5% finer step than absmax; values on the other side beyond 7|s| clip);
- "search" (default): the least-squared-error scale of the group among candidates: the two
  rules above, s = -m/8 * a for a = 0.95, 0.9 and s = m/7 * 0.95 (these clip the extreme),
  then one least-squares refit s = <w, q> / <q, q> of the best codes (a finer grid of
  candidates lowers the error only slightly, at a multiple of the time). Every
  candidate is evaluated with its f16-rounded value and the final quantization, so a group's
  squared error is never above the absmax or signed rule's (up to f32 summation).
  Vectorized over all groups of a matrix (chunks of groups laid out [group, R] so the
  per-group sums are vector adds).
Of the three rules, "search" has the lowest round-trip relative MSE sum((s q - w)^2) / sum(w^2)
on Gaussian and heavy-tailed weights (benchmarks/quality.py, `scale_mse`) and the lowest INT4
next-token KL on the demo model, absmax the highest (figures: docs/PERFORMANCE_MODEL.md,
"Measurements behind design choices").

Storage (the converted checkpoint, and what `Int4Weight` holds):
- `qweight` uint8 [..., N, Kg/2] with Kg = ceil(K/group)*group: byte j holds column 2j in
  its low nibble and column 2j+1 in its high nibble, each as u = q + 8 in [0, 15];
- `scales` float16 [..., N, Kg/group] (may be negative: s * q is what counts).
K not divisible by the group size is padded: the last group is quantized over its real
columns, padding columns hold q = 0, and `k` (the logical width) is kept beside the arrays.

The CPU kernels (cpu_ext, `HostMatrix.int4`) repack this into their streaming tile layout
with the f16 scales inline (they compute dot(u, qx) - 8 sum(qx), exact for u = 0); the JAX
reference dequantizes it (`quant.dequantize`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxmoe import quant

QMIN, QMAX = -8, 7
DEFAULT_GROUP = 32
SCALE_RULES = ("absmax", "signed", "search")
DEFAULT_SCALE_RULE = "search"
# "search" candidates, as multiples of the group's signed extreme m (first wins ties): the
# signed rule (m -> -8), m -> -8 / a (the extreme clipped), absmax (m -> +7), m -> +7 / a
SEARCH_MULTIPLIERS = (-1 / 8, -0.95 / 8, -0.9 / 8, 1 / 7, 0.95 / 7)
SEARCH_REFITS = 1  # least-squares refits of the best codes' scale
_CHUNK = 1 << 18  # elements per search chunk (1 MiB of f32: cache-resident)


def check_group(group: int) -> int:
    if not isinstance(group, (int, np.integer)) or group < 32 or group > 256 or group % 32:
        raise ValueError(f"INT4 group size must be a multiple of 32 in [32, 256], got {group!r}")
    return int(group)


def check_scale_rule(rule: str) -> str:
    if rule not in SCALE_RULES:
        raise ValueError(f"INT4 scale rule must be one of {', '.join(SCALE_RULES)}, got {rule!r}")
    return rule


def padded_k(k: int, group: int) -> int:
    return -(-k // group) * group


def _f16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to float16 (the stored scale), as float32."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _codes(g: np.ndarray, s: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """clip(rint(g / s), -8, 7) with s broadcast against g; s == 0 gives q = 0."""
    return _codes_div(g, np.where(s != 0, s, np.inf), out)


def _codes_div(g: np.ndarray, d: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    out = np.divide(g, d, out=out)
    np.rint(out, out=out)
    return np.clip(out, QMIN, QMAX, out=out)


def _search_chunk(gt: np.ndarray) -> np.ndarray:
    """gt float32 [group, R] (one group per column) -> f32 scales [R] (f16 values): the
    candidate of least squared error sum((s q - w)^2) = sum(w^2) + s (s <q,q> - 2 <w,q>)."""
    mx, mn = gt.max(0), gt.min(0)
    m = np.where(-mn > mx, mn, mx)
    n_c = len(SEARCH_MULTIPLIERS)
    s = np.empty((n_c + SEARCH_REFITS, len(m)), np.float32)
    s[:n_c] = _f16(np.asarray(SEARCH_MULTIPLIERS, np.float32)[:, None] * m)
    wq, qq, obj = (np.empty_like(s) for _ in range(3))
    t = np.empty_like(gt)

    def consider(i: int) -> None:
        _codes_div(gt, np.where(s[i] != 0, s[i], np.inf)[None], out=t)
        np.einsum("ji,ji->i", gt, t, out=wq[i])
        np.einsum("ji,ji->i", t, t, out=qq[i])
        np.multiply(s[i], qq[i], out=obj[i])
        obj[i] -= 2 * wq[i]
        obj[i] *= s[i]

    for i in range(n_c):
        consider(i)
    cols = np.arange(len(m))
    for r in range(SEARCH_REFITS):
        i = n_c + r
        best = obj[:i].argmin(0)
        bwq, bqq = wq[best, cols], qq[best, cols]
        with np.errstate(over="ignore"):
            refit = _f16(np.divide(bwq, bqq, out=np.zeros_like(bwq), where=bqq > 0))
        s[i] = np.where(np.isfinite(refit), refit, 0)
        consider(i)
    return s[obj.argmin(0), cols]


def group_scales(g: np.ndarray, rule: str = DEFAULT_SCALE_RULE) -> np.ndarray:
    """float32 [R, group] (one group per row) -> float16 scales [R] by `rule` (module docstring)."""
    rule = check_scale_rule(rule)
    if rule == "absmax":
        return (np.abs(g).max(-1) / QMAX).astype(np.float16)
    if rule == "signed":
        mx, mn = g.max(-1), g.min(-1)
        return (np.where(-mn > mx, mn, mx) / -8).astype(np.float16)
    out = np.empty(len(g), np.float16)
    step = max(1, _CHUNK // g.shape[-1])
    for r0 in range(0, len(g), step):
        out[r0:r0 + step] = _search_chunk(np.ascontiguousarray(g[r0:r0 + step].T))
    return out


def quantize_int4(w: np.ndarray, group: int = DEFAULT_GROUP, name: str = "weight",
                  scale_rule: str = DEFAULT_SCALE_RULE) -> tuple[np.ndarray, np.ndarray]:
    """float [..., N, K] -> (qweight uint8 [..., N, Kg/2], scales float16 [..., N, Kg/group])."""
    group = check_group(group)
    scale_rule = check_scale_rule(scale_rule)
    w = np.asarray(w, np.float32)
    if w.ndim < 2:
        raise ValueError(f"{name}: INT4 quantization needs a [..., N, K] matrix, got shape {w.shape}")
    amax = max(float(w.max()), -float(w.min())) if w.size else 0.0  # NaN propagates
    if not np.isfinite(amax):
        raise ValueError(f"{name}: cannot quantize non-finite values to INT4")
    *lead, n, k = w.shape
    kg = padded_k(k, group)
    if kg == k:
        g = w.reshape(-1, group)
    else:
        pad = np.zeros((*lead, n, kg), np.float32)
        pad[..., :k] = w
        g = pad.reshape(-1, group)
    if amax / QMAX > float(np.finfo(np.float16).max):
        raise ValueError(f"{name}: |w| up to {amax:.4g} overflows the float16 INT4 group scale")
    scales = group_scales(g, scale_rule)
    q = _codes(g, scales.astype(np.float32)[:, None])
    u = (q + 8).astype(np.uint8).reshape(*lead, n, kg)
    packed = u[..., 0::2] | (u[..., 1::2] << 4)
    return np.ascontiguousarray(packed), scales.reshape(*lead, n, kg // group)


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
    def from_float(cls, w, group: int = DEFAULT_GROUP, name: str = "weight",
                   scale_rule: str = DEFAULT_SCALE_RULE) -> Int4Weight:
        q, s = quantize_int4(np.asarray(w, np.float32), group, name, scale_rule)
        return cls(qweight=jnp.asarray(q), scales=jnp.asarray(s), k=int(np.shape(w)[-1]), group=group)


@quant.dequantize.register
def _(w: Int4Weight, dtype=jnp.float32) -> jax.Array:
    q = w.qweight
    u = jnp.stack([q & 15, q >> 4], axis=-1).reshape(*q.shape[:-1], 2 * q.shape[-1])
    vals = u.astype(jnp.float32) - 8.0
    s = jnp.repeat(w.scales.astype(jnp.float32), w.group, axis=-1)
    return (vals * s)[..., : w.k].astype(dtype)
