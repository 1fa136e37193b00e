"""Qwen3MoeConfig: the architecture of a Qwen3-MoE checkpoint (`Qwen3MoeForCausalLM`,
model_type "qwen3_moe"), read from its config.json.

Accepts both spellings found in the wild: `rope_theta` / `torch_dtype` / `num_experts` (the
published checkpoints) and transformers 5.x's `rope_parameters` / `dtype` /
`num_local_experts`. Layer i is a sparse-MoE layer iff i is not in `mlp_only_layers` and
(i + 1) % decoder_sparse_step == 0 (transformers' rule); the others run a dense MLP of
`intermediate_size`. `partial_rotary_factor` (default 1) gives rotary_dim = head_dim * factor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from jaxmoe.config import ConfigError, QuantConfig, _first, _parse_quant, named_config_path
from jaxmoe.layers.gqa import GQAConfig

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "moe_intermediate_size",
    "num_experts_per_tok",
)


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig:
    # the attention this family's layers have ("mla" | "gqa"): which planning.attention_costs prices them
    ATTENTION_KIND: ClassVar[str] = "gqa"

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    rope_theta: float
    intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    dtype: str = "bfloat16"
    quantization: QuantConfig | None = None

    # ---- derived ----------------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        """transformers' rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def n_routed_experts(self) -> int:
        """num_experts under DeepSeek-V3's name (read by the family-agnostic streaming and loading code)."""
        return self.num_experts

    @property
    def num_nextn_predict_layers(self) -> int:
        """No multi-token-prediction layers (read by the shared checkpoint accounting)."""
        return 0

    @property
    def attention(self) -> GQAConfig:
        return GQAConfig(self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.rotary_dim,
                         self.rope_theta, self.rms_norm_eps)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> Qwen3MoeConfig:
        return _parse(d, source)

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen3MoeConfig:
        """From a config.json file, or a checkpoint directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: unreadable config ({e})") from e
        return _parse(d, str(path))

    @classmethod
    def named(cls, name: str) -> Qwen3MoeConfig:
        """A packaged config (jaxmoe/configs/models/<name>.json), e.g. "qwen3-30b-a3b"."""
        path = named_config_path("models", name, "model config")
        return _parse(json.loads(path.read_text()), str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in the published checkpoints' spelling (what synthetic checkpoints write)."""
        d: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name not in ("quantization", "eos_token_id", "dtype", "mlp_only_layers"):
                d[f.name] = getattr(self, f.name)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["torch_dtype"] = self.dtype
        eos = list(self.eos_token_id)
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        if self.quantization is not None:
            q = self.quantization
            d["quantization_config"] = {"quant_method": q.quant_method, "fmt": q.fmt,
                                        "weight_block_size": list(q.weight_block_size),
                                        "activation_scheme": q.activation_scheme}
        return d

    def replace(self, **changes: Any) -> Qwen3MoeConfig:
        return dataclasses.replace(self, **changes)


def _rope_theta(d: dict[str, Any], source: str) -> float:
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    for spec in (rs, rp):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in (None, "default"):
            raise ConfigError(f"{source}: unsupported rope scaling type {kind!r} (Qwen3-MoE: default rope only)")
    theta = _first(d, "rope_theta", default=rp.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{source}: missing required key 'rope_theta' (or rope_parameters.rope_theta)")
    return float(theta)


def _parse(d: dict[str, Any], source: str) -> Qwen3MoeConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ConfigError(f"{source}: model_type {d['model_type']!r} is not {MODEL_TYPE!r}")
    missing = [k for k in _REQUIRED if k not in d]
    n_experts = _first(d, "num_experts", "num_local_experts")
    if n_experts is None:
        missing.append("num_experts")
    if missing:
        raise ConfigError(f"{source}: missing required key{'s' * (len(missing) > 1)} {missing}")
    if d.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window is unsupported")
    eos = d.get("eos_token_id")
    heads = int(d["num_attention_heads"])
    cfg = Qwen3MoeConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(d["num_key_value_heads"]),
        head_dim=int(_first(d, "head_dim", default=int(d["hidden_size"]) // heads)),
        moe_intermediate_size=int(d["moe_intermediate_size"]),
        num_experts=int(n_experts),
        num_experts_per_tok=int(d["num_experts_per_tok"]),
        rope_theta=_rope_theta(d, source),
        intermediate_size=int(d.get("intermediate_size") or 0),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        decoder_sparse_step=int(d.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()),
        partial_rotary_factor=float(d.get("partial_rotary_factor") or 1.0),
        attention_bias=bool(d.get("attention_bias", False)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=d.get("hidden_act", "silu"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
        dtype=str(_first(d, "torch_dtype", "dtype", default="bfloat16")),
        quantization=_parse_quant(d, source),
    )
    _validate(cfg, source)
    return cfg


def _validate(c: Qwen3MoeConfig, source: str) -> None:
    def bad(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    if c.hidden_act != "silu":
        bad(f"hidden_act {c.hidden_act!r} unsupported (silu only)")
    if c.num_attention_heads % c.num_key_value_heads:
        bad(f"num_attention_heads {c.num_attention_heads} not a multiple of num_key_value_heads {c.num_key_value_heads}")
    if not 1 <= c.num_experts_per_tok <= c.num_experts:
        bad(f"num_experts_per_tok {c.num_experts_per_tok} must be in [1, num_experts={c.num_experts}]")
    if c.decoder_sparse_step < 1:
        bad(f"decoder_sparse_step must be >= 1, got {c.decoder_sparse_step}")
    if not (0 < c.rotary_dim <= c.head_dim and c.rotary_dim % 2 == 0):
        bad(f"rotary dims {c.rotary_dim} (head_dim {c.head_dim} x partial_rotary_factor) must be even and > 0")
    if any(not c.is_moe_layer(i) for i in range(c.num_hidden_layers)) and c.intermediate_size <= 0:
        bad("dense (mlp_only / off-step) layers need intermediate_size > 0")
