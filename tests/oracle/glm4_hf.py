"""Hugging Face transformers as the oracle for GLM-4.5: tiny random Glm4MoeForCausalLM models.

Not a test file. As qwen3_hf.py does for Qwen3-MoE: small models in fp32 with eager attention
and experts, weights re-initialised at a scale where routing, attention and logits are far from
trivial, saved with `save_pretrained` (the checkpoint jaxmoe loads). Running them (logits, greedy
continuation through transformers' cache, captured activations) and the FP8 dequantization are
hf_models.py's own architecture-agnostic helpers.

The FP8 variant block-quantizes the Linear weights (lm_head excepted) to e4m3 with 128x128
`weight_scale_inv` blocks (partial edge blocks), writes them with jaxmoe's checkpoint writer,
and gives transformers our own dequantized copy as a plain fp32 checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import Glm4MoeConfig as HFGlm4MoeConfig
from transformers import Glm4MoeForCausalLM

from .hf_models import KEEP_FP32, Fp8Pair, _checked, capture, dequantize_tensors, greedy, logits, read_checkpoint

__all__ = ["CONFIGS", "build_model", "by_id", "capture", "edited_checkpoint", "greedy", "hf_config", "load_model", "logits",
           "save_model", "write_fp8_pair"]

# hidden 195: odd, > 128 and not a multiple of it, so every FP8 Linear has a partial edge block:
#   q_proj [240, 195] -> scales [2, 2]   k/v_proj [80, 195] -> [1, 2]   o_proj [195, 240] -> [2, 2]
#   dense mlp [264, 195] / [195, 264] -> [3, 2] / [2, 3]   experts [72, 195] / [195, 72] -> [1, 2] / [2, 1]
#   shared experts (1 x 72 or 2 x 72 wide) [72 | 144, 195] -> [1 | 2, 2]
# head_dim 40 (!= hidden / heads), partial_rotary_factor 0.5: rotary on dims [0, 20) of each head.
_COMMON: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=195,
    intermediate_size=264,
    moe_intermediate_size=72,
    num_hidden_layers=4,
    num_attention_heads=6,
    head_dim=40,
    n_routed_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    attention_bias=True,
    num_nextn_predict_layers=0,
    bos_token_id=0,
    eos_token_id=1,
)

# GLM-4.5-like: q/k RMSNorm, group-limited routing (4 groups, best 2 kept), normalised top-k scaled
# by 2.5, one shared expert, 3 query heads per kv head, two dense layers first.
GLM45 = dict(_COMMON, num_key_value_heads=2, use_qk_norm=True, n_group=4, topk_group=2, norm_topk_prob=True,
             routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=2,
             rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
             tie_word_embeddings=False)

# GLM-4.5-Air-like: no q/k norm, one expert group, un-normalised top-k scaled by 1.5, two shared
# experts, 2 query heads per kv head, one dense layer, tied embeddings, a larger rope theta.
AIR = dict(_COMMON, num_key_value_heads=3, use_qk_norm=False, n_group=1, topk_group=1, norm_topk_prob=False,
           routed_scaling_factor=1.5, n_shared_experts=2, first_k_dense_replace=1,
           rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5),
           tie_word_embeddings=True)

CONFIGS = {"glm45": GLM45, "air": AIR}


def hf_config(kwargs: dict[str, Any]) -> HFGlm4MoeConfig:
    cfg = HFGlm4MoeConfig(**kwargs)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def _randomize(model: Glm4MoeForCausalLM, seed: int) -> None:
    """hf_models._randomize's scales: Linear and router ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2)
    (q_norm / k_norm included), embeddings ~ N(0, 1), lm_head ~ N(0, 4/fan_in) (tied embeddings:
    the final norm is scaled by 2/sqrt(H) instead), attention biases ~ N(0, 0.3^2) and the
    router's `e_score_correction_bias` ~ N(0, 0.05^2) (it changes some choices, not all)."""
    g = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings

    def randn(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name == "model.norm.weight" and tied:  # the final norm takes lm_head's scale
                p.copy_((1.0 + randn(p.shape, 0.1)) * 2.0 / math.sqrt(p.shape[-1]))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + randn(p.shape, 0.1))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(randn(p.shape, 1.0))
            elif name.endswith("lm_head.weight"):
                p.copy_(randn(p.shape, 2.0 / math.sqrt(p.shape[-1])))
            elif name.endswith("_proj.bias"):
                p.copy_(randn(p.shape, 0.3))
            elif p.ndim in (2, 3):  # Linears, the router [E, H], experts' gate_up_proj / down_proj [E, out, in]
                p.copy_(randn(p.shape, 1.0 / math.sqrt(p.shape[-1])))
            else:
                raise AssertionError(f"no init rule for parameter {name} {tuple(p.shape)}")
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(randn(b.shape, 0.05))


def build_model(kwargs: dict[str, Any], seed: int) -> Glm4MoeForCausalLM:
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(hf_config(kwargs)).to(torch.float32).eval()
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    _randomize(model, seed)
    return _checked(model)


def save_model(model: Glm4MoeForCausalLM, path: Path) -> Path:
    model.save_pretrained(path)
    return Path(path)


def load_model(path: Path) -> Glm4MoeForCausalLM:
    """A saved (non-FP8) checkpoint back into transformers, fp32, eager attention and experts."""
    model = Glm4MoeForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    return _checked(model.eval())


def write_fp8_pair(src_dir: Path, fp8_dir: Path, ref_dir: Path) -> Fp8Pair:
    """From a transformers checkpoint: an FP8 block-quantized copy (written by jaxmoe's checkpoint
    writer; embeddings, norms, biases and router bf16, e_score_correction_bias fp32, lm_head bf16,
    `quantization_config` in config.json), and the fp32 checkpoint of its dequantized weights."""
    from jaxmoe.loading.synthetic import write_checkpoint
    from jaxmoe.models.glm4_moe import Glm4MoeConfig
    from jaxmoe.models.glm4_moe.hf_map import quantize_linears

    config = json.loads((Path(src_dir) / "config.json").read_text())
    cfg = Glm4MoeConfig.from_dict(config)
    tensors = {k: np.asarray(v, np.float32) for k, v in read_checkpoint(src_dir).items()}
    quantized = quantize_linears(cfg, tensors)
    quantized = {
        k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 and not k.endswith(KEEP_FP32) else v
        for k, v in quantized.items()
    }
    config = dict(config, dtype="bfloat16", quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
    write_checkpoint(fp8_dir, config, quantized)

    ref_dir = Path(ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    save_file(dequantize_tensors(quantized), str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(Path(src_dir) / "config.json", ref_dir / "config.json")
    return Fp8Pair(Path(fp8_dir), ref_dir, quantized)


def by_id(ids, weights):
    """Each row's (ids, weights) sorted by id: transformers' top-k is unsorted."""
    ids, weights = np.asarray(ids), np.asarray(weights)
    order = np.argsort(ids, -1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


def edited_checkpoint(src: Path, dst: Path, edit, config_changes: dict | None = None) -> Path:
    """A copy of checkpoint `src` at `dst`: its tensors changed by `edit(dict)` in place, config.json updated."""
    dst.mkdir()
    t = dict(read_checkpoint(src))
    edit(t)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(config, **(config_changes or {}))))
    return dst
