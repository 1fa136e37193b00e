"""Load a Hugging Face DeepSeek-V3-family checkpoint into the `Weights` pytree.

    cfg, weights = load_checkpoint("path/to/checkpoint")

Strict accounting: before any tensor is read, every name in the checkpoint is matched
against `hf_map.expected_tensors(cfg)`; a missing, unexpected, duplicated, wrongly shaped or
wrongly typed tensor (or FP8 scale), a truncated file, a corrupt header or a missing config
raises `CheckpointError` naming the tensor and the file, with every problem of each kind
(the first few shown). Nothing half-loaded survives a failure: no object is returned and the
files are unmapped. MTP-module layers are skipped (logged once).

Formats: an e4m3 Linear becomes `Fp8Weight` (values as stored, fp32 block scales), any
other Linear a `DenseWeight` in its stored dtype; norms, embeddings and the router weight
are cast to `dtype`; `e_score_correction_bias` is float32; routed experts are stacked on a
leading expert axis. A directory with the INT4 marker (int4_format.py) is accounted against
its qweight / scales tensors, and its routed experts load as `Int4Weight`.

`Checkpoint` is the lower-level handle the CPU expert store uses: `Checkpoint.expert_arrays(layer)`
gives zero-copy numpy views of one layer's experts.
"""

from __future__ import annotations

import logging
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.loading import hf_map, int4_format
from jaxmoe.loading.progress import Progress
from jaxmoe.loading.safetensors_index import CheckpointError, SafetensorsCheckpoint, raise_if
from jaxmoe.quant import DenseWeight, Fp8Weight

log = logging.getLogger("jaxmoe.loading")


