"""Converting a checkpoint's routed experts to INT4: the writer of the format in int4_format.py.

    jaxmoe convert --to int4 SRC DST [--group 32] [--int4-scale search|signed|absmax] [--workers N]
    convert_int4("path/to/fp8-or-bf16", "path/to/int4", group=32, scale_rule="search")

The source is opened with the loader's strict accounting (its family's: DeepSeek-V3 / Kimi-K2,
Qwen3-MoE, GLM-4.5). Every routed-expert Linear
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, from FP8 with its
`weight_scale_inv` blocks dequantized first (`expert_float`), or bf16/f16/f32) becomes the
`<prefix>.qweight` / `<prefix>.scales` pair of int4_format.py, group-quantized by
`quant_int4.quantize_int4` with `scale_rule` (quant_int4.SCALE_RULES; default "search", the
least squared error per group). Every other tensor (attention, dense and shared MLPs, router,
norms, embeddings, lm_head, the MTP module) is copied byte for byte in its original precision.
Other files (config.json, tokenizer files) are copied as they are, and the marker
`int4_format.MARKER` records format, group size, scale rule and source. Experts are converted
by `workers` threads (numpy releases the GIL in the heavy loops), a bounded window ahead of the
writer, which still writes in order. The checkpoint is written once, as safetensors (same
container and zero-copy mmap reader as the source; the INT4 bytes are repacked into the
kernels' tile layout at load time, like FP8), atomically and with a progress bar on stderr
(`writer.write_tensor_groups`).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxmoe import quant, quant_int4
from jaxmoe.loading import hf_map, int4_format
from jaxmoe.loading.loader import Checkpoint, open_checkpoint
from jaxmoe.loading.safetensors_index import INDEX_NAME
from jaxmoe.loading.writer import DEFAULT_SHARD_BYTES, TensorGroup, write_tensor_groups


def expert_float(ck: Checkpoint, name: str) -> np.ndarray:
    """The Linear weight `name` of `ck` as float32 (FP8 dequantized with its block scales)."""
    w = ck.array(name)
    if ck.is_fp8(name):
        return quant.dequantize_fp8_blocks(w, np.asarray(ck.array(hf_map.scale_name(name)), np.float32), ck.block)
    return np.asarray(w, np.float32)


class _Ahead:
    """Runs jobs[i] on a thread pool at most `window` jobs ahead of the consumer, which takes
    the results in any order with `take(i)` (the writer takes them in plan order)."""

    def __init__(self, jobs: list, workers: int, window: int):
        self.jobs, self.window = jobs, window
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxmoe-convert")
        self.futures: dict[int, concurrent.futures.Future] = {}
        self.next = 0

    def take(self, i: int):
        while self.next < len(self.jobs) and (self.next <= i or len(self.futures) < self.window):
            self.futures[self.next] = self.pool.submit(self.jobs[self.next])
            self.next += 1
        return self.futures.pop(i).result() if i in self.futures else self.jobs[i]()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def convert_int4(src: str | Path, dst: str | Path, *, group: int = quant_int4.DEFAULT_GROUP,
                 scale_rule: str = quant_int4.DEFAULT_SCALE_RULE, overwrite: bool = False,
                 progress: bool | None = None, max_shard_bytes: int | None = None, workers: int | None = None,
                 open_checkpoint: Callable[[Path], Checkpoint] = open_checkpoint) -> Path:
    """Writes `dst`: `src` with its routed experts group-quantized to INT4 (module docstring).
    workers: conversion threads (default: the CPUs this process may use, at most 16; each holds
    about 2.5x an expert matrix in f32 while it works). open_checkpoint: the family's accounted
    opener (DeepSeek-V3's by default; `jaxmoe convert` passes the family of src's config.json,
    models.registry)."""
    group = quant_int4.check_group(group)
    scale_rule = quant_int4.check_scale_rule(scale_rule)
    workers = workers or min(16, len(os.sched_getaffinity(0)))
    if workers < 1:
        raise ValueError(f"convert: workers must be >= 1, got {workers}")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"convert: source and destination are the same directory ({src})")
    if int4_format.read_marker(src) is not None:
        raise ValueError(f"convert: {src} is already an INT4 checkpoint ({int4_format.MARKER})")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"convert: {dst} exists (pass overwrite=True / --overwrite to replace it)")
    ck = open_checkpoint(src)
    jobs: list = []
    ahead = _Ahead(jobs, workers, 2 * workers)
    try:
        groups = []
        n_experts = 0
        for name, t in ck.store.tensors.items():
            spec = ck.specs.get(name)
            if spec is not None and spec.expert is not None and spec.kind == "linear":
                qn, sn = int4_format.int4_names(name)
                n, k = t.shape
                kg = quant_int4.padded_k(k, group)
                jobs.append(lambda name=name, qn=qn, sn=sn: dict(zip((qn, sn), quant_int4.quantize_int4(
                    expert_float(ck, name), group, name, scale_rule))))
                job = len(jobs) - 1
                groups.append(TensorGroup(
                    [(qn, np.dtype(np.uint8), (n, kg // 2)), (sn, np.dtype(np.float16), (n, kg // group))],
                    lambda i=job: ahead.take(i)))
                n_experts += 1
            elif name.endswith(hf_map.SCALE_SUFFIX) and (owner := ck.specs.get(name[: -len("_scale_inv")])) is not None \
                    and owner.expert is not None:
                continue  # the expert's FP8 block scales: folded into the INT4 values
            else:
                groups.append(TensorGroup([(name, t.np_dtype, tuple(t.shape))],
                                          lambda name=name: {name: np.asarray(ck.array(name))}))
        if not n_experts:
            raise ValueError(f"convert: {src} has no routed experts to convert")
        config = json.loads((src / "config.json").read_text())
        skip = {"config.json", INDEX_NAME, int4_format.MARKER}

        def extra(tmp: Path) -> dict[str, Any]:
            for f in sorted(src.iterdir()):
                if f.is_file() and f.suffix != ".safetensors" and f.name not in skip and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
            meta = int4_format.marker(group, scale_rule, n_experts, str(src.resolve()))
            (tmp / int4_format.MARKER).write_text(json.dumps(meta, indent=2) + "\n")
            return {}

        shard = max_shard_bytes if max_shard_bytes is not None else DEFAULT_SHARD_BYTES
        return write_tensor_groups(dst, config, groups, max_shard_bytes=shard, overwrite=overwrite, extra=extra,
                                   progress=progress)
    finally:
        ahead.close()
        ck.close()

