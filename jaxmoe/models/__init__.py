"""Model families beside DeepSeek-V3 (jaxmoe/model/), one package each: config, weights, the
pure forward, the checkpoint map and the synthetic writer, built from jaxmoe.layers and
jaxmoe.model's blocks; `registry` lists every family (DeepSeek-V3's too) and matches a
checkpoint's config.json to one. May import the base modules, `jaxmoe.model`, `jaxmoe.layers`
and `jaxmoe.loading`; imported by serving, loaded_model and cli.

- registry: `ModelFamily`, `family_of`, `read_config`, `cache_bytes_per_position`
- qwen3_moe: Qwen3MoeForCausalLM (Qwen3-30B-A3B, Qwen3-235B-A22B)
- glm4_moe: Glm4MoeForCausalLM (GLM-4.5, GLM-4.5-Air)
"""
