import pytest

from jaxmoe.config import ModelConfig
from jaxmoe.loading.loader import load_checkpoint
from jaxmoe.loading.synthetic import write_synthetic_checkpoint


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(cfg, weights) of the tiny config, written as an FP8 checkpoint and loaded back."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-fp8"
    write_synthetic_checkpoint(path, ModelConfig.named("tiny"), fmt="fp8", seed=0)
    return load_checkpoint(path)
