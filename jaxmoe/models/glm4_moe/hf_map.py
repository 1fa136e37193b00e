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
import logging
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ConfigError
from jaxmoe.layers.gqa import GQAWeights
from jaxmoe.loading.hf_map import PROJS, TensorSpec, mtp_layer, quant_block
from jaxmoe.loading.loader import Checkpoint, _linear, _stack, host_copy
from jaxmoe.loading.safetensors_index import CheckpointError, SafetensorsCheckpoint
from jaxmoe.model.weights import ExpertsWeights, MLPWeights, MoEWeights, RouterWeights
from jaxmoe.models.glm4_moe.config import Glm4MoeConfig
from jaxmoe.models.glm4_moe.weights import Glm4MoeLayerWeights, Glm4MoeWeights
from jaxmoe.quant import DenseWeight, quantize_fp8_blocks

log = logging.getLogger("jaxmoe.loading")


def _mlp(prefix: str, target: str, hidden: int, inter: int, expert: int | None = None) -> list[TensorSpec]:
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return [TensorSpec(f"{prefix}.{p}.weight", shapes[p], "linear", f"{target}.{p}", expert) for p in PROJS]


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
        return out + _mlp(f"{pre}.mlp", f"{tgt}.mlp", h, cfg.intermediate_size)
    e = cfg.n_routed_experts
    out += [TensorSpec(f"{pre}.mlp.gate.weight", (e, h), "float", f"{tgt}.mlp.gate.weight"),
            vec("mlp.gate.e_score_correction_bias", "mlp.gate.e_score_correction_bias", e, "bias")]
    for x in range(e):
        out += _mlp(f"{pre}.mlp.experts.{x}", f"{tgt}.mlp.experts", h, cfg.moe_intermediate_size, x)
    if cfg.n_shared_experts:
        width = cfg.n_shared_experts * cfg.moe_intermediate_size
        out += _mlp(f"{pre}.mlp.shared_experts", f"{tgt}.mlp.shared_experts", h, width)
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
    if not 0 <= layer < cfg.num_hidden_layers or not cfg.is_moe_layer(layer):
        raise ValueError(f"layer {layer} is not a MoE layer of this model")
    out: dict[str, list[TensorSpec]] = {p: [] for p in PROJS}
    for s in layer_tensors(cfg, layer):
        if s.expert is not None:
            out[s.target.rsplit(".", 1)[1]].append(s)
    return out


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
    specs = expected_tensors(cfg)
    out: dict[str, np.ndarray] = {}
    for name, a in tensors.items():
        spec = specs.get(name)
        if spec is None or spec.kind != "linear" or spec.target == "lm_head":
            out[name] = a
            continue
        out[name], out[spec.scale_name] = quantize_fp8_blocks(np.asarray(a, np.float32), block)
    return out


class Glm4MoeCheckpoint(Checkpoint):
    """An opened, fully accounted GLM-4.5 checkpoint (jaxmoe.loading.loader.Checkpoint's
    accounting and access, with this family's config and tensor map); `skipped` lists the MTP
    module's tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.cfg = Glm4MoeConfig.from_file(self.path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        self.specs = expected_tensors(self.cfg)
        self.int4_group = None
        self.block = quant_block(self.cfg)
        self.store = SafetensorsCheckpoint(self.path)
        try:
            self.skipped = self._account()  # names of layers L .. L + max(nextn, 1) - 1
            if self.skipped and not self.cfg.num_nextn_predict_layers:
                raise CheckpointError.collect(f"checkpoint {self.path}",
                                              {"unexpected (num_nextn_predict_layers is 0)": [repr(n) for n in self.skipped]})
        except BaseException:
            self.close()
            raise
        if self.skipped:
            layers = sorted({mtp_layer(n, self.cfg) for n in self.skipped})
            log.info("%s: skipping %d tensors of the MTP module (layers %s)", self.path, len(self.skipped), layers)

    def expert_arrays(self, layer: int) -> dict[str, list[np.ndarray]]:
        """Zero-copy views of one MoE layer's routed experts (and "<proj>_scale_inv" when FP8)."""
        out: dict[str, list[np.ndarray]] = {}
        for proj, specs in expert_tensors(self.cfg, layer).items():
            out[proj] = [self.array(s.name) for s in specs]
            if self.is_fp8(specs[0].name):
                out[f"{proj}_scale_inv"] = [self.array(s.scale_name) for s in specs]
        return out


def load_checkpoint(path: str | Path | Glm4MoeCheckpoint, *, dtype: Any = jnp.float32, device: jax.Device | None = None,
                    load_experts: bool = True) -> tuple[Glm4MoeConfig, Glm4MoeWeights]:
    """Read config.json and every tensor into `(Glm4MoeConfig, Glm4MoeWeights)` (raises CheckpointError).

    dtype: for norms, embeddings, the router weight and attention biases (Linears keep their
    format; e_score_correction_bias is float32).
    path: a directory, or an open Glm4MoeCheckpoint (left open).
    load_experts: False leaves the sparse layers' `experts` None.
    """
    own = not isinstance(path, Glm4MoeCheckpoint)
    ck = Glm4MoeCheckpoint(path) if own else path
    try:
        weights = _build(ck, np.dtype(dtype), device, load_experts)
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # drop views held by the failed frames, so unmapping works
        if own:
            ck.close()
        raise
    if own:
        ck.close()
    return ck.cfg, weights


def _build(ck: Glm4MoeCheckpoint, dtype: np.dtype, device, load_experts: bool) -> Glm4MoeWeights:
    def put(a: np.ndarray, dt=None) -> jax.Array:
        return jax.device_put(host_copy(a, dt), device)

    leaves: dict[str, Any] = {}
    pending: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = defaultdict(list)
    for s in ck.specs.values():
        if s.name not in ck.store or not (load_experts or s.expert is None):
            continue
        w = ck.array(s.name)
        fp8 = s.kind == "linear" and ck.is_fp8(s.name)
        scale = ck.array(s.scale_name).astype(np.float32) if fp8 else None
        if s.expert is not None:
            pending[s.target].append((w, scale))
            if len(pending[s.target]) == ck.cfg.n_routed_experts:
                ws, ss = zip(*pending.pop(s.target))
                leaves[s.target] = _linear(_stack(ws), None if ss[0] is None else np.stack(ss), ck.block, put)
        elif s.kind == "linear":
            leaves[s.target] = _linear(w, scale, ck.block, put)
        else:
            leaves[s.target] = put(w, np.float32 if s.kind == "bias" else dtype)
    if "lm_head" not in leaves:  # tied embeddings
        leaves["lm_head"] = DenseWeight(leaves["embed_tokens"])
    return assemble(ck.cfg, leaves)
