"""Session fixtures for the API tests: one tiny synthetic FP8 checkpoint (with tokenizer),
loaded once with the default placement (CPU kernels in exact precision, so that it agrees
with the pure JAX path on every ISA) and once on the pure JAX path."""

from __future__ import annotations

import pytest

import jaxmoe
from jaxmoe.config import ModelConfig
from jaxmoe.loading.synthetic import write_synthetic_checkpoint


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return ModelConfig.named("tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_cfg):
    path = tmp_path_factory.mktemp("api") / "tiny-fp8"
    write_synthetic_checkpoint(path, tiny_cfg, fmt="fp8", seed=0, with_tokenizer=True)
    return path


@pytest.fixture(scope="session")
def model(tiny_ckpt) -> jaxmoe.Model:
    return jaxmoe.load(tiny_ckpt, cpu_precision="exact")


@pytest.fixture(scope="session")
def jax_model(tiny_ckpt) -> jaxmoe.Model:
    """The same checkpoint on the pure JAX path (no CPU kernels). Its compiled steps are
    shared by every model of the tiny config loaded that way, which keeps the CLI tests fast;
    a CPU-kernel model compiles its own (its native handles are static)."""
    return jaxmoe.load(tiny_ckpt, cpu_kernels=False)


@pytest.fixture(scope="session")
def tokenizer(model) -> jaxmoe.Tokenizer:
    assert model.tokenizer is not None
    return model.tokenizer
