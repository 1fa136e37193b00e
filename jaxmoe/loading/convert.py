"""Converting a checkpoint's routed experts to INT4 (issue 7), and reading converted ones.

    jaxmoe convert --to int4 SRC DST [--group 32] [--int4-scale search|signed|absmax] [--workers N]
    convert_int4("path/to/fp8-or-bf16", "path/to/int4", group=32, scale_rule="search")

The source is opened with the loader's strict accounting. Every routed-expert Linear
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, from FP8 with its
`weight_scale_inv` blocks dequantized first, or bf16/f16/f32) becomes two tensors:

    <prefix>.qweight  U8  [N, ceil(K/G)*G/2]   packed nibbles (jaxmoe/quant_int4.py)
    <prefix>.scales   F16 [N, ceil(K/G)]       group scales

The group scales follow `scale_rule` (quant_int4.SCALE_RULES; default "search", the least
squared error per group). Every other tensor (attention, dense and shared MLPs, router, norms,
embeddings, lm_head, the MTP module) is copied byte for byte in its original precision. Other
files (config.json, tokenizer files) are copied as they are, and `jaxmoe_int4.json` marks the
directory as converted (format, group size, scale rule, source). Experts are converted by
`workers` threads (numpy releases the GIL in the heavy loops), a bounded window ahead of the
writer, which still writes in order. The checkpoint is written once, as safetensors
(same container and zero-copy mmap reader as the source; the INT4 bytes are repacked into the
kernels' tile layout at load time, like FP8), into a temporary directory renamed into place
at the end (`synthetic._write`), with a progress bar on stderr.

Loading: `loader.Checkpoint` reads the marker (`int4_group`), and `int4_specs` replaces the
expected routed-expert tensors by the two above; the loader stacks them into `Int4Weight`
(pure-JAX path: `quant.dequantize`; CPU kernels: `HostMatrix.int4`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jaxmoe import quant, quant_int4
from jaxmoe.loading import hf_map

MARKER = "jaxmoe_int4.json"
QWEIGHT, SCALES = "int4_qweight", "int4_scales"
INT4_KINDS = frozenset({QWEIGHT, SCALES})


@dataclasses.dataclass(frozen=True)
class Int4Spec(hf_map.TensorSpec):
    """A routed-expert tensor of a converted checkpoint (kind QWEIGHT or SCALES)."""

    k: int = 0  # the Linear's logical input width
    group: int = quant_int4.DEFAULT_GROUP

    @property
    def dtypes(self) -> frozenset[str]:
        return frozenset({"U8"}) if self.kind == QWEIGHT else frozenset({"F16"})


def read_marker(path: str | Path) -> int | None:
    """The group size if `path` is a converted INT4 checkpoint, else None."""
    f = Path(path) / MARKER
    if not f.exists():
        return None
    try:
        meta = json.loads(f.read_text())
        if meta.get("format") != "int4":
            raise ValueError(f"format {meta.get('format')!r}, expected 'int4'")
        quant_int4.check_scale_rule(meta.get("scale_rule", "absmax"))  # markers before the rules: absmax
        return quant_int4.check_group(meta["group_size"])
    except (ValueError, KeyError, TypeError) as e:
        from jaxmoe.loading.safetensors_index import CheckpointError  # noqa: PLC0415

        raise CheckpointError(f"{f}: not a valid INT4 marker ({e})") from e


def int4_names(weight_name: str) -> tuple[str, str]:
    """"x.weight" -> ("x.qweight", "x.scales")."""
    base = weight_name[: -len("weight")]
    return base + "qweight", base + "scales"


def int4_specs(specs: dict[str, hf_map.TensorSpec], group: int) -> dict[str, hf_map.TensorSpec]:
    """The expected tensors of a converted checkpoint: routed experts as qweight + scales."""
    out: dict[str, hf_map.TensorSpec] = {}
    for name, s in specs.items():
        if s.expert is None or s.kind != "linear":
            out[name] = s
            continue
        n, k = s.shape
        qn, sn = int4_names(name)
        kg = quant_int4.padded_k(k, group)
        out[qn] = Int4Spec(qn, (n, kg // 2), QWEIGHT, s.target, s.expert, k=k, group=group)
        out[sn] = Int4Spec(sn, (n, kg // group), SCALES, s.target, s.expert, k=k, group=group)
    return out


def collect_int4(leaves: dict, pending: dict, spec: Int4Spec, array: np.ndarray, n_experts: int, put) -> None:
    """Loader hook: stacks one layer's qweight / scales over experts into an `Int4Weight`."""
    key = (spec.target, spec.kind)
    pending[key].append(np.asarray(array))
    other = (spec.target, SCALES if spec.kind == QWEIGHT else QWEIGHT)
    if len(pending[key]) == n_experts and len(pending.get(other, ())) == n_experts:
        q = np.stack(pending.pop((spec.target, QWEIGHT)))
        s = np.stack(pending.pop((spec.target, SCALES)))
        leaves[spec.target] = quant_int4.Int4Weight(qweight=put(q), scales=put(s), k=spec.k, group=spec.group)


