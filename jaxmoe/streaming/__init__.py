"""Streaming: prompts whose routed experts are streamed from host memory to the accelerators.

Owns the stream-loading prefill pipeline (`slp`: SLP on one device, DSLP on two) and SmallEP,
the expert parallelism over a two-device mesh it runs on (`expert_parallel`), with DSLP's
attention replicated or split by sequence over that mesh (`sequence_split`). Where the
experts come from is the caller's: the engine's expert store slabs (`cpu.tiled`) or an open
checkpoint (`loading.expert_source`).

May import: config, quant, step_shapes, model, planning (the strategy names).
Imported by: serving, the benchmarks.
"""
