"""The checkpoint side of stream-loading prefill: the routed experts of an open checkpoint as
an expert source (layer -> that layer's experts as host arrays), for `streaming.slp`.

The arrays are zero-copy numpy views of the checkpoint's mmap: the same host copy the CPU
decode path reads, so nothing is duplicated.
"""

from __future__ import annotations

import numpy as np

from jaxmoe.loading.loader import Checkpoint
from jaxmoe.loading.safetensors_index import stacked_view
from jaxmoe.model.weights import ExpertsWeights
from jaxmoe.quant import DenseWeight, Fp8Weight
from jaxmoe.quant_int4 import Int4Weight


class CheckpointExperts:
    """Expert source over an open checkpoint: layer -> `ExpertsWeights` of zero-copy numpy
    views of the mmap ([E, ...] per projection; FP8 values and fp32 block scales as stored).
    This is the same host copy the CPU decode path reads; nothing is duplicated."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    def __call__(self, layer: int) -> ExpertsWeights:
        arrays = self.checkpoint.expert_arrays(layer)

        def stack(views):
            v = stacked_view(views)
            return np.stack(views) if v is None else v  # a copy only if the file layout forbids a view

        def lin(proj):
            w = stack(arrays[proj])
            if f"{proj}_scales" in arrays:  # a converted INT4 checkpoint (`loading.int4_format`)
                k = self.checkpoint.cfg.moe_intermediate_size if proj == "down_proj" else self.checkpoint.cfg.hidden_size
                return Int4Weight(w, stack(arrays[f"{proj}_scales"]), k=k, group=self.checkpoint.int4_group)
            scales = arrays.get(f"{proj}_scale_inv")
            if scales is None:
                return DenseWeight(w)
            return Fp8Weight(w, stack(scales).astype(np.float32, copy=False), block=self.checkpoint.block)

        return ExpertsWeights(lin("gate_proj"), lin("up_proj"), lin("down_proj"))
