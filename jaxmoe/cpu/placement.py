"""Placing a loaded model on the CPU kernels: every large matmul goes through cpu_ext.

`to_cpu_placement(weights)` returns a weights pytree (of any model family: `layers` of
`self_attn` + `mlp`, and `lm_head`) in which
- attention projections (MLA: q_a/q_b/q, kv_a_proj_with_mqa, o_proj; any other attention
  dataclass, e.g. GQA's `GQAWeights`: every field holding a Linear, q/k/v/o_proj), dense MLPs,
  shared experts and lm_head are `HostLinear` handles (repacked FP8 or BF16 in host memory;
  float32 Linears stay with XLA, whose f32 dot is its fast path),
- each MoE layer's routed experts (the `experts` field of its MoE block: DeepSeek-V3's and
  GLM-4.5's `MoEWeights`, Qwen3-MoE's sparse block) are one `HostExperts` layer of an
  `ExpertStore` (FP8 as stored; unquantized experts are stored as bf16),
- norms, embeddings, attention biases, q/k norms and the routers stay as they are (the routers
  mark padding tokens with expert id -1 and weight 0, which the fused MoE kernel skips, as the
  JAX reference does); MLA's `kv_b_proj` becomes a `HostKvB` (per-head
  kernels, attention.py) when `cfg` is given and the model has the absorption hooks, else a
  float32 DenseWeight dequantized once here (the absorbed decode would otherwise dequantize it
  at every step, and XLA's FP8->f32 conversion on the CPU is slow enough to dominate the step:
  docs/PERFORMANCE_MODEL.md, "Measurements behind design choices"; float32 is 4x the FP8
  bytes, 67 MB per V3 layer).
`release(weights)` frees the native memory those handles refer to.

Dispatch: importing this module registers `HostLinear` on `jaxmoe.quant.linear_for` (the
weight-type dispatch behind `quant.linear`) and `HostExperts` on
`jaxmoe.model.moe.routed_experts`, so the model code runs either format unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import quant
from jaxmoe.cpu import attention, ops
from jaxmoe.cpu.expert_store import ExpertStore
from jaxmoe.cpu.handles import HostExperts, HostGroupedLinear, HostLinear
from jaxmoe.cpu.host_matrix import HostMatrix, live_owners
from jaxmoe.model import moe
from jaxmoe.model.weights import MLAWeights, MLPWeights


@quant.linear_for.register
def _(w: HostLinear, x: jax.Array) -> jax.Array:
    return ops.linear(x, w)


@quant.dequantize.register
def _(w: HostLinear, dtype=None):
    raise TypeError("a HostLinear lives in host memory for the cpu kernels and cannot be dequantized "
                    "into an array; keep this weight (e.g. kv_b_proj) in its device format")


@moe.routed_experts.register
def _(experts: HostExperts, x: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
    return ops.moe_experts(x, ids, weights, experts)


def _is_linear(w: Any) -> bool:
    """A Linear weight of jaxmoe.quant (or one already placed), as opposed to a plain array
    (bias, norm) or None."""
    return isinstance(w, (quant.DenseWeight, quant.Fp8Weight, HostLinear)) or type(w).__name__ == "Int4Weight"


def _large(w: Any, min_elements: int) -> bool:
    return len(w.shape) == 2 and w.shape[0] * w.shape[1] >= min_elements


def _host(w: Any, min_elements: int) -> Any:
    if w is None or isinstance(w, HostLinear):
        return w
    # FP8 and bf16 go to the kernels; float32 stays with XLA (its fast path on the CPU, and
    # the kernels would round it to bf16)
    host_format = isinstance(w, quant.Fp8Weight) or (isinstance(w, quant.DenseWeight) and w.weight.dtype == jnp.bfloat16)
    if host_format and _large(w, min_elements):
        return HostMatrix.from_weight(w).pytree()
    return w


def _dense_f32(w: Any, min_elements: int) -> Any:
    """FP8 -> float32 DenseWeight, dequantized once on the host (numpy); only where the other
    Linears of its size go to the CPU kernels too (not for an experts-only placement, whose
    attention runs on an accelerator)."""
    if not isinstance(w, quant.Fp8Weight) or not _large(w, min_elements):
        return w
    q = np.asarray(w.weight)
    return quant.DenseWeight(weight=jnp.asarray(quant.dequantize_fp8_blocks(q, np.asarray(w.weight_scale_inv), w.block)))


def to_cpu_placement(weights, *, min_elements: int = 0, store: ExpertStore | None = None, cfg=None):
    """A weights pytree (of any model family) whose large matmuls run on cpu_ext (see module docstring).

    min_elements: Linears smaller than this stay as they are. store: the ExpertStore to fill
    (default: a new one with one slot per layer); for weights loaded with load_experts=False,
    one built by `ExpertStore.from_checkpoint` (MoE layers without experts are taken from it).
    cfg: the model's config; with a DeepSeek-V3 ModelConfig kv_b_proj becomes a HostKvB (per-head kernels
    for the absorbed decode)."""
    store = store or ExpertStore(len(weights.layers))
    h = lambda w: _host(w, min_elements)  # noqa: E731

    def kv_b(w):
        """HostKvB (per-head kernels, attention.py) for an FP8 kv_b_proj given cfg, else float32."""
        if cfg is not None and isinstance(w, quant.Fp8Weight) and _large(w, min_elements):
            placed = attention.host_kv_b(w, cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim)
            if placed is not None:
                return placed[0]
        return _dense_f32(w, min_elements)

    def mlp(m: MLPWeights) -> MLPWeights:
        return MLPWeights(gate_proj=h(m.gate_proj), up_proj=h(m.up_proj), down_proj=h(m.down_proj))

    def self_attn(a):
        if isinstance(a, MLAWeights):  # DeepSeek-V3 (this order: the weights cache's host matrices follow it)
            return dataclasses.replace(a, q_a_proj=h(a.q_a_proj), q_b_proj=h(a.q_b_proj), q_proj=h(a.q_proj),
                                       kv_a_proj_with_mqa=h(a.kv_a_proj_with_mqa), o_proj=h(a.o_proj),
                                       kv_b_proj=kv_b(a.kv_b_proj))
        # any other attention (GQA: q/k/v/o_proj): every field holding a Linear, in field order;
        # biases and norms are plain arrays and stay
        return dataclasses.replace(a, **{f.name: h(getattr(a, f.name)) for f in dataclasses.fields(a)
                                         if _is_linear(getattr(a, f.name))})

    def ffn(i: int, m):
        if isinstance(m, MLPWeights):
            return mlp(m)
        # a MoE block (MoEWeights, Qwen3's sparse block, ...): its routed experts into the store,
        # its shared experts (if it has any) like a dense MLP, the router as it is
        ex = m.experts
        if ex is None:  # loaded with load_experts=False: the store must already hold them
            ex = store.layer(i)
        elif not isinstance(ex, HostExperts):
            ex = store.add_layer(i, ex.gate_proj, ex.up_proj, ex.down_proj)
        changes = {"experts": ex}
        if getattr(m, "shared_experts", None) is not None:
            changes["shared_experts"] = mlp(m.shared_experts)
        return dataclasses.replace(m, **changes)

    layers = []
    for i, lw in enumerate(weights.layers):
        layers.append(dataclasses.replace(lw, self_attn=self_attn(lw.self_attn), mlp=ffn(i, lw.mlp)))
    return dataclasses.replace(weights, layers=tuple(layers), lm_head=h(weights.lm_head))


def release(weights) -> None:
    """Frees the host matrices, groups and expert stores that a placed Weights pytree refers to."""
    host = (HostLinear, HostGroupedLinear, HostExperts)
    handles = set()
    for leaf in jax.tree_util.tree_leaves(weights, is_leaf=lambda x: isinstance(x, host)):
        if isinstance(leaf, (HostLinear, HostGroupedLinear)):
            handles.add(leaf.handle)
        elif isinstance(leaf, HostExperts):
            handles.add(leaf.store)
    for hd in handles:
        owner = live_owners.get(hd)
        if owner is not None:
            owner.free()
