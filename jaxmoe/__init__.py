"""jaxmoe: MoE inference on JAX/XLA: the DeepSeek-V3 family (DeepSeek-V3/R1, Kimi-K2), Qwen3-MoE and
GLM-4.5 (jaxmoe.models.registry).

    import jaxmoe
    model = jaxmoe.load("path/to/checkpoint")
    result = jaxmoe.generate(model, "Hello", max_new_tokens=32)
    for r in jaxmoe.stream_generate(model, "Hello", max_new_tokens=32, temperature=0.7, seed=1):
        print(r.text, end="", flush=True)
"""

from __future__ import annotations

__version__ = "0.1.0"

# `jaxmoe.generate` names the function: importing it from the submodule of the same name
# rebinds the package attribute after the import system set it to the module.
from jaxmoe.config import ModelConfig
from jaxmoe.generate import (
    GenerationResult,
    Model,
    StreamResponse,
    Timings,
    generate,
    load,
    stream_generate,
)
from jaxmoe.tokenizer import Tokenizer

__all__ = [
    "__version__",
    "load",
    "generate",
    "stream_generate",
    "Model",
    "GenerationResult",
    "StreamResponse",
    "Timings",
    "ModelConfig",
    "Tokenizer",
]
