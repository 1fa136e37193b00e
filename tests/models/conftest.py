"""Session fixtures for the model-family tests, parametrized over the families beside DeepSeek-V3
(`TINY`: qwen3-moe-tiny, glm4-moe-tiny): the tiny config, synthetic checkpoints (FP8 and bf16,
with tokenizer) written by the family's synthetic writer, one model loaded by `jaxmoe.load` on the
pure JAX path (`tiny_model`: cpu_kernels=False) and the same checkpoints loaded onto jaxmoe's CPU
kernels (`tiny_kernel_models`: cpu_kernels=True, exact precision). A test taking one of them runs
once per family (`one_family`: once, on the family it names); pytest groups the tests by family,
so one family's models (and their compiled steps) serve all of its tests before the next family's
are loaded."""

from __future__ import annotations

from typing import Any

import pytest

import jaxmoe
from jaxmoe.models.registry import ModelFamily, family_of, read_config

TINY = ("qwen3-moe-tiny", "glm4-moe-tiny")  # the packaged tiny config of each family


def one_family(name: str):
    """For a test of family-agnostic machinery (batching, prefix sharing, the weights cache):
    run it on one family only (the families take turns), keeping the suite's time in bounds."""
    return pytest.mark.parametrize("tiny_name", [name], indirect=True)


@pytest.fixture(scope="session", params=TINY)
def tiny_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_cfg(tiny_name) -> Any:
    return read_config(tiny_name)


@pytest.fixture(scope="session")
def tiny_family(tiny_cfg) -> ModelFamily:
    return family_of(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory, tiny_name, tiny_cfg, tiny_family):
    root = tmp_path_factory.mktemp(tiny_name)
    return {fmt: tiny_family.write_synthetic(root / f"tiny-{fmt}", tiny_cfg, fmt=fmt, seed=3) for fmt in ("fp8", "bf16")}


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpts) -> jaxmoe.Model:
    return jaxmoe.load(tiny_ckpts["fp8"], cpu_kernels=False, n_slots=3, chunk_size=16, kv_block_size=16)


@pytest.fixture(scope="session")
def tiny_kernel_models(tiny_ckpts) -> dict[str, jaxmoe.Model]:
    """{fmt: the checkpoint on the CPU kernels} (exact precision: f32 activations and sums)."""
    models = {fmt: jaxmoe.load(path, cpu_kernels=True, cpu_precision="exact", n_slots=3, chunk_size=16, kv_block_size=16)
              for fmt, path in tiny_ckpts.items()}
    yield models
    for m in models.values():
        m.close()
