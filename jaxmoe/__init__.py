"""jaxmoe: DeepSeek-V3-family MoE inference on JAX/XLA."""
