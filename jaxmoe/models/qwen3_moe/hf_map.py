"""A Qwen3-MoE checkpoint: which tensors it must hold, where each goes in `Qwen3MoeWeights`, and
the strict loader.

    cfg, weights = load_checkpoint("path/to/Qwen3-30B-A3B")

`expected_tensors(cfg)` lists every tensor (Hugging Face spelling, see weights.py) as
`jaxmoe.loading.hf_map.TensorSpec`s: Linears may be bf16/f16/f32 or e4m3 with an fp32
`weight_scale_inv` per 128x128 block (the block of `quantization_config`); embeddings, norms
and the router stay float. Accounting is jaxmoe.loading.loader's: every name in the files is
matched against the specs before any tensor is read, and a missing, unexpected, misshapen or
mistyped tensor (or FP8 scale) raises `CheckpointError` naming it. Formats as there: an e4m3
Linear becomes `Fp8Weight`, any other Linear a `DenseWeight` in its stored dtype, the other
tensors are cast to `dtype`, routed experts are stacked on a leading expert axis.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.layers.gqa import GQAWeights
from jaxmoe.layers.softmax_router import SoftmaxRouterWeights
from jaxmoe.loading import loader
from jaxmoe.loading.hf_map import PROJS, TensorSpec, mlp_tensors, routed_expert_tensors
from jaxmoe.loading.loader import Checkpoint
from jaxmoe.loading.synthetic import linears_to_fp8
from jaxmoe.model.weights import ExpertsWeights, MLPWeights
from jaxmoe.models.qwen3_moe.config import Qwen3MoeConfig
from jaxmoe.models.qwen3_moe.weights import Qwen3MoeLayerWeights, Qwen3MoeSparseMoeWeights, Qwen3MoeWeights


def layer_tensors(cfg: Qwen3MoeConfig, i: int) -> list[TensorSpec]:
    """The tensors of decoder layer i."""
    h, d = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    pre, tgt = f"model.layers.{i}", f"layers.{i}"

    def lin(n: str, shape) -> TensorSpec:
        return TensorSpec(f"{pre}.self_attn.{n}.weight", shape, "linear", f"{tgt}.self_attn.{n}")

    def vec(name: str, target: str, size: int) -> TensorSpec:
        return TensorSpec(f"{pre}.{name}", (size,), "float", f"{tgt}.{target}")

    out = [
        vec("input_layernorm.weight", "input_layernorm", h),
        vec("post_attention_layernorm.weight", "post_attention_layernorm", h),
        lin("q_proj", (q_out, h)), lin("k_proj", (kv_out, h)), lin("v_proj", (kv_out, h)), lin("o_proj", (h, q_out)),
        vec("self_attn.q_norm.weight", "self_attn.q_norm", d),
        vec("self_attn.k_norm.weight", "self_attn.k_norm", d),
    ]
    if cfg.attention_bias:
        out += [vec(f"self_attn.{p}.bias", f"self_attn.{p}_bias", n)
                for p, n in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out), ("o_proj", h))]
    if not cfg.is_moe_layer(i):
        return out + mlp_tensors(f"{pre}.mlp", f"{tgt}.mlp", h, cfg.intermediate_size)
    out.append(TensorSpec(f"{pre}.mlp.gate.weight", (cfg.num_experts, h), "float", f"{tgt}.mlp.gate.weight"))
    for e in range(cfg.num_experts):
        out += mlp_tensors(f"{pre}.mlp.experts.{e}", f"{tgt}.mlp.experts", h, cfg.moe_intermediate_size, e)
    return out


def expected_tensors(cfg: Qwen3MoeConfig) -> dict[str, TensorSpec]:
    """Every tensor of the checkpoint, in weights order."""
    v, h = cfg.vocab_size, cfg.hidden_size
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), "float", "embed_tokens")]
    for i in range(cfg.num_hidden_layers):
        specs += layer_tensors(cfg, i)
    specs += [
        TensorSpec("model.norm.weight", (h,), "float", "norm"),
        TensorSpec("lm_head.weight", (v, h), "linear", "lm_head", optional=cfg.tie_word_embeddings),
    ]
    return {s.name: s for s in specs}


def expert_tensors(cfg: Qwen3MoeConfig, layer: int) -> dict[str, list[TensorSpec]]:
    """{proj: [spec of expert 0, 1, ...]} for the routed experts of one MoE layer."""
    return routed_expert_tensors(cfg, layer, layer_tensors)


def assemble(cfg: Qwen3MoeConfig, leaves: dict[str, Any]) -> Qwen3MoeWeights:
    """Build `Qwen3MoeWeights` from {target: leaf}; routed-expert targets hold the stacked weight."""
    layers = []
    for i in range(cfg.num_hidden_layers):
        t = f"layers.{i}"
        attn = GQAWeights(**{f.name: leaves.get(f"{t}.self_attn.{f.name}") for f in dataclasses.fields(GQAWeights)})
        if cfg.is_moe_layer(i):
            experts = [leaves.get(f"{t}.mlp.experts.{p}") for p in PROJS]
            ffn = Qwen3MoeSparseMoeWeights(SoftmaxRouterWeights(leaves[f"{t}.mlp.gate.weight"]),
                                           None if experts[0] is None else ExpertsWeights(*experts))
        else:
            ffn = MLPWeights(*(leaves[f"{t}.mlp.{p}"] for p in PROJS))
        layers.append(Qwen3MoeLayerWeights(leaves[f"{t}.input_layernorm"], attn, leaves[f"{t}.post_attention_layernorm"],
                                           ffn))
    return Qwen3MoeWeights(leaves["embed_tokens"], tuple(layers), leaves["norm"], leaves["lm_head"])


def quantize_linears(cfg: Qwen3MoeConfig, tensors: dict[str, np.ndarray],
                     block: tuple[int, int] = (128, 128)) -> dict[str, np.ndarray]:
    """A copy of `tensors` with every Linear `.weight` (lm_head excepted) as e4m3 + `.weight_scale_inv`."""
    return linears_to_fp8(tensors, expected_tensors(cfg), block)


class Qwen3MoeCheckpoint(Checkpoint):
    """An opened, fully accounted Qwen3-MoE checkpoint (jaxmoe.loading.loader.Checkpoint's
    accounting and access, with this family's config and tensor map)."""

    config_type = Qwen3MoeConfig
    expected_tensors = staticmethod(expected_tensors)
    expert_tensors = staticmethod(expert_tensors)
    assemble = staticmethod(assemble)
    mtp_needs_config = True


def load_checkpoint(path: str | Path | Qwen3MoeCheckpoint, *, dtype: Any = jnp.float32, device: jax.Device | None = None,
                    load_experts: bool = True) -> tuple[Qwen3MoeConfig, Qwen3MoeWeights]:
    """Read config.json and every tensor into `(Qwen3MoeConfig, Qwen3MoeWeights)` (raises CheckpointError).

    dtype: for norms, embeddings, the router and attention biases (Linears keep their format).
    path: a directory, or an open Qwen3MoeCheckpoint (left open).
    load_experts: False leaves the sparse layers' `experts` None.
    """
    return loader.load_checkpoint(path, dtype=dtype, device=device, load_experts=load_experts, checkpoint_type=Qwen3MoeCheckpoint)
