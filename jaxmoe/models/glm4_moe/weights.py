"""GLM-4.5 weights as a pytree of frozen dataclasses, named after the checkpoint's tensors.

Checkpoint name                                        -> pytree path
model.embed_tokens.weight                              -> Glm4MoeWeights.embed_tokens       [V, H]
model.layers.{i}.input_layernorm.weight                -> layers[i].input_layernorm         [H]
model.layers.{i}.self_attn.{q,k,v,o}_proj.weight       -> layers[i].self_attn.{q,k,v,o}_proj  Linear (GQAWeights)
model.layers.{i}.self_attn.{q,k,v}_proj.bias           -> layers[i].self_attn.{q,k,v}_proj_bias (attention_bias only)
model.layers.{i}.self_attn.{q,k}_norm.weight           -> layers[i].self_attn.{q,k}_norm    [head_dim] (use_qk_norm only)
model.layers.{i}.post_attention_layernorm.weight       -> layers[i].post_attention_layernorm [H]
model.layers.{i}.mlp.{gate,up,down}_proj.weight (i < first_k_dense_replace) -> layers[i].mlp: MLPWeights
model.layers.{i}.mlp.gate.weight                       -> layers[i].mlp.gate.weight         [E, H] (router)
model.layers.{i}.mlp.gate.e_score_correction_bias      -> layers[i].mlp.gate.e_score_correction_bias [E] float32
model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight -> layers[i].mlp.experts.{gate,up,down}_proj
                                                          stacked over e: Linear [E, I, H] / [E, H, I]
model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight -> layers[i].mlp.shared_experts: MLPWeights
                                                          (width n_shared_experts x moe_intermediate_size)
model.norm.weight                                      -> Glm4MoeWeights.norm               [H]
lm_head.weight                                         -> Glm4MoeWeights.lm_head            Linear [V, H]
model.layers.{L..L+num_nextn_predict_layers-1}.*       -> (MTP module: not loaded)

The sparse layers' block is DeepSeek-V3's `MoEWeights` (router with correction bias, routed
experts, shared experts), run by `jaxmoe.model.moe.moe`. "Linear" is any weight format of
jaxmoe.quant (DenseWeight, Fp8Weight, ...).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

from jaxmoe.layers.gqa import GQAWeights
from jaxmoe.model.weights import ExpertsWeights, MLPWeights, MoEWeights, RouterWeights

__all__ = ["ExpertsWeights", "GQAWeights", "Glm4MoeLayerWeights", "Glm4MoeWeights", "MLPWeights", "MoEWeights",
           "RouterWeights"]


@struct.dataclass
class Glm4MoeLayerWeights:
    input_layernorm: jax.Array
    self_attn: GQAWeights
    post_attention_layernorm: jax.Array
    mlp: MLPWeights | MoEWeights


@struct.dataclass
class Glm4MoeWeights:
    embed_tokens: jax.Array  # [V, H]
    layers: tuple[Glm4MoeLayerWeights, ...]
    norm: jax.Array  # [H]
    lm_head: Any  # Linear [V, H]
