"""Hugging Face transformers as the oracle: tiny random DeepseekV3ForCausalLM models on the CPU.

Not a test file. It builds small DeepSeek-V3-shaped models in fp32 with eager attention,
re-initialises their weights at a scale where routing, attention and logits are far from
trivial (transformers' own init, std 0.02, leaves every activation near zero), saves them with
`save_pretrained` (the checkpoint jaxmoe then loads), and runs them: logits for token ids and
greedy continuations through transformers' own KV cache.

The FP8 variant takes such a checkpoint, block-quantizes its Linear weights to e4m3 in
DeepSeek's on-disk layout (`weight_scale_inv` per 128x128 block, partial edge blocks) with
jaxmoe's synthetic-checkpoint writer, and gives transformers *our own* dequantized copy of
exactly those weights as a plain fp32 checkpoint -- never transformers' FP8 loader, which
mis-scales dimensions that are not multiples of 128.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from jaxmoe.quant import dequantize_fp8_blocks

# ---- configs -------------------------------------------------------------------------------

# Every dimension that FP8 block-quantization touches is either < 128 (one partial block) or
# > 128 and not a multiple of 128 (a full block plus a partial edge block):
#   q_a_proj [136, 200] -> scales [2, 2]     kv_a_proj_with_mqa [176, 200] -> [2, 2]
#   q_b_proj [192, 136] -> [2, 2]            kv_b_proj [224, 160] -> [2, 2]
#   o_proj   [200, 96]  -> [2, 1]            dense mlp [264, 200] / [200, 264] -> [3, 2] / [2, 3]
#   experts  [72, 200] / [200, 72] -> [1, 2] / [2, 1]
_COMMON: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=200,
    intermediate_size=264,
    moe_intermediate_size=72,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,  # HF's default (128) would break its own repeat_kv; MLA has kv heads == heads
    kv_lora_rank=160,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=24,  # != qk_nope_head_dim, so a swapped split of kv_b_proj cannot go unnoticed
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    num_mtp_layers=0,
    bos_token_id=0,
    eos_token_id=1,
)

# DeepSeek-V3-like: q_lora, one shared expert, normalised top-k, YaRN with mscale != mscale_all_dim
# (so both the cos/sin attention factor and the softmax-scale mscale^2 are != 1).
QLORA = dict(
    _COMMON,
    q_lora_rank=136,
    n_shared_experts=1,
    norm_topk_prob=True,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=128,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=0.8,
    ),
)

# V2-Lite-like: no q_lora (q_proj straight from the hidden state), two shared experts,
# un-normalised top-k weights, a different YaRN setting, and the rope dims laid out in halves
# (x_i, x_{i+d/2}) instead of DeepSeek's interleaved pairs.
NO_QLORA = dict(
    _COMMON,
    q_lora_rank=None,
    rope_interleave=False,
    n_shared_experts=2,
    norm_topk_prob=False,
    routed_scaling_factor=1.5,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=5000.0,
        factor=8.0,
        original_max_position_embeddings=64,
        beta_fast=32,
        beta_slow=1,
        mscale=0.707,
        mscale_all_dim=0.707,
    ),
)

CONFIGS = {"qlora": QLORA, "no_qlora": NO_QLORA}


def hf_config(kwargs: dict[str, Any]) -> DeepseekV3Config:
    cfg = DeepseekV3Config(**kwargs)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


# ---- building ------------------------------------------------------------------------------


def _randomize(model: DeepseekV3ForCausalLM, seed: int) -> None:
    """Weights at a scale where every block matters: Linear ~ N(0, 1/fan_in) keeps activations
    O(1) through the layers, norms ~ 1 + N(0, 0.1^2), embeddings ~ N(0, 1), the router's
    `e_score_correction_bias` ~ N(0, 0.05^2) (comparable to the spread of sigmoid scores, so it
    changes some choices without deciding all of them)."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + randn(p.shape, 0.1))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(randn(p.shape, 1.0))
            elif name.endswith("experts.gate_up_proj"):  # [E, 2I, H]
                p.copy_(randn(p.shape, 1.0 / math.sqrt(p.shape[-1])))
            elif name.endswith("experts.down_proj"):  # [E, H, I]
                p.copy_(randn(p.shape, 1.0 / math.sqrt(p.shape[-1])))
            elif name.endswith("lm_head.weight"):
                p.copy_(randn(p.shape, 2.0 / math.sqrt(p.shape[-1])))
            elif p.ndim == 2:  # every other Linear, and the router [E, H]
                p.copy_(randn(p.shape, 1.0 / math.sqrt(p.shape[-1])))
            else:
                raise AssertionError(f"no init rule for parameter {name} {tuple(p.shape)}")
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(randn(b.shape, 0.05))


def build_model(kwargs: dict[str, Any], seed: int) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config(kwargs)).to(torch.float32).eval()
    _randomize(model, seed)
    return _checked(model)