def int4_expert_arrays(ck, layer: int) -> dict[str, list[np.ndarray]]:
    """`Checkpoint.expert_arrays` of a converted checkpoint: {"gate_proj": [qweight views],
    "gate_proj_scales": [scale views], ...} (zero-copy)."""
    out: dict[str, list[np.ndarray]] = {}
    for proj, specs in hf_map.expert_tensors(ck.cfg, layer).items():
        names = [int4_names(s.name) for s in specs]
        out[proj] = [ck.array(q) for q, _ in names]
        out[f"{proj}_scales"] = [ck.array(s) for _, s in names]
    return out


# ---- conversion ----------------------------------------------------------------------------------
def _expert_float(ck, name: str) -> np.ndarray:
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
                 progress: bool | None = None, max_shard_bytes: int | None = None, workers: int | None = None) -> Path:
    """Writes `dst`: `src` with its routed experts group-quantized to INT4 (module docstring).
    workers: conversion threads (default: the CPUs this process may use, at most 16; each holds
    about 2.5x an expert matrix in f32 while it works)."""
    from jaxmoe.loading import synthetic  # noqa: PLC0415
    from jaxmoe.loading.loader import open_checkpoint  # noqa: PLC0415
    from jaxmoe.loading.safetensors_index import INDEX_NAME  # noqa: PLC0415

    group = quant_int4.check_group(group)
    scale_rule = quant_int4.check_scale_rule(scale_rule)
    workers = workers or min(16, len(os.sched_getaffinity(0)))
    if workers < 1:
        raise ValueError(f"convert: workers must be >= 1, got {workers}")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"convert: source and destination are the same directory ({src})")
    if read_marker(src) is not None:
        raise ValueError(f"convert: {src} is already an INT4 checkpoint ({MARKER})")
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
                qn, sn = int4_names(name)
                n, k = t.shape
                kg = quant_int4.padded_k(k, group)
                jobs.append(lambda name=name, qn=qn, sn=sn: dict(zip((qn, sn), quant_int4.quantize_int4(
                    _expert_float(ck, name), group, name, scale_rule))))
                groups.append(synthetic._Group(
                    [(qn, np.dtype(np.uint8), (n, kg // 2)), (sn, np.dtype(np.float16), (n, kg // group))],
                    lambda i=len(jobs) - 1: ahead.take(i)))
                n_experts += 1
            elif name.endswith(hf_map.SCALE_SUFFIX) and (owner := ck.specs.get(name[: -len("_scale_inv")])) is not None \
                    and owner.expert is not None:
                continue  # the expert's FP8 block scales: folded into the INT4 values
            else:
                groups.append(synthetic._Group([(name, t.np_dtype, tuple(t.shape))],
                                               lambda name=name: {name: np.asarray(ck.array(name))}))
        if not n_experts:
            raise ValueError(f"convert: {src} has no routed experts to convert")
        config = json.loads((src / "config.json").read_text())
        skip = {"config.json", INDEX_NAME, MARKER}

        def extra(tmp: Path) -> dict[str, Any]:
            for f in sorted(src.iterdir()):
                if f.is_file() and f.suffix != ".safetensors" and f.name not in skip and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
            (tmp / MARKER).write_text(json.dumps({
                "format": "int4", "group_size": group, "symmetric": True, "scale_dtype": "float16",
                "scale_rule": scale_rule, "scale_rule_meaning": SCALE_RULE_MEANING[scale_rule],
                "packing": "byte j = columns 2j (low nibble), 2j+1 (high nibble); nibble u = q + 8, q in [-8, 7]",
                "tensors": "routed experts <prefix>.qweight U8 [N, ceil(K/G)*G/2], <prefix>.scales F16 [N, ceil(K/G)]",
                "converted_experts": n_experts, "source": str(src.resolve()),
            }, indent=2) + "\n")
            return {}

        shard = max_shard_bytes if max_shard_bytes is not None else synthetic.DEFAULT_SHARD_BYTES
        return synthetic._write(dst, config, groups, shard, overwrite, extra, progress)
    finally:
        ahead.close()
        ck.close()


SCALE_RULE_MEANING = {
    "absmax": "s = amax(|w|)/7 per group, q = rint(w/s) in [-7, 7]",
    "signed": "s = -m/8 per group (m: the element of largest |w|, so m -> q = -8), q = clip(rint(w/s), -8, 7)",
    "search": "per group the f16 scale of least squared error among -m/8 * {1, .95, .9}, m/7 * {1, .95} and one "
              "least-squares refit; q = clip(rint(w/s), -8, 7)",
}
