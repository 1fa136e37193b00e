"""Which tensors a DeepSeek-V3-family checkpoint must hold, and where each goes in `Weights`.

`expected_tensors(cfg)` lists every tensor name of the checkpoint (Hugging Face / DeepSeek
spelling, see jaxmoe/model/weights.py) with its shape, its kind and its pytree target:

- kind "linear": a Linear `weight[N, K]`, stored e4m3 (then with an fp32
  `<prefix>.weight_scale_inv` of shape [ceil(N/bn), ceil(K/bk)]) or bf16/f16/f32 (no scale);
- kind "float": embeddings, norms, router weight (bf16/f16/f32);
- kind "bias": the router's `e_score_correction_bias` (fp32 in real checkpoints).

Routed experts carry `expert=e` and share one target (stacked on a leading expert axis).
Layers at index >= num_hidden_layers are the multi-token-prediction (MTP) module: recognised
by `mtp_layer` and skipped. `assemble(cfg, leaves)` turns {target: value} into `Weights`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax

from jaxmoe.config import ModelConfig
from jaxmoe.model.weights import (
    ExpertsWeights,
    LayerWeights,
    MLAWeights,
    MLPWeights,
    MoEWeights,
    RouterWeights,
    Weights,
)

FP8 = "F8_E4M3"
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32"})
LINEAR_DTYPES = FLOAT_DTYPES | {FP8}
SCALE_DTYPES = frozenset({"F32", "BF16"})
SCALE_SUFFIX = "weight_scale_inv"
PROJS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_BLOCK = (128, 128)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str  # checkpoint name, e.g. "model.layers.1.self_attn.q_a_proj.weight"
    shape: tuple[int, ...]
    kind: str  # "linear" | "float" | "bias"
    target: str  # pytree location, e.g. "layers.1.self_attn.q_a_proj"
    expert: int | None = None  # routed expert index, stacked on the target's leading axis
    optional: bool = False  # lm_head.weight when embeddings are tied

    @property
    def dtypes(self) -> frozenset[str]:
        return {"linear": LINEAR_DTYPES, "float": FLOAT_DTYPES, "bias": FLOAT_DTYPES}[self.kind]

    @property
    def scale_name(self) -> str:
        return scale_name(self.name)

    def scale_shape(self, block: tuple[int, int]) -> tuple[int, int]:
        n, k = self.shape
        return (-(-n // block[0]), -(-k // block[1]))


def scale_name(weight_name: str) -> str:
    """"x.weight" -> "x.weight_scale_inv"."""
    return weight_name[: -len("weight")] + SCALE_SUFFIX


def quant_block(cfg: ModelConfig) -> tuple[int, int]:
    return tuple(cfg.quantization.weight_block_size) if cfg.quantization else DEFAULT_BLOCK


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def mtp_layer(name: str, cfg: ModelConfig) -> int | None:
    """The layer index if `name` belongs to the MTP module (layers after num_hidden_layers), else None."""
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    i, n = int(m.group(1)), cfg.num_hidden_layers
    return i if n <= i < n + max(cfg.num_nextn_predict_layers, 1) else None


def mlp_tensors(prefix: str, target: str, hidden: int, inter: int, expert: int | None = None) -> list[TensorSpec]:
    """A SwiGLU MLP's three Linears (every family's dense MLPs, routed and shared experts)."""
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return [
        TensorSpec(f"{prefix}.{p}.weight", shapes[p], "linear", f"{target}.{p}", expert) for p in PROJS
    ]


def layer_tensors(cfg: ModelConfig, i: int) -> list[TensorSpec]:
    """The tensors of decoder layer i."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    pre, tgt = f"model.layers.{i}", f"layers.{i}"
    lin = lambda n, shape: TensorSpec(f"{pre}.{n}.weight", shape, "linear", f"{tgt}.{n}")  # noqa: E731
    norm = lambda n, d: TensorSpec(f"{pre}.{n}.weight", (d,), "float", f"{tgt}.{n}")  # noqa: E731
    out: list[TensorSpec] = [norm("input_layernorm", h), norm("post_attention_layernorm", h)]
    q_out = heads * cfg.qk_head_dim
    if cfg.q_lora_rank:
        out += [
            lin("self_attn.q_a_proj", (cfg.q_lora_rank, h)),
            norm("self_attn.q_a_layernorm", cfg.q_lora_rank),
            lin("self_attn.q_b_proj", (q_out, cfg.q_lora_rank)),
        ]
    else:
        out.append(lin("self_attn.q_proj", (q_out, h)))
    out += [
        lin("self_attn.kv_a_proj_with_mqa", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)),
        norm("self_attn.kv_a_layernorm", cfg.kv_lora_rank),
        lin("self_attn.kv_b_proj", (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)),
        lin("self_attn.o_proj", (h, heads * cfg.v_head_dim)),
    ]
    if not cfg.is_moe_layer(i):
        return out + mlp_tensors(f"{pre}.mlp", f"{tgt}.mlp", h, cfg.intermediate_size)
    e = cfg.n_routed_experts
    out += [
        TensorSpec(f"{pre}.mlp.gate.weight", (e, h), "float", f"{tgt}.mlp.gate.weight"),
        TensorSpec(f"{pre}.mlp.gate.e_score_correction_bias", (e,), "bias",
                   f"{tgt}.mlp.gate.e_score_correction_bias"),
    ]
    for x in range(e):
        out += mlp_tensors(f"{pre}.mlp.experts.{x}", f"{tgt}.mlp.experts", h, cfg.moe_intermediate_size, x)
    if cfg.n_shared_experts:
        width = cfg.n_shared_experts * cfg.moe_intermediate_size
        out += mlp_tensors(f"{pre}.mlp.shared_experts", f"{tgt}.mlp.shared_experts", h, width)
    return out


