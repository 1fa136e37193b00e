"""Synthetic checkpoints in the exact on-disk layout of real DeepSeek-V3 ones, without torch.

- `write_synthetic_checkpoint(path, cfg, fmt="fp8")`: random weights for any config, streamed
  tensor by tensor (bench-sized models never sit in RAM), plus a trained tokenizer.
- `write_random_checkpoint(path, config, specs, block)`: the same for any family's tensor map
  (jaxmoe/models/<family>/synthetic.py builds on it).
- `write_checkpoint(path, cfg, tensors)`: any named numpy tensors + config.json.
- `quantize_linears(tensors, cfg)`: every Linear `.weight` except lm_head -> e4m3 + `.weight_scale_inv`.
- `synthetic_tensors(cfg, fmt)`: the random tensors in memory (small configs, tests).
- `hf_config(cfg)`: the config.json of a checkpoint of `cfg`.

Layout: names as in jaxmoe/model/weights.py; FP8 Linears with fp32 block scales
[ceil(N/bn), ceil(K/bk)]; embeddings, norms, lm_head and router bf16 (`e_score_correction_bias`
fp32). Files, sharding, tensor order and atomicity are writer.py's: the random tensors are
`TensorGroup`s made one at a time as `write_tensor_groups` reaches them, in the order of
`hf_map.expected_tensors`, so each proj's routed experts are evenly spaced (`stacked_view`).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.loading import hf_map
from jaxmoe.loading.writer import DEFAULT_SHARD_BYTES, TensorGroup, write_tensor_groups
from jaxmoe.quant import FP8_MAX, quantize_fp8_blocks

FORMATS = ("fp8", "bf16", "f32")
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)


# ---- public API ---------------------------------------------------------------------------


def write_checkpoint(
    path: str | Path,
    cfg: ModelConfig | dict,
    tensors: dict[str, np.ndarray],
    *,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `tensors` (any names, any safetensors dtypes) and config.json, atomically.

    cfg: a ModelConfig (written as `hf_config(cfg)`) or a dict written verbatim.
    """
    tensors = {n: np.asarray(a) for n, a in tensors.items()}
    groups = [TensorGroup([(n, a.dtype, tuple(a.shape))], (lambda n=n, a=a: {n: a})) for n, a in tensors.items()]
    config = cfg if isinstance(cfg, dict) else hf_config(cfg, fp8=any(a.dtype == E4M3 for a in tensors.values()))
    return write_tensor_groups(path, config, groups, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def write_synthetic_checkpoint(
    path: str | Path,
    cfg: ModelConfig,
    *,
    fmt: str = "fp8",
    seed: int = 0,
    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    with_tokenizer: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """A random-weight checkpoint of `cfg` in format "fp8" | "bf16" | "f32" (+ tokenizer files)."""
    config = hf_config(cfg, fp8=fmt == "fp8", dtype="float32" if fmt == "f32" else "bfloat16")
    return write_random_checkpoint(path, config, hf_map.expected_tensors(cfg).values(), hf_map.quant_block(cfg), fmt=fmt,
                                   seed=seed, max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress,
                                   tokenizer=(cfg.vocab_size, cfg.max_position_embeddings) if with_tokenizer else None)


def write_random_checkpoint(
    path: str | Path,
    config: dict[str, Any],
    specs: Iterable[hf_map.TensorSpec],
    block: tuple[int, int],
    *,
    fmt: str = "fp8",
    seed: int = 0,
    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    tokenizer: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Random tensors for `specs` (any family's tensor map) in format "fp8" | "bf16" | "f32" (FP8
    Linears with `block` scales), `config` as config.json, and with `tokenizer` = (vocab_size,
    model_max_length) the trained tokenizer's files."""
    groups = spec_groups(specs, block, fmt, seed)
    extra: Callable[[Path], dict] | None = None
    if tokenizer is not None:
        from jaxmoe.loading.tokenizer_data import write_tokenizer  # noqa: PLC0415  (the tokenizers package only here)

        extra = lambda d: write_tokenizer(d, tokenizer[0], model_max_length=tokenizer[1])  # noqa: E731
    return write_tensor_groups(path, config, groups, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                               extra=extra, progress=progress)


def synthetic_tensors(cfg: ModelConfig, *, fmt: str = "f32", seed: int = 0) -> dict[str, np.ndarray]:
    """The tensors `write_synthetic_checkpoint` writes, in memory (use for small configs)."""
    out: dict[str, np.ndarray] = {}
    for g in spec_groups(hf_map.expected_tensors(cfg).values(), hf_map.quant_block(cfg), fmt, seed):
        out.update(g.make())
    return out


def quantize_linears(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A copy of `tensors` with every Linear `.weight` (lm_head excepted) as e4m3 + `.weight_scale_inv`."""
    return linears_to_fp8(tensors, hf_map.expected_tensors(cfg), hf_map.quant_block(cfg))


def linears_to_fp8(tensors: dict[str, np.ndarray], specs: dict[str, hf_map.TensorSpec],
                   block: tuple[int, int]) -> dict[str, np.ndarray]:
    """`quantize_linears` for any family's tensor map (`specs`: its expected_tensors)."""
    out: dict[str, np.ndarray] = {}
    for name, a in tensors.items():
        spec = specs.get(name)
        if spec is None or spec.kind != "linear" or spec.target == "lm_head":
            out[name] = a
            continue
        q, s = quantize_fp8_blocks(np.asarray(a, np.float32), block)
        out[name], out[spec.scale_name] = q, s
    return out


def hf_config(cfg: ModelConfig, *, fp8: bool | None = None, dtype: str | None = None) -> dict[str, Any]:
    """config.json for a checkpoint of `cfg` (original DeepSeek spelling, scoring_func sigmoid).

    fp8: force quantization_config on (with cfg's or the default 128x128 block) or off.
    """
    d = cfg.to_hf_dict()
    d["scoring_func"] = "sigmoid"
    if fp8 is False:
        d.pop("quantization_config", None)
    elif fp8 and "quantization_config" not in d:
        d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": list(hf_map.quant_block(cfg))}
    if dtype is not None:
        d["torch_dtype"] = dtype
    return d


# ---- random init ----------------------------------------------------------------------------


def spec_groups(specs: Iterable[hf_map.TensorSpec], block: tuple[int, int], fmt: str, seed: int) -> list[TensorGroup]:
    """Random tensors scaled so activations stay O(1): Linear ~ N(0, 1/fan_in), norms ~ 1."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    dense = F32 if fmt == "f32" else BF16
    groups = []
    for spec in specs:
        if spec.optional:  # tied lm_head
            continue
        rng = lambda s=spec: np.random.default_rng([seed, zlib.crc32(s.name.encode())])  # noqa: E731
        if spec.kind == "linear":
            fan_in = spec.shape[1]
            std = 1.0 / math.sqrt(fan_in) * (2.0 if spec.target == "lm_head" else 1.0)
            gen = lambda s=spec, r=rng, std=std: r().standard_normal(s.shape, np.float32) * np.float32(std)  # noqa: E731
            if fmt == "fp8" and spec.target != "lm_head":
                groups.append(TensorGroup(
                    [(spec.name, E4M3, spec.shape), (spec.scale_name, F32, spec.scale_shape(block))],
                    lambda s=spec, r=rng, std=std: dict(zip((s.name, s.scale_name), _random_fp8(s, std, block, r()))),
                ))
                continue
            groups.append(TensorGroup([(spec.name, dense, spec.shape)],
                                      lambda s=spec, g=gen: {s.name: g().astype(dense)}))
        elif spec.kind == "bias":
            groups.append(TensorGroup([(spec.name, F32, spec.shape)],
                                      lambda s=spec, r=rng: {s.name: r().normal(0, 0.01, s.shape).astype(F32)}))
        else:
            groups.append(TensorGroup([(spec.name, dense, spec.shape)],
                                      lambda s=spec, r=rng: {s.name: _float_init(s, r()).astype(dense)}))
    return groups


_FP8_SPREAD = 100.0  # e4m3 values ~ N(0, 100^2): max |code| 448 is 4.5 sigma


@functools.cache
def _fp8_normal_lut() -> np.ndarray:
    """65536 e4m3 codes of N(0, spread^2) draws: indexing it with random uint16 samples fast."""
    z = np.random.default_rng(1234).standard_normal(65536).astype(np.float32) * np.float32(_FP8_SPREAD)
    return np.clip(z, -FP8_MAX, FP8_MAX).astype(E4M3).view(np.uint8)


def _random_fp8(spec: hf_map.TensorSpec, std: float, block: tuple[int, int], rng: np.random.Generator):
    """e4m3 values + block scales of a ~N(0, std^2) weight, drawn directly in quantized form
    (much faster than quantizing f32 draws: docs/PERFORMANCE_MODEL.md, "Measurements behind
    design choices"); the scales vary per block (x0.75-1.25)."""
    q = _fp8_normal_lut()[rng.integers(0, 65536, spec.shape, dtype=np.uint16)].view(E4M3)
    scale = rng.uniform(0.75, 1.25, spec.scale_shape(block)) * (std / _FP8_SPREAD)
    return q, scale.astype(F32)


def _float_init(spec: hf_map.TensorSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.target == "embed_tokens":
        return rng.standard_normal(spec.shape, np.float32)
    if spec.target.endswith("_bias"):  # attention biases (Qwen3-MoE's attention_bias)
        return 0.01 * rng.standard_normal(spec.shape, np.float32)
    if spec.target.endswith("gate.weight"):  # router: logits ~ N(0, 1)
        return rng.standard_normal(spec.shape, np.float32) / np.float32(math.sqrt(spec.shape[1]))
    return 1.0 + 0.05 * rng.standard_normal(spec.shape, np.float32)  # RMSNorm weights
