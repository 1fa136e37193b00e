"""Planning: predictions, not execution.

Owns the hardware profiles (`hardware`), the cost of a model's parts (`cost_model`), the time
of the engine's CPU-only steps (`kernel_model`), the prefill strategies (`strategies`) and the
planner that chooses among them (`planner`). Pure Python arithmetic on configs: it runs no
JAX and no executor, so it can run anywhere (the benchmarks' tables, the engine's choice).
What an attention layer costs differs by family (`attention_costs`: MLA or GQA, named by the
config class's `ATTENTION_KIND`). The shapes a step takes come from `jaxmoe.step_shapes`, the
module the executors use too.

May import: config, step_shapes.
Imported by: serving, streaming, the benchmarks.
"""