def expected_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the checkpoint (MTP module excluded), in Weights order."""
    v, h = cfg.vocab_size, cfg.hidden_size
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), "float", "embed_tokens")]
    for i in range(cfg.num_hidden_layers):
        specs += layer_tensors(cfg, i)
    specs += [
        TensorSpec("model.norm.weight", (h,), "float", "norm"),
        TensorSpec("lm_head.weight", (v, h), "linear", "lm_head", optional=cfg.tie_word_embeddings),
    ]
    return {s.name: s for s in specs}


def expert_tensors(cfg: ModelConfig, layer: int) -> dict[str, list[TensorSpec]]:
    """{proj: [spec of expert 0, 1, ...]} for the routed experts of one MoE layer."""
    return routed_expert_tensors(cfg, layer, layer_tensors)


def routed_expert_tensors(cfg: Any, layer: int, layer_tensors: Callable[[Any, int], list[TensorSpec]]
                          ) -> dict[str, list[TensorSpec]]:
    """{proj: [spec of expert 0, 1, ...]} of one MoE layer from any family's `layer_tensors`."""
    if not 0 <= layer < cfg.num_hidden_layers or not cfg.is_moe_layer(layer):
        raise ValueError(f"layer {layer} is not a MoE layer of this model")
    out: dict[str, list[TensorSpec]] = {p: [] for p in PROJS}
    for s in layer_tensors(cfg, layer):
        if s.expert is not None:
            out[s.target.rsplit(".", 1)[1]].append(s)
    return out


def assemble(cfg: ModelConfig, leaves: dict[str, Any]) -> Weights:
    """Build `Weights` from {target: leaf}; routed-expert targets hold the stacked [E, ...] weight."""

    def mlp(t: str) -> MLPWeights:
        return MLPWeights(*(leaves[f"{t}.{p}"] for p in PROJS))

    layers = []
    for i in range(cfg.num_hidden_layers):
        t = f"layers.{i}"
        attn = MLAWeights(**{
            f.name: leaves.get(f"{t}.self_attn.{f.name}") for f in dataclasses.fields(MLAWeights)
        })
        if cfg.is_moe_layer(i):
            experts = [leaves.get(f"{t}.mlp.experts.{p}") for p in PROJS]
            ffn = MoEWeights(
                gate=RouterWeights(leaves[f"{t}.mlp.gate.weight"], leaves[f"{t}.mlp.gate.e_score_correction_bias"]),
                experts=None if experts[0] is None else ExpertsWeights(*experts),
                shared_experts=mlp(f"{t}.mlp.shared_experts") if cfg.n_shared_experts else None,
            )
        else:
            ffn = mlp(f"{t}.mlp")
        layers.append(LayerWeights(leaves[f"{t}.input_layernorm"], attn, leaves[f"{t}.post_attention_layernorm"], ffn))
    return Weights(leaves["embed_tokens"], tuple(layers), leaves["norm"], leaves["lm_head"])


def lookup(weights: Weights, spec: TensorSpec) -> Any:
    """The leaf of `weights` a checkpoint tensor went to (for a routed expert, its slice)."""
    node: Any = weights
    for key in spec.target.split("."):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    if spec.expert is not None:
        node = jax.tree.map(lambda a: a[spec.expert], node)
    return node
