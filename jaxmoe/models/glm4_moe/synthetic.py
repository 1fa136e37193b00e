"""Synthetic GLM-4.5 checkpoints in the published on-disk layout: random weights for any
`Glm4MoeConfig` (`jaxmoe synth --config glm4-moe-tiny`), through jaxmoe.loading.synthetic's
writer (same formats, random init, sharding and tokenizer as DeepSeek-V3's synthetic checkpoints).
No MTP module is written.

- `write_synthetic_checkpoint(path, cfg, fmt="fp8")`: "fp8" (e4m3 Linears with 128x128 fp32
  `weight_scale_inv`, lm_head excepted) | "bf16" | "f32".
- `hf_config(cfg)`: its config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxmoe.loading.hf_map import quant_block
from jaxmoe.loading.synthetic import write_random_checkpoint
from jaxmoe.loading.writer import DEFAULT_SHARD_BYTES
from jaxmoe.models.glm4_moe.config import Glm4MoeConfig
from jaxmoe.models.glm4_moe.hf_map import expected_tensors


def hf_config(cfg: Glm4MoeConfig, *, fp8: bool | None = None, dtype: str | None = None) -> dict[str, Any]:
    """config.json for a checkpoint of `cfg` (num_nextn_predict_layers 0: none written); fp8: force
    quantization_config on (cfg's block or 128x128) or off."""
    d = dict(cfg.to_hf_dict(), num_nextn_predict_layers=0)
    if fp8 is False:
        d.pop("quantization_config", None)
    elif fp8 and "quantization_config" not in d:
        d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": list(quant_block(cfg))}
    if dtype is not None:
        d["torch_dtype"] = dtype
    return d


def write_synthetic_checkpoint(path: str | Path, cfg: Glm4MoeConfig, *, fmt: str = "fp8", seed: int = 0,
                               max_shard_bytes: int | None = DEFAULT_SHARD_BYTES, with_tokenizer: bool = True,
                               overwrite: bool = False, progress: bool | None = None) -> Path:
    """A random-weight GLM-4.5 checkpoint of `cfg` in format "fp8" | "bf16" | "f32" (+ tokenizer files)."""
    config = hf_config(cfg, fp8=fmt == "fp8", dtype="float32" if fmt == "f32" else "bfloat16")
    return write_random_checkpoint(path, config, expected_tensors(cfg).values(), quant_block(cfg), fmt=fmt, seed=seed,
                                   max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress,
                                   tokenizer=(cfg.vocab_size, cfg.max_position_embeddings) if with_tokenizer else None)
