"""ModelConfig: the architecture of a DeepSeek-V3-family checkpoint, read from its config.json.

Accepts both spellings found in the wild: the original (`rope_scaling`, `rope_theta`,
`torch_dtype`) and transformers 5.x (`rope_parameters`, `dtype`), and the three names of the
routed-expert count (`n_routed_experts`, `num_local_experts`, `num_experts`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

# The configs shipped with the package (jaxmoe/configs/{models,runtime,hardware}/*.json, package
# data), where they are on the file system; `named_config_path` reads them through
# importlib.resources.
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config.json that is missing, unreadable or describes an unsupported model."""


# what a DeepSeek-V3-family config.json says it is (Kimi-K2: model_type "kimi_k2", DeepSeek-V3's architecture);
# a config naming neither is taken as DeepSeek-V3 (the configs jaxmoe wrote before other families)
DEEPSEEK_V3_MODEL_TYPES = ("deepseek_v3", "kimi_k2")
DEEPSEEK_V3_ARCHITECTURES = ("DeepseekV3ForCausalLM",)


def cache_dir() -> Path:
    """jaxmoe's per-user cache: $JAXMOE_CACHE_DIR, else ~/.cache/jaxmoe (measured calibrations,
    native libraries rebuilt outside a read-only install, benchmark checkpoints)."""
    env = os.environ.get("JAXMOE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxmoe"


def _packaged(kind: str):
    return importlib.resources.files("jaxmoe").joinpath("configs").joinpath(kind)


def known_config_names(kind: str) -> list[str]:
    """The names of the packaged configs of one kind ("models", "runtime", "hardware")."""
    folder = _packaged(kind)
    if not folder.is_dir():
        return []
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def named_config_path(kind: str, name: str | Path, what: str) -> Path:
    """A packaged config (jaxmoe/configs/<kind>/<name>.json) for a bare name (one path component
    without ".json"), else `name` as a path; a ConfigError listing the known names when it does
    not exist."""
    s = str(name)
    if Path(s).name == s and not s.endswith(".json") and s not in ("", ".", ".."):
        res = _packaged(kind).joinpath(f"{s}.json")
        path = res if isinstance(res, Path) and res.is_file() else None  # installed on the file system, not zipped
    else:
        path = Path(name).expanduser()
        path = path if path.is_file() else None
    if path is None:
        raise ConfigError(f"unknown {what} {s!r}; known: {known_config_names(kind)}")
    return path


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (`rope_scaling` / `rope_parameters` of type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """`quantization_config` of an FP8 checkpoint."""

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # the attention this family's layers have ("mla" | "gqa"): which planning.attention_costs prices them
    ATTENTION_KIND: ClassVar[str] = "mla"

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    dtype: str = "bfloat16"
    quantization: QuantConfig | None = None
    num_nextn_predict_layers: int = 0

    # ---- derived sizes -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    # ---- I/O -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> ModelConfig:
        return _parse(d, source)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"missing config: {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        return _parse(d, str(path))

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        """One of the configs shipped in jaxmoe/configs/models/ (e.g. "tiny", "bench-v3-mid", "deepseek-v3"),
        or a config.json path."""
        return cls.from_file(named_config_path("models", name, "model config"))

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in the original DeepSeek-V3 spelling (what synthetic checkpoints write)."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
        }
        for f in dataclasses.fields(self):
            if f.name in ("rope_scaling", "quantization", "eos_token_id", "dtype"):
                continue
            d[f.name] = getattr(self, f.name)
        d["num_key_value_heads"] = self.num_attention_heads
        d["torch_dtype"] = self.dtype
        eos = list(self.eos_token_id)
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        if self.rope_scaling is not None:
            rs = dataclasses.asdict(self.rope_scaling)
            rs = {k: v for k, v in rs.items() if v is not None}
            rs["type"] = "yarn"
            d["rope_scaling"] = rs
        if self.quantization is not None:
            q = self.quantization
            d["quantization_config"] = {
                "quant_method": q.quant_method,
                "fmt": q.fmt,
                "weight_block_size": list(q.weight_block_size),
                "activation_scheme": q.activation_scheme,
            }
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
)