class Checkpoint:
    """An opened, fully accounted checkpoint: its config and zero-copy views of its tensors.

    DeepSeek-V3's here; another family (jaxmoe/models/<family>/hf_map.py) subclasses it with its
    own `config_type` (`from_file`), `expected_tensors(cfg)`, `expert_tensors(cfg, layer)` and
    `assemble(cfg, leaves)`; its config names the routed experts per layer `n_routed_experts`.
    `mtp_needs_config`: tensors of the layers after the last (an MTP module) are an error unless
    the config declares `num_nextn_predict_layers` (else they are skipped whatever it says)."""

    config_type: Any = ModelConfig
    expected_tensors = staticmethod(hf_map.expected_tensors)
    expert_tensors = staticmethod(hf_map.expert_tensors)
    assemble = staticmethod(hf_map.assemble)
    mtp_needs_config = False

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.cfg = self.config_type.from_file(self.path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        self.specs = self.expected_tensors(self.cfg)
        self.int4_group = int4_format.read_marker(self.path)  # None unless the routed experts are INT4
        if self.int4_group is not None:
            self.specs = int4_format.int4_specs(self.specs, self.int4_group)
        self.block = hf_map.quant_block(self.cfg)
        self.store = SafetensorsCheckpoint(self.path)
        try:
            self.skipped = self._account()
            if self.skipped and self.mtp_needs_config and not self.cfg.num_nextn_predict_layers:
                raise CheckpointError.collect(f"checkpoint {self.path}",
                                              {"unexpected (num_nextn_predict_layers is 0)": [repr(n) for n in self.skipped]})
        except BaseException:
            self.close()
            raise
        if self.skipped:
            layers = sorted({hf_map.mtp_layer(n, self.cfg) for n in self.skipped})
            log.info("%s: skipping %d tensors of the MTP module (layers %s)", self.path, len(self.skipped), layers)

    def _account(self) -> list[str]:
        """Match every checkpoint tensor to a spec; raise CheckpointError listing all problems."""
        st, cfg = self.store, self.cfg
        p: dict[str, list[str]] = {k: [] for k in (
            "missing", "unexpected", "wrong shape", "wrong dtype", "missing weight_scale_inv",
            "weight_scale_inv on a non-FP8 weight", "wrong weight_scale_inv", "inconsistent expert formats")}
        skipped = []
        for name, t in st.tensors.items():
            spec = self.specs.get(name)
            if spec is None:
                owner = self.specs.get(name[: -len("_scale_inv")])
                if name.endswith(hf_map.SCALE_SUFFIX) and owner is not None and owner.kind == "linear":
                    pass  # checked with its weight below
                elif hf_map.mtp_layer(name, cfg) is not None:
                    skipped.append(name)
                else:
                    p["unexpected"].append(f"{name!r} in {t.file}")
                continue
            if t.shape != spec.shape:
                p["wrong shape"].append(f"{name!r} in {t.file}: {list(t.shape)}, expected {list(spec.shape)}")
            if t.dtype not in spec.dtypes:
                p["wrong dtype"].append(f"{name!r} in {t.file}: {t.dtype}, expected one of {sorted(spec.dtypes)}")
        where = f"not in any file of {self.path}"
        p["missing"] = [f"{n!r} ({where})" for n, s in self.specs.items() if n not in st and not s.optional]
        expert_dtypes: dict[str, set] = defaultdict(set)
        for name, spec in self.specs.items():
            t = st.tensors.get(name)
            if spec.kind != "linear" or t is None:
                continue
            if spec.expert is not None:
                expert_dtypes[spec.target].add(t.dtype)
            sname = spec.scale_name
            s = st.tensors.get(sname)
            if t.dtype != hf_map.FP8:
                if s is not None:
                    p["weight_scale_inv on a non-FP8 weight"].append(f"{sname!r} in {s.file} ({name} is {t.dtype})")
                continue
            if s is None:
                p["missing weight_scale_inv"].append(f"{sname!r} for FP8 {name!r} in {t.file}")
                continue
            want = spec.scale_shape(self.block)
            if s.shape != want or s.dtype not in hf_map.SCALE_DTYPES:
                p["wrong weight_scale_inv"].append(
                    f"{sname!r} in {s.file}: {s.dtype} {list(s.shape)}, expected F32 {list(want)} "
                    f"(weight {list(t.shape)}, block {list(self.block)})"
                )
        p["inconsistent expert formats"] = [
            f"{tg}: experts stored as {sorted(d)} in {self.path}" for tg, d in expert_dtypes.items() if len(d) > 1
        ]
        raise_if(f"checkpoint {self.path}", p)
        return skipped

    # ---- access -----------------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray:
        """Read-only zero-copy numpy view of a tensor."""
        return self.store.array(name)

    def is_fp8(self, name: str) -> bool:
        return self.store.info(name).dtype == hf_map.FP8

    def expert_arrays(self, layer: int) -> dict[str, list[np.ndarray]]:
        """Zero-copy views of one MoE layer's routed experts (no copy of the FP8 data).

        {"gate_proj": [E views [I, H]], "up_proj": [...], "down_proj": [E views [H, I]]}, and for
        FP8 checkpoints "gate_proj_scale_inv", ... with the fp32 block scales (block `self.block`).
        `safetensors_index.stacked_view` turns a list into one [E, ...] view when the file
        layout allows it.
        """
        if self.int4_group is not None:  # {"gate_proj": qweights, "gate_proj_scales": ...}
            return int4_format.int4_expert_arrays(self.expert_tensors(self.cfg, layer), self.array)
        out: dict[str, list[np.ndarray]] = {}
        for proj, specs in self.expert_tensors(self.cfg, layer).items():
            out[proj] = [self.array(s.name) for s in specs]
            if self.is_fp8(specs[0].name):
                out[f"{proj}_scale_inv"] = [self.array(s.scale_name) for s in specs]
        return out

    def _loaded(self, load_experts: bool):
        """(spec, [its name, and its FP8 scales' where stored]) of every tensor a load reads (no MTP
        tensors); without the routed experts when load_experts is False."""
        for s in self.specs.values():
            if s.name in self.store and (load_experts or s.expert is None):
                yield s, [s.name] + ([s.scale_name] if s.kind == "linear" and s.scale_name in self.store else [])

    def load_size(self, load_experts: bool = True) -> tuple[int, int]:
        """(tensors, bytes) a load reads: every accounted tensor (no MTP tensors), its bytes with
        those of its FP8 scales; without the routed experts when load_experts is False."""
        loaded = list(self._loaded(load_experts))
        return len(loaded), sum(self.store.info(n).nbytes for _, names in loaded for n in names)

    def resident_arrays(self) -> list[np.ndarray]:
        """Zero-copy views of every tensor a load reads besides the routed experts (with their FP8
        scales): what the loader asks the disk for (`loading.readahead`) while the experts pack."""
        return [self.array(n) for _, names in self._loaded(False) for n in names]

    def close(self) -> None:
        if hasattr(self, "store"):
            self.store.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open and account a checkpoint without loading it (raises CheckpointError)."""
    return Checkpoint(path)


def load_checkpoint(
    path: str | Path | Checkpoint,
    *,
    dtype: Any = jnp.float32,
    progress: bool | Progress | None = None,
    device: jax.Device | None = None,
    load_experts: bool = True,
    host_linears: bool = False,
    checkpoint_type: type[Checkpoint] = Checkpoint,
) -> tuple[ModelConfig, Any]:
    """Read config.json and every tensor of a checkpoint into `(ModelConfig, Weights)` (another
    family's config and pytree with its `checkpoint_type`).

    dtype: for norms, embeddings and the router weight (Linears keep their stored format).
    path: a directory, or an open Checkpoint (left open).
    progress: a bar on stderr with GiB/s and the time left; None = on a terminal once the load
      passes ~1 s, elsewhere a line every 10 s of a long load; or a Progress to update (left
      open: a caller's bar over more than this call).
    device: where the arrays go (default: JAX's default device).
    load_experts: False leaves `MoEWeights.experts = None` (a host expert store fills them in).
    host_linears: Linears stay numpy arrays (values: zero-copy views of the files), for
      a caller that repacks them for the CPU kernels straight from there (jaxmoe.load) and
      puts the rest on a device itself; the views outlive the checkpoint's close.
    """
    own = not isinstance(path, Checkpoint)
    ck = checkpoint_type(path) if own else path
    try:
        weights = _build(ck, np.dtype(dtype), device, progress, load_experts, host_linears)
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # drop views held by the failed frames, so unmapping works
        if own:
            ck.close()
        raise
    if own:
        ck.close()
    return ck.cfg, weights


def _build(ck: Checkpoint, dtype: np.dtype, device, progress: bool | Progress | None, load_experts: bool,
           host_linears: bool = False):
    specs = [s for s in ck.specs.values() if s.name in ck.store and (load_experts or s.expert is None)]
    if isinstance(progress, Progress):
        bar, close_bar = progress, False
    else:
        bar, close_bar = Progress(*ck.load_size(load_experts), enabled=progress, label=f"loading {ck.path.name}"), True

    def put(a: np.ndarray, dt=None) -> jax.Array:
        # One copy of mmap'd views (JAX on CPU would alias them and pin the file mapping), into a
        # 64-byte aligned buffer that JAX on CPU then takes without a second copy.
        return jax.device_put(host_copy(a, dt), device)

    leaves: dict[str, Any] = {}
    pending: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = defaultdict(list)
    n_experts = ck.cfg.n_routed_experts
    try:
        for s in specs:
            w = ck.array(s.name)
            fp8 = s.kind == "linear" and ck.is_fp8(s.name)
            scale = ck.array(s.scale_name).astype(np.float32) if fp8 else None
            if s.kind in int4_format.INT4_KINDS:  # INT4 routed experts -> Int4Weight
                int4_format.collect_int4(leaves, pending, s, w, n_experts, put)
            elif s.expert is not None:
                pending[s.target].append((w, scale))
                if len(pending[s.target]) == n_experts:
                    ws, ss = zip(*pending.pop(s.target))
                    leaves[s.target] = _linear(_stack(ws), None if ss[0] is None else np.stack(ss), ck.block, put)
            elif s.kind == "linear":
                leaves[s.target] = _linear(w, scale, ck.block, _keep if host_linears else put)
            else:
                leaves[s.target] = put(w, np.float32 if s.kind == "bias" else dtype)
            bar.update(1, ck.store.info(s.name).nbytes + (ck.store.info(s.scale_name).nbytes if fp8 else 0))
    finally:
        if close_bar:
            bar.close()
    if "lm_head" not in leaves:  # tied embeddings
        leaves["lm_head"] = DenseWeight(leaves["embed_tokens"])
    return ck.assemble(ck.cfg, leaves)


def _keep(a: np.ndarray) -> np.ndarray:
    return a


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    off = -buf.ctypes.data % 64
    return buf[off : off + nbytes].view(dt).reshape(shape)


def host_copy(a: np.ndarray, dtype=None) -> np.ndarray:
    """A copy of `a` (cast to dtype) in a 64-byte aligned buffer of its own: what JAX on the CPU
    takes as it is (jax.device_put aliases aligned host arrays), so a load copies a tensor once."""
    a = np.asarray(a)
    out = _aligned_empty(a.shape, dtype or a.dtype)
    np.copyto(out, a, casting="unsafe")
    return out


def _stack(views: list[np.ndarray]) -> np.ndarray:
    """np.stack into an aligned buffer (host_copy)."""
    out = _aligned_empty((len(views), *views[0].shape), views[0].dtype)
    for i, v in enumerate(views):
        out[i] = v
    return out


def _linear(w: np.ndarray, scale: np.ndarray | None, block: tuple[int, int], put) -> Any:
    if scale is None:
        return DenseWeight(put(w))
    return Fp8Weight(put(w), put(scale), block=block)
