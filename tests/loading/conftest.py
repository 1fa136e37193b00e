"""Fixtures of the loading tests: the tiny config, its random tensors, written checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxmoe.config import ModelConfig
from jaxmoe.loading.synthetic import synthetic_tensors, write_synthetic_checkpoint


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return ModelConfig.named("tiny")


@pytest.fixture(scope="session")
def _tiny_f32(tiny_cfg) -> dict[str, np.ndarray]:
    return synthetic_tensors(tiny_cfg, fmt="f32", seed=0)


@pytest.fixture
def tiny_f32(_tiny_f32) -> dict[str, np.ndarray]:
    """The tiny model's random f32 tensors (a fresh dict: tests may edit it)."""
    return dict(_tiny_f32)


@pytest.fixture(scope="session")
def tiny_fp8_dir(tiny_cfg, tmp_path_factory) -> Path:
    """A sharded FP8 synthetic checkpoint with tokenizer (read-only: do not modify)."""
    path = tmp_path_factory.mktemp("tiny_fp8") / "ckpt"
    return write_synthetic_checkpoint(path, tiny_cfg, fmt="fp8", seed=0, max_shard_bytes=150_000)


@pytest.fixture
def mapped_files():
    """mapped_files(dir): the lines of /proc/self/maps naming files under `dir` (still mmap'd)."""

    def mapped(directory: Path) -> list[str]:
        d = str(Path(directory).resolve())
        return [line for line in Path("/proc/self/maps").read_text().splitlines() if d in line]

    return mapped
