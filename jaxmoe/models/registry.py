"""The model families jaxmoe runs, and how a checkpoint finds its family.

A `ModelFamily` is everything the runtime asks of one architecture today: its config parser,
the two per-layer widths of the KV cache (`model.cache`'s `c_kv` / `k_pe` pools: MLA's latent
and rope key, GQA's keys and values), the forward of an engine step, the checkpoint loader and
the synthetic writer, one layer up to its routed experts for the staged executor
(`stage_layer`), for stream-loaded prefill (`prefill_layer`) and for one share of a chunk's
tokens in sequence-split DSLP (`split_layer`), which runtime features
beyond the cpu-only fused step it supports
(`supports`: "staged" presets, "streamed_prefill" (SLP / DSLP), the "planner", the native
"cpu_kernels"; the others raise a ValueError naming what is not supported yet), and how to open
its checkpoint without loading it (`open_checkpoint`: the accounted `loading.loader.Checkpoint`
of its tensor map, what `cpu.expert_store.ExpertStore.from_checkpoint` packs the routed
experts from).

`family_of(config)` dispatches a config.json dict on `model_type`, then `architectures` (a
config naming neither is DeepSeek-V3: the configs jaxmoe wrote before other families), and a
parsed config on its type; anything else raises `ConfigError` naming the supported families.

    family = family_of(json.load(open("config.json")))
    cfg = family.parse_config(d, "config.json")
    cfg = read_config("qwen3-moe-tiny")   # a packaged name, a config.json, or a checkpoint directory

Families: DeepSeek-V3 (model_type "deepseek_v3", Kimi-K2's "kimi_k2"; `DeepseekV3ForCausalLM`:
jaxmoe/model/), Qwen3-MoE ("qwen3_moe", `Qwen3MoeForCausalLM`: jaxmoe/models/qwen3_moe/) and
GLM-4.5 ("glm4_moe", `Glm4MoeForCausalLM`: jaxmoe/models/glm4_moe/; GLM-4.5, GLM-4.5-Air).
Every family supports every feature: the fused step (on the pure JAX path or with the CPU
kernels), the staged presets, stream-loaded prefill (replicated or sequence-split attention)
and the planner ("auto" prefill, the CPU step model's TPOT target).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.config import DEEPSEEK_V3_ARCHITECTURES, DEEPSEEK_V3_MODEL_TYPES, ConfigError, ModelConfig, named_config_path
from jaxmoe.loading import loader, synthetic
from jaxmoe.model import forward as deepseek_forward
from jaxmoe.model import groups as deepseek_groups
from jaxmoe.model.cache import cache_widths as mla_cache_widths
from jaxmoe.models import glm4_moe, qwen3_moe
from jaxmoe.models.glm4_moe import synthetic as glm4_synthetic
from jaxmoe.models.glm4_moe.config import ARCHITECTURE as GLM4_ARCHITECTURE
from jaxmoe.models.glm4_moe.config import MODEL_TYPE as GLM4_MODEL_TYPE
from jaxmoe.models.glm4_moe.forward import forward as glm4_forward
from jaxmoe.models.glm4_moe.forward import forward_groups as glm4_forward_groups
from jaxmoe.models.glm4_moe.forward import split_layer as glm4_split_layer
from jaxmoe.models.glm4_moe.forward import stage_layer as glm4_stage_layer
from jaxmoe.models.qwen3_moe import synthetic as qwen3_synthetic
from jaxmoe.models.qwen3_moe.config import ARCHITECTURE as QWEN3_ARCHITECTURE
from jaxmoe.models.qwen3_moe.config import MODEL_TYPE as QWEN3_MODEL_TYPE
from jaxmoe.models.qwen3_moe.forward import forward as qwen3_forward
from jaxmoe.models.qwen3_moe.forward import forward_groups as qwen3_forward_groups
from jaxmoe.models.qwen3_moe.forward import split_layer as qwen3_split_layer
from jaxmoe.models.qwen3_moe.forward import stage_layer as qwen3_stage_layer
from jaxmoe.step_shapes import attention_form

FEATURES = ("staged", "streamed_prefill", "planner", "cpu_kernels")


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]  # config.json `model_type`s of this family
    architectures: tuple[str, ...]  # config.json `architectures` of this family
    config_type: type  # the parsed config's class (a frozen, hashable dataclass: a static jit argument)
    parse_config: Callable[[dict[str, Any], str], Any]  # (config.json dict, source for errors) -> config
    cache_widths: Callable[[Any], tuple[int, int]]  # config -> numbers per position per layer in c_kv, k_pe
    step_forward: Callable[[Any, int, int], Callable]  # (config, step width, kv_len) -> forward(cfg, w, cache, ...)
    # (config, layer weights, x, cache, layer, positions, kv_len) -> (x, None | (h, ids, weights, shared), cache):
    # one layer up to its routed experts, for the staged executor
    stage_layer: Callable[..., Any]
    # (config, layer weights, x, cache, layer, positions) -> the same: the streamed prefill's layer (slp)
    prefill_layer: Callable[..., Any]
    # (cfg, lw, x, cache, layer, positions, mine, gather) -> prefill_layer's result for one share of
    # a chunk's tokens: sequence-split DSLP (streaming/sequence_split.py)
    split_layer: Callable[..., Any]
    # (path or open checkpoint, *, dtype, load_experts=True) -> (config, weights); load_experts=False
    # leaves the MoE blocks' routed `experts` None (for an ExpertStore filled from the checkpoint)
    load_checkpoint: Callable[..., tuple[Any, Any]]
    write_synthetic: Callable[..., Path]  # (path, config, *, fmt, seed, ...) -> path
    open_checkpoint: Callable[[Path], Any]  # path -> open, accounted loading.loader.Checkpoint (close it)
    supports: frozenset[str] = frozenset()  # of FEATURES
    # (config, each group's width, each group's kv_len) -> forward(cfg, w, cache, groups, kv_lens=...): one step over
    # row groups that attend apart and share everything per token (model.groups.run_groups); None: the
    # fused executor runs a mixed step's groups as separate programs
    grouped_forward: Callable[[Any, tuple[int, ...], tuple[int, ...]], Callable] | None = None

    def require(self, feature: str, what: str) -> None:
        """ValueError naming `what` unless this family supports `feature`."""
        if feature not in self.supports:
            raise ValueError(f"{what} is not supported yet for {self.name} models (supported: "
                             f"{', '.join(sorted(self.supports)) or 'the fused step only'})")


def _deepseek_form(cfg: ModelConfig, width: int, kv_len: int) -> str:
    """Absorbed MLA for decode and narrow chunks, expanded where that costs less (the fused step
    runs where JAX's default backend is: on_cpu when that is the CPU)."""
    return attention_form(cfg, width, kv_len, on_cpu=jax.default_backend() == "cpu")


def _deepseek_step_forward(cfg: ModelConfig, width: int, kv_len: int) -> Callable:
    if _deepseek_form(cfg, width, kv_len) == "absorbed":
        return deepseek_forward.forward_absorbed
    return deepseek_forward.forward_expanded


def _deepseek_grouped_forward(cfg: ModelConfig, widths: tuple[int, ...], kv_lens: tuple[int, ...]) -> Callable:
    """`forward_groups` with each group's attention form (`_deepseek_form`)."""
    forms = tuple(_deepseek_form(cfg, w, kv) for w, kv in zip(widths, kv_lens))
    return functools.partial(deepseek_groups.forward_groups, forms=forms)


DEEPSEEK_V3 = ModelFamily(
    name="DeepSeek-V3",
    model_types=DEEPSEEK_V3_MODEL_TYPES,
    architectures=DEEPSEEK_V3_ARCHITECTURES,
    config_type=ModelConfig,
    parse_config=lambda d, source: ModelConfig.from_dict(d, source=source),
    cache_widths=mla_cache_widths,
    step_forward=_deepseek_step_forward,
    stage_layer=deepseek_forward.stage_layer,
    prefill_layer=deepseek_forward.prefill_layer,
    split_layer=deepseek_forward.split_layer,
    load_checkpoint=lambda path, *, dtype=jnp.float32, load_experts=True: loader.load_checkpoint(
        path, dtype=dtype, load_experts=load_experts),
    write_synthetic=synthetic.write_synthetic_checkpoint,
    open_checkpoint=loader.open_checkpoint,
    supports=frozenset(FEATURES),
    grouped_forward=_deepseek_grouped_forward,
)

QWEN3_MOE = ModelFamily(
    name="Qwen3-MoE",
    model_types=(QWEN3_MODEL_TYPE,),
    architectures=(QWEN3_ARCHITECTURE,),
    config_type=qwen3_moe.Qwen3MoeConfig,
    parse_config=lambda d, source: qwen3_moe.Qwen3MoeConfig.from_dict(d, source=source),
    cache_widths=lambda cfg: (cfg.attention.kv_width, cfg.attention.kv_width),  # keys, values
    step_forward=lambda cfg, width, kv_len: qwen3_forward,
    stage_layer=qwen3_stage_layer,
    prefill_layer=qwen3_stage_layer,  # kv_len None: the whole prefill cache
    split_layer=qwen3_split_layer,
    load_checkpoint=lambda path, *, dtype=jnp.float32, load_experts=True: qwen3_moe.load_checkpoint(
        path, dtype=dtype, load_experts=load_experts),
    write_synthetic=qwen3_synthetic.write_synthetic_checkpoint,
    open_checkpoint=qwen3_moe.Qwen3MoeCheckpoint,
    supports=frozenset(FEATURES),
    grouped_forward=lambda cfg, widths, kv_lens: qwen3_forward_groups,
)

GLM4_MOE = ModelFamily(
    name="GLM-4.5",
    model_types=(GLM4_MODEL_TYPE,),
    architectures=(GLM4_ARCHITECTURE,),
    config_type=glm4_moe.Glm4MoeConfig,
    parse_config=lambda d, source: glm4_moe.Glm4MoeConfig.from_dict(d, source=source),
    cache_widths=lambda cfg: (cfg.attention.kv_width, cfg.attention.kv_width),  # keys, values
    step_forward=lambda cfg, width, kv_len: glm4_forward,
    stage_layer=glm4_stage_layer,
    prefill_layer=glm4_stage_layer,
    split_layer=glm4_split_layer,
    load_checkpoint=lambda path, *, dtype=jnp.float32, load_experts=True: glm4_moe.load_checkpoint(
        path, dtype=dtype, load_experts=load_experts),
    write_synthetic=glm4_synthetic.write_synthetic_checkpoint,
    open_checkpoint=glm4_moe.Glm4MoeCheckpoint,
    supports=frozenset(FEATURES),
    grouped_forward=lambda cfg, widths, kv_lens: glm4_forward_groups,
)

FAMILIES: tuple[ModelFamily, ...] = (DEEPSEEK_V3, QWEN3_MOE, GLM4_MOE)


def supported() -> str:
    """The supported families, their model_types and architectures, for error messages."""
    return "; ".join(f"{f.name}: model_type {list(f.model_types)}, architectures {list(f.architectures)}" for f in FAMILIES)


def family_of(config: dict[str, Any] | Any) -> ModelFamily:
    """The family of a config.json dict (by `model_type`, else `architectures`) or of a parsed config
    (by its type). ConfigError naming the supported families when none matches."""
    if not isinstance(config, dict):
        for f in FAMILIES:
            if isinstance(config, f.config_type):
                return f
        raise ConfigError(f"{type(config).__name__} is the config of no supported model family ({supported()})")
    model_type, archs = config.get("model_type"), list(config.get("architectures") or ())
    if model_type is not None:
        for f in FAMILIES:
            if model_type in f.model_types:
                return f
    for f in FAMILIES:
        if set(archs) & set(f.architectures):
            return f
    if model_type is None and not archs:
        return DEEPSEEK_V3
    raise ConfigError(f"unsupported architecture: model_type {model_type!r}, architectures {archs}; "
                      f"supported: {supported()}")


def read_config_dict(path: str | Path) -> tuple[dict[str, Any], str]:
    """(config.json dict, its path) of a checkpoint directory or config file (ConfigError if unreadable)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"missing config: {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d, str(path)


def read_config(name: str | Path) -> Any:
    """The config of a packaged name (jaxmoe/configs/models), a config.json path or a checkpoint
    directory, parsed by its family."""
    p = Path(name)
    if not (p.suffix == ".json" or p.is_dir()):
        p = named_config_path("models", str(name), "model config")
    d, source = read_config_dict(p)
    return family_of(d).parse_config(d, source)


def cache_bytes_per_position(cfg: Any, dtype: Any = jnp.float32) -> int:
    """KV-cache bytes one position of one sequence takes over all layers."""
    return cfg.num_hidden_layers * sum(family_of(cfg).cache_widths(cfg)) * jnp.dtype(dtype).itemsize
