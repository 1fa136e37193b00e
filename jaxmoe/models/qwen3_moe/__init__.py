"""Qwen3-MoE (`Qwen3MoeForCausalLM`, model_type "qwen3_moe"): config, weights, the pure forward
and the checkpoint map/loader. Grouped-query attention with per-head q/k RMSNorm, softmax
top-k routing, no shared experts."""

from jaxmoe.models.qwen3_moe.config import Qwen3MoeConfig
from jaxmoe.models.qwen3_moe.forward import forward, init_cache
from jaxmoe.models.qwen3_moe.hf_map import Qwen3MoeCheckpoint, expected_tensors, load_checkpoint
from jaxmoe.models.qwen3_moe.weights import Qwen3MoeWeights

__all__ = ["Qwen3MoeCheckpoint", "Qwen3MoeConfig", "Qwen3MoeWeights", "expected_tensors", "forward", "init_cache",
           "load_checkpoint"]
