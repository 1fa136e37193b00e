"""Qwen3-MoE weights as a pytree of frozen dataclasses, named after the checkpoint's tensors.

Checkpoint name                                        -> pytree path
model.embed_tokens.weight                              -> Qwen3MoeWeights.embed_tokens      [V, H]
model.layers.{i}.input_layernorm.weight                -> layers[i].input_layernorm         [H]
model.layers.{i}.self_attn.{q,k,v,o}_proj.weight       -> layers[i].self_attn.{q,k,v,o}_proj  Linear (GQAWeights)
model.layers.{i}.self_attn.{q,k,v,o}_proj.bias         -> layers[i].self_attn.{q,k,v,o}_proj_bias (attention_bias only)
model.layers.{i}.self_attn.{q,k}_norm.weight           -> layers[i].self_attn.{q,k}_norm    [head_dim]
model.layers.{i}.post_attention_layernorm.weight       -> layers[i].post_attention_layernorm [H]
model.layers.{i}.mlp.{gate,up,down}_proj.weight (dense) -> layers[i].mlp: MLPWeights
model.layers.{i}.mlp.gate.weight                       -> layers[i].mlp.gate.weight         [E, H] (router)
model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight -> layers[i].mlp.experts.{gate,up,down}_proj
                                                          stacked over e: Linear [E, I, H] / [E, H, I]
model.norm.weight                                      -> Qwen3MoeWeights.norm              [H]
lm_head.weight                                         -> Qwen3MoeWeights.lm_head           Linear [V, H]

"Linear" is any weight format of jaxmoe.quant (DenseWeight, Fp8Weight, ...).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

from jaxmoe.layers.gqa import GQAWeights
from jaxmoe.layers.softmax_router import SoftmaxRouterWeights
from jaxmoe.model.weights import ExpertsWeights, MLPWeights

__all__ = ["ExpertsWeights", "GQAWeights", "MLPWeights", "Qwen3MoeLayerWeights", "Qwen3MoeSparseMoeWeights",
           "Qwen3MoeWeights", "SoftmaxRouterWeights"]


@struct.dataclass
class Qwen3MoeSparseMoeWeights:
    gate: SoftmaxRouterWeights
    experts: Any  # ExpertsWeights, or a host-resident expert store handle


@struct.dataclass
class Qwen3MoeLayerWeights:
    input_layernorm: jax.Array
    self_attn: GQAWeights
    post_attention_layernorm: jax.Array
    mlp: MLPWeights | Qwen3MoeSparseMoeWeights


@struct.dataclass
class Qwen3MoeWeights:
    embed_tokens: jax.Array  # [V, H]
    layers: tuple[Qwen3MoeLayerWeights, ...]
    norm: jax.Array  # [H]
    lm_head: Any  # Linear [V, H]
