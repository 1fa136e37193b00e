"""Checkpoints: lazy safetensors reading, the name map, the strict loader, synthetic writers."""

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
