"""Serving: requests in, tokens out.

Owns the engine (`engine`), the scheduler and requests (`scheduler`, `request`), the step
executors behind the `executors.Executor` protocol, the streamed-prompt runner that gives each
request its prefill strategy (`prompt_runner`), sampling, stop conditions and the runtime
presets (`presets`). Everything here knows about time: devices, dispatch, threads.

May import: config, quant, step_shapes, model, models (the family registry), loading, cpu, planning, streaming.
Imported by: generate, cli (and the benchmarks). Nothing below it imports it.
"""
