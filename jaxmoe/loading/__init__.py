"""Checkpoints on disk: lazy safetensors reading (safetensors_index), the name map (hf_map), the
strict loader (loader), the INT4 checkpoint format (int4_format) and its converter (convert), the
atomic sharded writer (writer), synthetic checkpoints (synthetic) with their tokenizer
(tokenizer_data), routed experts for stream-loading prefill (expert_source), progress bars."""

from jaxmoe.loading.loader import Checkpoint, load_checkpoint, open_checkpoint
from jaxmoe.loading.safetensors_index import CheckpointError
from jaxmoe.loading.synthetic import quantize_linears, write_checkpoint, write_synthetic_checkpoint

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "open_checkpoint",
    "quantize_linears",
    "write_checkpoint",
    "write_synthetic_checkpoint",
]
