"""The on-disk format of a checkpoint whose routed experts are INT4, and how to read it.

A converted directory is an ordinary checkpoint (config.json, safetensors shards, tokenizer
files) plus the marker file `MARKER` (jaxmoe_int4.json), whose keys are those of `marker()`:
format "int4", group_size, symmetric, scale_dtype, scale_rule (a quant_int4.SCALE_RULES name;
a marker without one means "absmax"), scale_rule_meaning, packing, tensors,
converted_experts, source. Every routed-expert Linear
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` [N, K] is stored as two
tensors (`int4_names`), without a `weight_scale_inv`:

    <prefix>.qweight  U8  [N, ceil(K/G)*G/2]   packed nibbles (jaxmoe/quant_int4.py)
    <prefix>.scales   F16 [N, ceil(K/G)]       group scales

Every other tensor keeps its name and precision. Reading: `read_marker` gives the group size
(None for an unconverted directory), `int4_specs` turns the expected tensors of a config into
those of its converted checkpoint (for the loader's strict accounting), `collect_int4` stacks
one layer's experts into an `Int4Weight` (pure-JAX path: `quant.dequantize`), and
`int4_expert_arrays` gives zero-copy views for the CPU expert store (`HostMatrix.int4`).
The converter that writes this format is convert.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxmoe import quant_int4
from jaxmoe.loading import hf_map
from jaxmoe.loading.safetensors_index import CheckpointError

MARKER = "jaxmoe_int4.json"
FORMAT = "int4"
QWEIGHT, SCALES = "int4_qweight", "int4_scales"  # TensorSpec kinds of the two expert tensors
INT4_KINDS = frozenset({QWEIGHT, SCALES})
LEGACY_SCALE_RULE = "absmax"  # the rule of markers that do not name one

PACKING = "byte j = columns 2j (low nibble), 2j+1 (high nibble); nibble u = q + 8, q in [-8, 7]"
TENSORS = "routed experts <prefix>.qweight U8 [N, ceil(K/G)*G/2], <prefix>.scales F16 [N, ceil(K/G)]"
SCALE_RULE_MEANING = {
    "absmax": "s = amax(|w|)/7 per group, q = rint(w/s) in [-7, 7]",
    "signed": "s = -m/8 per group (m: the element of largest |w|, so m -> q = -8), q = clip(rint(w/s), -8, 7)",
    "search": "per group the f16 scale of least squared error among -m/8 * {1, .95, .9}, m/7 * {1, .95} and one "
              "least-squares refit; q = clip(rint(w/s), -8, 7)",
}


@dataclasses.dataclass(frozen=True)
class Int4Spec(hf_map.TensorSpec):
    """A routed-expert tensor of a converted checkpoint (kind QWEIGHT or SCALES)."""

    k: int = 0  # the Linear's logical input width
    group: int = quant_int4.DEFAULT_GROUP

    @property
    def dtypes(self) -> frozenset[str]:
        return frozenset({"U8"}) if self.kind == QWEIGHT else frozenset({"F16"})


def marker(group: int, scale_rule: str, converted_experts: int, source: str) -> dict[str, Any]:
    """The contents of `MARKER` for a checkpoint converted with `group` and `scale_rule`."""
    return {
        "format": FORMAT, "group_size": group, "symmetric": True, "scale_dtype": "float16",
        "scale_rule": scale_rule, "scale_rule_meaning": SCALE_RULE_MEANING[scale_rule],
        "packing": PACKING, "tensors": TENSORS, "converted_experts": converted_experts, "source": source,
    }


def read_marker(path: str | Path) -> int | None:
    """The group size if `path` is a converted INT4 checkpoint, else None (CheckpointError if
    the marker is there but invalid)."""
    f = Path(path) / MARKER
    if not f.exists():
        return None
    try:
        meta = json.loads(f.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        quant_int4.check_scale_rule(meta.get("scale_rule", LEGACY_SCALE_RULE))
        return quant_int4.check_group(meta["group_size"])
    except (ValueError, KeyError, TypeError) as e:
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


def int4_expert_arrays(experts: dict[str, list[hf_map.TensorSpec]],
                       array: Callable[[str], np.ndarray]) -> dict[str, list[np.ndarray]]:
    """One MoE layer's routed experts of a converted checkpoint ({proj: the unconverted specs of
    expert 0, 1, ...}, as `expert_tensors` gives them), read with `array(name)`:
    {"gate_proj": [qweight views], "gate_proj_scales": [scale views], ...}."""
    out: dict[str, list[np.ndarray]] = {}
    for proj, specs in experts.items():
        names = [int4_names(s.name) for s in specs]
        out[proj] = [array(q) for q, _ in names]
        out[f"{proj}_scales"] = [array(s) for _, s in names]
    return out