def _checked(model: DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM:
    """The oracle runs the plain reference paths in fp32, never a fused or quantized kernel."""
    cfg = model.config
    assert cfg._attn_implementation == "eager", cfg._attn_implementation
    assert cfg._experts_implementation == "eager", cfg._experts_implementation
    assert getattr(cfg, "quantization_config", None) is None
    dtypes = {t.dtype for t in model.state_dict().values()}
    assert dtypes == {torch.float32}, dtypes
    return model


def save_model(model: DeepseekV3ForCausalLM, path: Path) -> Path:
    model.save_pretrained(path)
    return Path(path)


def load_model(path: Path) -> DeepseekV3ForCausalLM:
    """A saved (non-FP8) checkpoint back into transformers, fp32, eager attention and experts."""
    model = DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    return _checked(model.eval())


# ---- running -------------------------------------------------------------------------------


@torch.no_grad()
def logits(model: DeepseekV3ForCausalLM, ids: np.ndarray) -> np.ndarray:
    """Full-sequence forward: ids [B, T] -> logits [B, T, V] float32 (positions 0..T-1)."""
    out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


@torch.no_grad()
def greedy(model: DeepseekV3ForCausalLM, ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy continuation through transformers' own KV cache (no EOS stop).

    Returns (tokens [B, n], step_logits [B, n, V]): step_logits[:, i] are the logits the i-th
    new token was chosen from (the prompt's last position for i = 0, then one cached decode step
    per token)."""
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    out = model(input_ids=ids_t, use_cache=True)
    past = out.past_key_values
    step_logits = [out.logits[:, -1].float()]
    tokens = [step_logits[-1].argmax(-1)]
    for _ in range(n - 1):
        out = model(input_ids=tokens[-1][:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
        step_logits.append(out.logits[:, -1].float())
        tokens.append(step_logits[-1].argmax(-1))
    return torch.stack(tokens, 1).numpy(), torch.stack(step_logits, 1).numpy()


@torch.no_grad()
def capture(model: DeepseekV3ForCausalLM, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Intermediate activations of a forward over ids [B, T] (fp32 numpy), for block-level tests.

    Per decoder layer i: 'hidden.{i}' the residual stream entering it ('hidden.{L}' enters the
    final norm), 'attn_in.{i}' / 'attn_out.{i}' around self_attn (after input_layernorm, before
    the residual add), 'mlp_in.{i}' / 'mlp_out.{i}' around the dense MLP or MoE block, and for
    MoE layers 'router_in.{i}' [B*T, H] what the router saw."""
    seen: dict[str, np.ndarray] = {}
    hooks = []

    def keep(key, t):
        seen[key] = t.detach().float().numpy().copy()

    def pre(key):
        return lambda m, a, kw: keep(key, a[0] if a else kw["hidden_states"])

    def post(key):
        return lambda m, a, kw, out: keep(key, out[0] if isinstance(out, tuple) else out)

    layers = model.model.layers
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(pre(f"hidden.{i}"), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_pre_hook(pre(f"attn_in.{i}"), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(post(f"attn_out.{i}"), with_kwargs=True))
        hooks.append(layer.mlp.register_forward_pre_hook(pre(f"mlp_in.{i}"), with_kwargs=True))
        hooks.append(layer.mlp.register_forward_hook(post(f"mlp_out.{i}"), with_kwargs=True))
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.gate.register_forward_pre_hook(
                lambda m, a, kw, i=i: keep(f"router_in.{i}", a[0].reshape(-1, a[0].shape[-1])), with_kwargs=True))
    hooks.append(model.model.norm.register_forward_pre_hook(pre(f"hidden.{len(layers)}"), with_kwargs=True))
    try:
        model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---- FP8 ------------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a (non-FP8) safetensors checkpoint directory, one file or sharded."""
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def dequantize_tensors(q: dict[str, np.ndarray], block: tuple[int, int] = (128, 128)) -> dict[str, np.ndarray]:
    """Our own dequantization of an FP8 tensor dict: w = e4m3 * scale_inv per block (partial edge
    blocks included); every other tensor is passed through as float32."""
    out: dict[str, np.ndarray] = {}
    for name, t in q.items():
        if name.endswith(".weight_scale_inv"):
            continue
        s = q.get(name + "_scale_inv")
        out[name] = dequantize_fp8_blocks(t, s, block) if s is not None else np.asarray(t, np.float32)
    return out


KEEP_FP32 = ("weight_scale_inv", "e_score_correction_bias")


@dataclasses.dataclass
class Fp8Pair:
    fp8_dir: Path  # what jaxmoe reads: e4m3 Linear weights + fp32 weight_scale_inv, quantization_config
    ref_dir: Path  # what transformers reads: our dequantized copy, plain fp32
    quantized: dict[str, np.ndarray]  # the tensors written to fp8_dir


def write_fp8_pair(src_dir: Path, fp8_dir: Path, ref_dir: Path) -> Fp8Pair:
    """From a transformers checkpoint: an FP8 block-quantized copy in DeepSeek's layout (written by
    jaxmoe's synthetic-checkpoint writer), and the fp32 checkpoint of its dequantized weights."""
    from jaxmoe.config import ModelConfig, QuantConfig
    from jaxmoe.loading.synthetic import quantize_linears, write_checkpoint

    cfg = ModelConfig.from_file(src_dir).replace(quantization=QuantConfig(), dtype="bfloat16")
    tensors = {k: np.asarray(v, np.float32) for k, v in read_checkpoint(src_dir).items()}
    quantized = quantize_linears(tensors, cfg)
    # As in DeepSeek's checkpoints: embeddings, norms, router and lm_head bf16, the bias fp32.
    quantized = {
        k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 and not k.endswith(KEEP_FP32) else v
        for k, v in quantized.items()
    }
    write_checkpoint(fp8_dir, cfg, quantized)

    ref_dir = Path(ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    save_file(dequantize_tensors(quantized), str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(Path(src_dir) / "config.json", ref_dir / "config.json")
    return Fp8Pair(Path(fp8_dir), ref_dir, quantized)
