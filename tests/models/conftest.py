"""Session fixtures for the model-family tests: tiny synthetic Qwen3-MoE checkpoints (qwen3-moe-tiny,
FP8 and bf16, with tokenizer) written by the family's synthetic writer and loaded by `jaxmoe.load`
(the pure JAX path: the CPU kernels are DeepSeek-V3's for now)."""

from __future__ import annotations

import pytest

import jaxmoe
from jaxmoe.models.qwen3_moe import Qwen3MoeConfig
from jaxmoe.models.qwen3_moe.synthetic import write_synthetic_checkpoint


@pytest.fixture(scope="session")
def qwen3_cfg() -> Qwen3MoeConfig:
    return Qwen3MoeConfig.named("qwen3-moe-tiny")


@pytest.fixture(scope="session")
def qwen3_ckpts(tmp_path_factory, qwen3_cfg):
    root = tmp_path_factory.mktemp("qwen3")
    return {fmt: write_synthetic_checkpoint(root / f"tiny-{fmt}", qwen3_cfg, fmt=fmt, seed=3) for fmt in ("fp8", "bf16")}


@pytest.fixture(scope="session")
def qwen3_model(qwen3_ckpts) -> jaxmoe.Model:
    return jaxmoe.load(qwen3_ckpts["fp8"], n_slots=3, chunk_size=16, kv_block_size=16)
