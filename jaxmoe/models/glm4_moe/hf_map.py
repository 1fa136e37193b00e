"""A GLM-4.5 checkpoint: which tensors it must hold, where each goes in `Glm4MoeWeights`, and the
strict loader.

    cfg, weights = load_checkpoint("path/to/GLM-4.5-Air")

`expected_tensors(cfg)` lists every tensor (Hugging Face spelling, see weights.py) as
`jaxmoe.loading.hf_map.TensorSpec`s: Linears may be bf16/f16/f32 or e4m3 with an fp32
`weight_scale_inv` per 128x128 block (the block of `quantization_config`); embeddings, norms,
attention biases and the router stay float, `e_score_correction_bias` is read as float32.
Accounting is jaxmoe.loading.loader's: every name in the files is matched against the specs
before any tensor is read, and a missing, unexpected, misshapen or mistyped tensor (or FP8
scale) raises `CheckpointError` naming it. The MTP module (layers num_hidden_layers ..
+ num_nextn_predict_layers - 1) is skipped as DeepSeek-V3's loader skips it; with
num_nextn_predict_layers 0 such tensors are unexpected. Formats as there: an e4m3 Linear
becomes `Fp8Weight`, any other Linear a `DenseWeight` in its stored dtype, routed experts are
stacked on a leading expert axis.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.layers.gqa import GQAWeights
from jaxmoe.loading import loader
from jaxmoe.loading.hf_map import PROJS, TensorSpec, mlp_tensors, routed_expert_tensors
from jaxmoe.loading.loader import Checkpoint
from jaxmoe.loading.synthetic import linears_to_fp8
from jaxmoe.model.weights import ExpertsWeights, MLPWeights, MoEWeights, RouterWeights
from jaxmoe.models.glm4_moe.config import Glm4MoeConfig
from jaxmoe.models.glm4_moe.weights import Glm4MoeLayerWeights, Glm4MoeWeights


def layer_tensors(cfg: Glm4MoeConfig, i: int) -> list[TensorSpec]:
    """The tensors of decoder layer i."""
    h, d = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    pre, tgt = f"model.layers.{i}", f"layers.{i}"

    def lin(n: str, shape) -> TensorSpec:
        return TensorSpec(f"{pre}.self_attn.{n}.weight", shape, "linear", f"{tgt}.self_attn.{n}")

    def vec(name: str, target: str, size: int, kind: str = "float") -> TensorSpec:
        return TensorSpec(f"{pre}.{name}", (size,), kind, f"{tgt}.{target}")

    out = [
        vec("input_layernorm.weight", "input_layernorm", h),
        vec("post_attention_layernorm.weight", "post_attention_layernorm", h),
        lin("q_proj", (q_out, h)), lin("k_proj", (kv_out, h)), lin("v_proj", (kv_out, h)), lin("o_proj", (h, q_out)),
    ]
    if cfg.use_qk_norm:
        out += [vec(f"self_attn.{n}.weight", f"self_attn.{n}", d) for n in ("q_norm", "k_norm")]
    if cfg.attention_bias:  # o_proj has no bias in GLM-4.5
        out += [vec(f"self_attn.{p}.bias", f"self_attn.{p}_bias", n)
                for p, n in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out))]
    if not cfg.is_moe_layer(i):
        return out + mlp_tensors(f"{pre}.mlp", f"{tgt}.mlp", h, cfg.intermediate_size)
    e = cfg.n_routed_experts
    out += [TensorSpec(f"{pre}.mlp.gate.weight", (e, h), "float", f"{tgt}.mlp.gate.weight"),
            vec("mlp.gate.e_score_correction_bias", "mlp.gate.e_score_correction_bias", e, "bias")]
    for x in range(e):
        out += mlp_tensors(f"{pre}.mlp.experts.{x}", f"{tgt}.mlp.experts", h, cfg.moe_intermediate_size, x)
    if cfg.n_shared_experts:
        width = cfg.n_shared_experts * cfg.moe_intermediate_size
        out += mlp_tensors(f"{pre}.mlp.shared_experts", f"{tgt}.mlp.shared_experts", h, width)
    return out


def expected_tensors(cfg: Glm4MoeConfig) -> dict[str, TensorSpec]:
    """Every tensor of the checkpoint (MTP module excluded), in weights order."""
    v, h = cfg.vocab_size, cfg.hidden_size
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), "float", "embed_tokens")]
    for i in range(cfg.num_hidden_layers):
        specs += layer_tensors(cfg, i)
    specs += [
        TensorSpec("model.norm.weight", (h,), "float", "norm"),
        TensorSpec("lm_head.weight", (v, h), "linear", "lm_head", optional=cfg.tie_word_embeddings),
    ]
    return {s.name: s for s in specs}


def expert_tensors(cfg: Glm4MoeConfig, layer: int) -> dict[str, list[TensorSpec]]:
    """{proj: [spec of expert 0, 1, ...]} for the routed experts of one MoE layer."""
    return routed_expert_tensors(cfg, layer, layer_tensors)


def assemble(cfg: Glm4MoeConfig, leaves: dict[str, Any]) -> Glm4MoeWeights:
    """Build `Glm4MoeWeights` from {target: leaf}; routed-expert targets hold the stacked weight."""

    def mlp(t: str) -> MLPWeights:
        return MLPWeights(*(leaves[f"{t}.{p}"] for p in PROJS))

    layers = []
    for i in range(cfg.num_hidden_layers):
        t = f"layers.{i}"
        attn = GQAWeights(**{f.name: leaves.get(f"{t}.self_attn.{f.name}") for f in dataclasses.fields(GQAWeights)})
        if cfg.is_moe_layer(i):
            experts = [leaves.get(f"{t}.mlp.experts.{p}") for p in PROJS]
            ffn = MoEWeights(
                gate=RouterWeights(leaves[f"{t}.mlp.gate.weight"], leaves[f"{t}.mlp.gate.e_score_correction_bias"]),
                experts=None if experts[0] is None else ExpertsWeights(*experts),
                shared_experts=mlp(f"{t}.mlp.shared_experts") if cfg.n_shared_experts else None,
            )
        else:
            ffn = mlp(f"{t}.mlp")
        layers.append(Glm4MoeLayerWeights(leaves[f"{t}.input_layernorm"], attn, leaves[f"{t}.post_attention_layernorm"],
                                          ffn))
    return Glm4MoeWeights(leaves["embed_tokens"], tuple(layers), leaves["norm"], leaves["lm_head"])


def quantize_linears(cfg: Glm4MoeConfig, tensors: dict[str, np.ndarray],
                     block: tuple[int, int] = (128, 128)) -> dict[str, np.ndarray]:
    """A copy of `tensors` with every Linear `.weight` (lm_head excepted) as e4m3 + `.weight_scale_inv`."""
    return linears_to_fp8(tensors, expected_tensors(cfg), block)


class Glm4MoeCheckpoint(Checkpoint):
    """An opened, fully accounted GLM-4.5 checkpoint (jaxmoe.loading.loader.Checkpoint's
    accounting and access, with this family's config and tensor map); `skipped` lists the MTP
    module's tensors."""

    config_type = Glm4MoeConfig
    expected_tensors = staticmethod(expected_tensors)
    expert_tensors = staticmethod(expert_tensors)
    assemble = staticmethod(assemble)
    mtp_needs_config = True


def load_checkpoint(path: str | Path | Glm4MoeCheckpoint, *, dtype: Any = jnp.float32, device: jax.Device | None = None,
                    load_experts: bool = True) -> tuple[Glm4MoeConfig, Glm4MoeWeights]:
    """Read config.json and every tensor into `(Glm4MoeConfig, Glm4MoeWeights)` (raises CheckpointError).

    dtype: for norms, embeddings, the router weight and attention biases (Linears keep their
    format; e_score_correction_bias is float32).
    path: a directory, or an open Glm4MoeCheckpoint (left open).
    load_experts: False leaves the sparse layers' `experts` None.
    """
    return loader.load_checkpoint(path, dtype=dtype, device=device, load_experts=load_experts, checkpoint_type=Glm4MoeCheckpoint)