def _first(d: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def _parse_rope(d: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    theta = _first(d, "rope_theta", default=None)
    if theta is None:
        theta = rp.get("rope_theta", 10000.0)
    spec = rs or rp
    kind = spec.get("rope_type", spec.get("type", "default")) if spec else "default"
    if kind in (None, "default"):
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(f"{source}: unsupported rope scaling type {kind!r} (jaxmoe implements yarn)")
    if "original_max_position_embeddings" not in spec:
        raise ConfigError(f"{source}: yarn rope scaling needs original_max_position_embeddings")
    orig = int(spec["original_max_position_embeddings"])
    factor = spec.get("factor")
    if factor is None:
        factor = d.get("max_position_embeddings", orig) / orig
    return float(theta), RopeScaling(
        factor=float(factor),
        original_max_position_embeddings=orig,
        beta_fast=float(spec.get("beta_fast") or 32),
        beta_slow=float(spec.get("beta_slow") or 1),
        mscale=spec.get("mscale"),
        mscale_all_dim=spec.get("mscale_all_dim"),
        attention_factor=spec.get("attention_factor"),
        truncate=bool(spec.get("truncate", True)),
    )


def _parse_quant(d: dict[str, Any], source: str) -> QuantConfig | None:
    q = d.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "fp8")
    fmt = q.get("fmt", "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise ConfigError(f"{source}: unsupported quantization {method}/{fmt} (jaxmoe reads fp8 e4m3)")
    block = tuple(int(b) for b in q.get("weight_block_size", (128, 128)))
    if len(block) != 2:
        raise ConfigError(f"{source}: weight_block_size must have two entries, got {block}")
    return QuantConfig(method, fmt, block, q.get("activation_scheme", "dynamic"))


def _parse(d: dict[str, Any], source: str) -> ModelConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type, archs = d.get("model_type"), list(d.get("architectures") or ())
    if (model_type not in (None, *DEEPSEEK_V3_MODEL_TYPES)
            or (model_type is None and archs and not set(archs) & set(DEEPSEEK_V3_ARCHITECTURES))):
        raise ConfigError(f"{source}: model_type {model_type!r} (architectures {archs}) is not of the DeepSeek-V3 family "
                          f"{list(DEEPSEEK_V3_MODEL_TYPES)}; jaxmoe.load reads other families (jaxmoe.models.registry)")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"{source}: missing required keys {missing}")
    n_experts = _first(d, "n_routed_experts", "num_local_experts", "num_experts", default=0)
    if not n_experts:
        raise ConfigError(f"{source}: no routed experts (n_routed_experts / num_local_experts / num_experts)")
    theta, rope_scaling = _parse_rope(d, source)
    eos = d.get("eos_token_id")
    eos_t = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    scoring = d.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ConfigError(f"{source}: scoring_func {scoring!r} unsupported (DeepSeek-V3 routing is sigmoid)")
    cfg = ModelConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d.get("intermediate_size", 0)),
        moe_intermediate_size=int(d.get("moe_intermediate_size", d.get("intermediate_size", 0))),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=int(d["num_attention_heads"]),
        n_routed_experts=int(n_experts),
        num_experts_per_tok=int(d.get("num_experts_per_tok", 1)),
        n_shared_experts=int(d.get("n_shared_experts") or 0),
        kv_lora_rank=int(d["kv_lora_rank"]),
        q_lora_rank=None if d.get("q_lora_rank") in (None, 0) else int(d["q_lora_rank"]),
        qk_rope_head_dim=int(d["qk_rope_head_dim"]),
        qk_nope_head_dim=int(d["qk_nope_head_dim"]),
        v_head_dim=int(d["v_head_dim"]),
        n_group=int(d.get("n_group") or 1),
        topk_group=int(d.get("topk_group") or 1),
        first_k_dense_replace=int(d.get("first_k_dense_replace", 0)),
        moe_layer_freq=int(d.get("moe_layer_freq", 1)),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        scoring_func=scoring,
        topk_method=d.get("topk_method", "noaux_tc"),
        hidden_act=d.get("hidden_act", "silu"),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        rope_interleave=bool(d.get("rope_interleave", True)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos_t,
        dtype=str(_first(d, "torch_dtype", "dtype", default="bfloat16")),
        quantization=_parse_quant(d, source),
        num_nextn_predict_layers=int(d.get("num_nextn_predict_layers", 0)),
    )
    _validate(cfg, source)
    return cfg


def _validate(c: ModelConfig, source: str) -> None:
    def bad(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    if c.hidden_act != "silu":
        bad(f"hidden_act {c.hidden_act!r} unsupported (silu only)")
    if c.n_routed_experts % c.n_group:
        bad(f"n_routed_experts {c.n_routed_experts} not divisible by n_group {c.n_group}")
    if not 1 <= c.topk_group <= c.n_group:
        bad(f"topk_group {c.topk_group} must be in [1, n_group={c.n_group}]")
    if not 1 <= c.num_experts_per_tok <= c.n_routed_experts:
        bad(f"num_experts_per_tok {c.num_experts_per_tok} must be in [1, n_routed_experts]")
    per_group = c.n_routed_experts // c.n_group
    if c.n_group > 1 and per_group < 2:
        bad("group-limited routing needs at least 2 experts per group")
    if c.topk_group * per_group < c.num_experts_per_tok:
        bad("topk_group groups hold fewer experts than num_experts_per_tok")
    if c.bos_token_id is not None and not isinstance(c.bos_token_id, int):
        bad(f"bos_token_id must be an integer, got {c.bos_token_id!r}")
    if c.qk_rope_head_dim % 2:
        bad(f"qk_rope_head_dim {c.qk_rope_head_dim} must be even")
    if c.first_k_dense_replace > 0 and c.intermediate_size <= 0:
        bad("dense layers need intermediate_size > 0")
