"""GLM-4.5 (`Glm4MoeForCausalLM`, model_type "glm4_moe"; GLM-4.5, GLM-4.5-Air): config, weights,
the pure forward and the checkpoint map/loader. Grouped-query attention with q/k/v biases,
optional per-head q/k RMSNorm and partial rotary; DeepSeek-V3's sigmoid group-limited router with
correction bias, routed and shared experts; the first `first_k_dense_replace` layers dense."""

from jaxmoe.models.glm4_moe.config import Glm4MoeConfig
from jaxmoe.models.glm4_moe.forward import forward, init_cache
from jaxmoe.models.glm4_moe.hf_map import Glm4MoeCheckpoint, expected_tensors, load_checkpoint
from jaxmoe.models.glm4_moe.weights import Glm4MoeWeights

__all__ = ["Glm4MoeCheckpoint", "Glm4MoeConfig", "Glm4MoeWeights", "expected_tensors", "forward", "init_cache",
           "load_checkpoint"]
