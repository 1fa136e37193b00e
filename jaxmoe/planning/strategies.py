"""The prefill strategies: how a prompt's routed experts are computed.

One enum for the runtime setting, the planner's estimates, the engine's choice per request
and the streaming pipeline. Members are strings (`PrefillStrategy.SLP == "slp"`), so presets,
JSON results and keyword arguments use the plain names.
"""

from __future__ import annotations

from enum import StrEnum


class PrefillStrategy(StrEnum):
    AUTO = "auto"  # the planner chooses, per request (a setting, never a choice)
    CPU = "cpu"  # the engine's steps, routed experts on the host's kernels
    RESIDENT = "resident"  # the engine's steps, routed experts resident on the accelerator
    SLP = "slp"  # stream-loading prefill: the routed experts streamed to one accelerator
    DSLP = "dslp"  # SLP over two accelerators with SmallEP (each streams its expert windows)

    @property
    def accelerators(self) -> int:
        """Accelerators the strategy needs at least."""
        return {"slp": 1, "dslp": 2, "resident": 1}.get(self.value, 0)

    @property
    def streamed(self) -> bool:
        """Whether the routed experts are streamed from host memory to accelerators."""
        return self in STREAMED


STREAMED = (PrefillStrategy.SLP, PrefillStrategy.DSLP)
# what a user may ask for (runtime presets, `prefill_strategy=`, the environment)
REQUESTABLE = tuple(s.value for s in (PrefillStrategy.AUTO, PrefillStrategy.CPU, PrefillStrategy.SLP, PrefillStrategy.DSLP))
# what the planner estimates and chooses among
PLANNED = tuple(s.value for s in (PrefillStrategy.CPU, PrefillStrategy.SLP, PrefillStrategy.DSLP, PrefillStrategy.RESIDENT))
FORCE_ENV = "JAXMOE_PREFILL_STRATEGY"  # forces a strategy while the setting is "auto"
