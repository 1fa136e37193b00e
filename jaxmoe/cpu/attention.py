"""MLA's kv_b_proj on the CPU kernels, for both attention forms.

The absorbed decode multiplies every head's query by W_uk (q_latent = q_nope @ W_uk_h) and the
attention output by W_uv (out = o_latent @ W_uv_h^T): per-head GEMVs that XLA runs far below
the memory bandwidth on the CPU, with the FP8 -> f32 conversion on top (docs/PERFORMANCE_MODEL.md,
"Measurements behind design choices"). `HostKvB` holds, from the same FP8 bytes,
- `linear`: the Linear [H*(nope+v), kv_lora] for the expanded (prefill) form,
- `uk_t`: per head W_uk_h^T [kv_lora, nope] (a HostGroup), `uv`: per head W_uv_h [v, kv_lora].
Transposing a 128x128 block-scaled matrix keeps it block-scaled, so these are exact repacks
of the checkpoint's values whenever each head's nope rows and v rows each stay inside 128-row
scale blocks (DeepSeek-V3: nope = v = 128; the tiny test model: 16 + 16 of 32).

Model hook (jaxmoe.model.mla): `absorb_q(kv_b_proj, q_nope, cfg)` and
`absorb_out(kv_b_proj, o_latent, cfg)` as functools.singledispatch functions on the weight
type; this module registers HostKvB on them and `to_cpu_placement` places kv_b_proj as a
HostKvB.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct

from jaxmoe import quant
from jaxmoe.cpu import ops
from jaxmoe.cpu.handles import HostGroupedLinear, HostLinear
from jaxmoe.cpu.host_matrix import HostGroup, HostMatrix
from jaxmoe.model import mla

BLOCK = 128


@struct.dataclass
class HostKvB:
    linear: HostLinear
    uk_t: HostGroupedLinear
    uv: HostGroupedLinear


def _head_blocks(start: int, length: int) -> list[int] | None:
    """Checkpoint row block of each 128-chunk of rows [start, start+length), None if a chunk
    straddles two blocks (its scale would not be uniform)."""
    out = []
    for c in range(0, length, BLOCK):
        a, b = start + c, start + min(c + BLOCK, length) - 1
        if a // BLOCK != b // BLOCK:
            return None
        out.append(a // BLOCK)
    return out


def host_kv_b(w: Any, n_heads: int, nope: int, v: int) -> tuple[HostKvB, list] | None:
    """(HostKvB, owners) for an Fp8Weight kv_b_proj [n_heads*(nope+v), kv_lora], or None when
    the per-head slices are not block aligned (or the weight is not FP8)."""
    if not isinstance(w, quant.Fp8Weight) or tuple(w.block) != (BLOCK, BLOCK):
        return None
    q = np.asarray(w.weight).view(np.uint8)
    s = np.asarray(w.weight_scale_inv, np.float32)
    rows, r = q.shape
    if rows != n_heads * (nope + v):
        return None
    uk_q, uk_s, uv_q, uv_s = [], [], [], []
    for h in range(n_heads):
        a, b = h * (nope + v), h * (nope + v) + nope
        bk, bv = _head_blocks(a, nope), _head_blocks(b, v)
        if bk is None or bv is None:
            return None
        uk_q.append(np.ascontiguousarray(q[a:b].T))  # [r, nope]
        uk_s.append(np.ascontiguousarray(s[bk].T))  # [ceil(r/128), ceil(nope/128)]
        uv_q.append(q[b : b + v])  # [v, r]
        uv_s.append(s[bv])  # [ceil(v/128), ceil(r/128)]
    lin = HostMatrix.from_weight(w)
    uk, uv = HostGroup.fp8(uk_q, uk_s), HostGroup.fp8(uv_q, uv_s)
    return HostKvB(linear=lin.pytree(), uk_t=uk.pytree(), uv=uv.pytree()), [lin, uk, uv]


def absorb_q(kv_b: HostKvB, q_nope: jax.Array, cfg=None) -> jax.Array:
    """q_latent [..., H, kv_lora] = per head q_nope [..., H, nope] @ W_uk_h."""
    return ops.grouped_linear(q_nope, kv_b.uk_t)


def absorb_out(kv_b: HostKvB, o_latent: jax.Array, cfg=None) -> jax.Array:
    """out [..., H, v] = per head o_latent [..., H, kv_lora] @ W_uv_h^T."""
    return ops.grouped_linear(o_latent, kv_b.uv)


@quant.linear_for.register
def _(w: HostKvB, x: jax.Array) -> jax.Array:
    return ops.linear(x, w.linear)


mla.absorb_q.register(HostKvB)(absorb_q)
mla.absorb_out.register(HostKvB)(absorb_out)
