"""The model's weights as a pytree of frozen dataclasses, named after the checkpoint's tensors.

Checkpoint name                                   -> pytree path
model.embed_tokens.weight                         -> Weights.embed_tokens            [V, H]
model.layers.{i}.input_layernorm.weight           -> layers[i].input_layernorm       [H]
model.layers.{i}.self_attn.q_a_proj               -> layers[i].self_attn.q_a_proj    Linear [q_lora, H]
                          .q_a_layernorm.weight   ->                   .q_a_layernorm  [q_lora]
                          .q_b_proj               ->                   .q_b_proj     Linear [heads*qk_head_dim, q_lora]
                          .q_proj  (no q_lora)    ->                   .q_proj       Linear [heads*qk_head_dim, H]
                          .kv_a_proj_with_mqa     ->                   .kv_a_proj_with_mqa Linear [kv_lora+rope, H]
                          .kv_a_layernorm.weight  ->                   .kv_a_layernorm [kv_lora]
                          .kv_b_proj              ->                   .kv_b_proj    Linear [heads*(nope+v), kv_lora]
                          .o_proj                 ->                   .o_proj       Linear [H, heads*v]
model.layers.{i}.post_attention_layernorm.weight  -> layers[i].post_attention_layernorm [H]
model.layers.{i}.mlp.{gate,up,down}_proj (dense)  -> layers[i].mlp: MLPWeights
model.layers.{i}.mlp.gate.weight                  -> layers[i].mlp.gate.weight       [E, H] (router)
model.layers.{i}.mlp.gate.e_score_correction_bias -> layers[i].mlp.gate.e_score_correction_bias [E]
model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj -> layers[i].mlp.experts.{gate,up,down}_proj
                                                     stacked over e: Linear [E, I, H] / [E, H, I]
model.layers.{i}.mlp.shared_experts.*             -> layers[i].mlp.shared_experts: MLPWeights
model.norm.weight                                 -> Weights.norm                    [H]
lm_head.weight                                    -> Weights.lm_head                 Linear [V, H]

"Linear" is any weight format of jaxmoe.quant (DenseWeight, Fp8Weight, ...).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

Linear = Any


@struct.dataclass
class MLAWeights:
    kv_a_proj_with_mqa: Linear
    kv_a_layernorm: jax.Array
    kv_b_proj: Linear
    o_proj: Linear
    q_a_proj: Linear | None = None
    q_a_layernorm: jax.Array | None = None
    q_b_proj: Linear | None = None
    q_proj: Linear | None = None


@struct.dataclass
class MLPWeights:
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear


@struct.dataclass
class RouterWeights:
    weight: jax.Array  # [E, H]
    e_score_correction_bias: jax.Array  # [E] float32


@struct.dataclass
class ExpertsWeights:
    """The routed experts of one layer, stacked on a leading expert axis."""

    gate_proj: Linear  # [E, I, H]
    up_proj: Linear  # [E, I, H]
    down_proj: Linear  # [E, H, I]


@struct.dataclass
class MoEWeights:
    gate: RouterWeights
    experts: Any  # ExpertsWeights, or a host-resident expert store handle (cpu_ext)
    shared_experts: MLPWeights | None = None


@struct.dataclass
class LayerWeights:
    input_layernorm: jax.Array
    self_attn: MLAWeights
    post_attention_layernorm: jax.Array
    mlp: MLPWeights | MoEWeights


@struct.dataclass
class Weights:
    embed_tokens: jax.Array  # [V, H]
    layers: tuple[LayerWeights, ...]
    norm: jax.Array  # [H]
    lm_head: Linear  # [V, H]


def has_routed_experts(mlp: Any) -> bool:
    """Whether a layer's MLP block is sparse, in any family's pytree: one with routed `experts`
    (MoEWeights, Qwen3-MoE's block; the field may be None once split off)."""
    return hasattr(mlp, "experts")


def split_experts(weights: Weights) -> tuple[Weights, tuple[Any, ...]]:
    """(weights without routed experts, per-layer routed experts (None for dense layers)), for
    any family's pytree: a sparse block is one with `experts` (MoEWeights, Qwen3-MoE's)."""
    experts, layers = [], []
    for lw in weights.layers:
        if has_routed_experts(lw.mlp):
            experts.append(lw.mlp.experts)
            lw = lw.replace(mlp=lw.mlp.replace(experts=None))
        else:
            experts.append(None)
        layers.append(lw)
    return weights.replace(layers=tuple(layers)), tuple(experts)
