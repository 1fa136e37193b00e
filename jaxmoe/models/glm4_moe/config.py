"""Glm4MoeConfig: the architecture of a GLM-4.5 checkpoint (`Glm4MoeForCausalLM`, model_type
"glm4_moe"; GLM-4.5, GLM-4.5-Air, GLM-4.6), read from its config.json.

Accepts both spellings found in the wild: the published checkpoints' top-level `rope_theta`,
`partial_rotary_factor`, `torch_dtype`, `n_routed_experts`, `num_nextn_predict_layers` and
transformers 5.x's `rope_parameters` (holding rope_theta and partial_rotary_factor), `dtype`,
`num_local_experts`, `num_mtp_layers`. `partial_rotary_factor` defaults to 0.5 (transformers'
default for this family): rotary on the first head_dim * factor dims of each head.

Layer i is a sparse-MoE layer iff i >= first_k_dense_replace (transformers' rule); the first
layers run a dense MLP of `intermediate_size`. The router fields carry DeepSeek-V3's names
(n_routed_experts, n_group, topk_group, num_experts_per_tok, norm_topk_prob,
routed_scaling_factor): `jaxmoe.model.router.route` reads exactly these from the config it is given.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from jaxmoe.config import ConfigError, QuantConfig, _first, _parse_quant, named_config_path
from jaxmoe.layers.gqa import GQAConfig

MODEL_TYPE = "glm4_moe"
ARCHITECTURE = "Glm4MoeForCausalLM"
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
class Glm4MoeConfig:
    # the attention this family's layers have ("mla" | "gqa"): which planning.attention_costs prices them
    ATTENTION_KIND: ClassVar[str] = "gqa"

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    rope_theta: float
    intermediate_size: int = 0
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    partial_rotary_factor: float = 0.5
    attention_bias: bool = False
    use_qk_norm: bool = False
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 0  # MTP layers after the last decoder layer: skipped by the loader
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "bfloat16"
    quantization: QuantConfig | None = None

    # ---- derived ----------------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        """transformers' rule: the first `first_k_dense_replace` layers are dense, the rest sparse."""
        return i >= self.first_k_dense_replace

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention(self) -> GQAConfig:
        """Rotary on the first rotary_dim dims, pairs (x_i, x_{i+rotary_dim/2}) (transformers' rotate_half)."""
        return GQAConfig(self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.rotary_dim,
                         self.rope_theta, self.rms_norm_eps)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> Glm4MoeConfig:
        return _parse(d, source)

    @classmethod
    def from_file(cls, path: str | Path) -> Glm4MoeConfig:
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
    def named(cls, name: str) -> Glm4MoeConfig:
        """A packaged config (jaxmoe/configs/models/<name>.json), e.g. "glm-4.5-air"."""
        path = named_config_path("models", name, "model config")
        return _parse(json.loads(path.read_text()), str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in the published checkpoints' spelling (what synthetic checkpoints write)."""
        d: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name not in ("quantization", "eos_token_id", "dtype"):
                d[f.name] = getattr(self, f.name)
        d["rope_scaling"] = None
        d["torch_dtype"] = self.dtype
        eos = list(self.eos_token_id)
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        if self.quantization is not None:
            q = self.quantization
            d["quantization_config"] = {"quant_method": q.quant_method, "fmt": q.fmt,
                                        "weight_block_size": list(q.weight_block_size),
                                        "activation_scheme": q.activation_scheme}
        return d

    def replace(self, **changes: Any) -> Glm4MoeConfig:
        return dataclasses.replace(self, **changes)


def _rope(d: dict[str, Any], source: str) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from either spelling; only default (unscaled) rope."""
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    for spec in (rs, rp):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in (None, "default"):
            raise ConfigError(f"{source}: unsupported rope scaling type {kind!r} (GLM-4.5: default rope only)")
    theta = _first(d, "rope_theta", default=rp.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{source}: missing required key 'rope_theta' (or rope_parameters.rope_theta)")
    factor = _first(d, "partial_rotary_factor", default=rp.get("partial_rotary_factor", 0.5))
    return float(theta), float(factor)


def _parse(d: dict[str, Any], source: str) -> Glm4MoeConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ConfigError(f"{source}: model_type {d['model_type']!r} is not {MODEL_TYPE!r}")
    missing = [k for k in _REQUIRED if k not in d]
    n_experts = _first(d, "n_routed_experts", "num_local_experts")
    if n_experts is None:
        missing.append("n_routed_experts")
    if missing:
        raise ConfigError(f"{source}: missing required key{'s' * (len(missing) > 1)} {missing}")
    theta, factor = _rope(d, source)
    eos = d.get("eos_token_id")
    heads = int(d["num_attention_heads"])
    cfg = Glm4MoeConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(d["num_key_value_heads"]),
        head_dim=int(_first(d, "head_dim", default=int(d["hidden_size"]) // heads)),
        moe_intermediate_size=int(d["moe_intermediate_size"]),
        n_routed_experts=int(n_experts),
        num_experts_per_tok=int(d["num_experts_per_tok"]),
        rope_theta=theta,
        intermediate_size=int(d.get("intermediate_size") or 0),
        n_shared_experts=int(_first(d, "n_shared_experts", default=1)),
        first_k_dense_replace=int(_first(d, "first_k_dense_replace", default=1)),
        n_group=int(_first(d, "n_group", default=1)),
        topk_group=int(_first(d, "topk_group", default=1)),
        routed_scaling_factor=float(_first(d, "routed_scaling_factor", default=1.0)),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        partial_rotary_factor=factor,
        attention_bias=bool(d.get("attention_bias", False)),
        use_qk_norm=bool(d.get("use_qk_norm", False)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=d.get("hidden_act", "silu"),
        num_nextn_predict_layers=int(_first(d, "num_nextn_predict_layers", "num_mtp_layers", default=0)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
        pad_token_id=d.get("pad_token_id"),
        dtype=str(_first(d, "torch_dtype", "dtype", default="bfloat16")),
        quantization=_parse_quant(d, source),
    )
    _validate(cfg, source)
    return cfg


def _validate(c: Glm4MoeConfig, source: str) -> None:
    def bad(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    if c.hidden_act != "silu":
        bad(f"hidden_act {c.hidden_act!r} unsupported (silu only)")
    if c.num_attention_heads % c.num_key_value_heads:
        bad(f"num_attention_heads {c.num_attention_heads} not a multiple of num_key_value_heads {c.num_key_value_heads}")
    if not (0 < c.rotary_dim <= c.head_dim and c.rotary_dim % 2 == 0):
        bad(f"rotary dims {c.rotary_dim} (head_dim {c.head_dim} x partial_rotary_factor) must be even and > 0")
    if c.n_group < 1 or c.n_routed_experts % c.n_group:
        bad(f"n_routed_experts {c.n_routed_experts} not divisible into n_group {c.n_group} groups")
    per_group = c.n_routed_experts // c.n_group
    if c.n_group > 1 and per_group < 2:
        bad(f"group-limited routing needs >= 2 experts per group, got {per_group}")
    if not 1 <= c.topk_group <= c.n_group:
        bad(f"topk_group {c.topk_group} must be in [1, n_group={c.n_group}]")
    if not 1 <= c.num_experts_per_tok <= c.topk_group * per_group:
        bad(f"num_experts_per_tok {c.num_experts_per_tok} must be in [1, topk_group x experts per group = "
            f"{c.topk_group * per_group}]")
    if c.n_shared_experts < 0 or c.num_nextn_predict_layers < 0 or c.first_k_dense_replace < 0:
        bad("n_shared_experts, num_nextn_predict_layers and first_k_dense_replace must be >= 0")
    if c.first_k_dense_replace > 0 and c.intermediate_size <= 0:
        bad("dense layers (first_k_dense_replace > 0) need intermediate_size > 0")
