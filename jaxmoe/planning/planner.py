"""Performance model and planner: how long a prefill takes by strategy, which one to use,
and how fast decode goes, for a checkpoint config on a box described in jaxmoe/configs/hardware/.

Strategies of a prefill:
- "cpu": routed experts on the CPU (our kernels), everything else on the GPU (or, with no
  GPU, everything on the CPU); chunks of `cpu_chunk` tokens, run layer after layer.
- "slp": stream-loading prefill on one GPU: per chunk, each MoE layer's experts go over PCIe
  (double-buffered: the transfer of unit u+1 overlaps the compute of unit u) and run there.
- "dslp": SLP on two GPUs with SmallEP: each streams and computes half of every layer's
  experts; attention replicated on both or split by sequence (each device its share of the
  chunk's tokens: streaming/sequence_split.py); the plan takes the faster (`attention="auto"`).
- "resident": the whole model, experts included, fits on one GPU.

Time per chunk comes from a small event simulation of the SLP pipeline (one copy engine and
one compute stream per GPU, at most `buffers` stream units resident: the order
streaming/slp.py issues). Compute = FLOPs / (peak x efficiency), with memory-bound floors
from bytes / bandwidth. The chunk size, the stream granularity (parts per layer) and the
number of buffers are searched within the GPU memory left beside the resident weights, the
latent cache and the activations; the fastest feasible combination is the estimate.

On a box without GPU whose profile has a "cpu_kernels" block (this-machine), "cpu" prefill and
decode are the engine's CPU-only steps, modelled kernel call by kernel call with attention over
the power-of-two key window (planning/kernel_model.py).

Hardware profiles and their calibration: planning/hardware.py.

    hw = load_hardware("reference-box")
    plan = plan_prefill(cfg, hw, n_tokens)           # -> Plan; plan.choice: PrefillEstimate
    plan = plan_prefill(cfg, hw, n_tokens, force="slp")   # or JAXMOE_PREFILL_STRATEGY=slp
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from jaxmoe.planning.cost_model import BF16, ModelCosts, model_costs
from jaxmoe.planning.hardware import Hardware, load_hardware
from jaxmoe.planning.kernel_model import KernelModel
from jaxmoe.planning.strategies import FORCE_ENV, PLANNED, STREAMED, PrefillStrategy

__all__ = ["STRATEGIES", "Hardware", "load_hardware", "PrefillEstimate", "Plan", "estimate_prefill", "plan_prefill",
           "prefill_threshold", "DecodeEstimate", "estimate_decode", "kernel_model"]
STRATEGIES = PLANNED
# on equal predicted time: fewer transfers, fewer GPUs
PREFERENCE = (PrefillStrategy.RESIDENT, PrefillStrategy.SLP, PrefillStrategy.DSLP, PrefillStrategy.CPU)
PARTS = (1, 2, 4, 8, 16)
BUFFERS = (2, 4, 8, 16, 32)
MIN_CHUNK = 128
ATTENTION = ("replicated", "sequence", "auto")  # dslp's attention; streaming/slp.py runs the first two


# ---- rates ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rates:
    gemm: float  # FLOP/s
    attn: float
    mem: float  # B/s
    pcie: float
    cpu: float
    cpu_read: float  # B/s, expert GEMV
    overhead: float  # s per layer per chunk


def _rates(cfg: Any, hw: Hardware) -> _Rates:
    e, c, g = hw.efficiency, hw.cpu, hw.gpu
    cpu = c.cores * c.ghz * 1e9 * c.flops_per_cycle * e.cpu_gemm
    cpu_read = c.read_gbps * 1e9 * e.cpu_gemv_frac_of_read
    if g is None:
        return _Rates(cpu, cpu, cpu_read, math.inf, cpu, cpu_read, e.layer_overhead_us * 1e-6)
    peak = g.fp8_tflops if (cfg.quantization is not None and e.gpu_gemm_dtype == "fp8") else g.bf16_tflops
    return _Rates(peak * 1e12 * e.gpu_gemm, g.bf16_tflops * 1e12 * e.gpu_attention, g.mem_gbps * 1e9 * e.gpu_mem,
                  g.pcie_gbps * 1e9, cpu, cpu_read, e.layer_overhead_us * 1e-6)


# ---- prefill --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrefillEstimate:
    strategy: str
    n_tokens: int
    seconds: float  # math.inf when infeasible
    chunk_tokens: int = 0
    parts_per_layer: int = 1
    buffers: int = 2  # stream units resident at once
    transfer_s: float = 0.0  # copy-engine busy time (per GPU), all chunks
    compute_s: float = 0.0  # compute busy time (per GPU, or CPU), all chunks
    attention: str = "replicated"  # dslp: "replicated" or "sequence" (split by tokens); streaming/slp.py reads it
    stream_dense: bool = False  # MoE layers' MLA/router/shared weights streamed with the experts; streaming/slp.py reads it
    reason: str = ""  # why infeasible

    @property
    def name(self) -> str:  # what streaming/slp.py reads
        return self.strategy

    @property
    def feasible(self) -> bool:
        return math.isfinite(self.seconds)

    @property
    def tok_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.feasible and self.seconds > 0 else 0.0

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tokens // self.chunk_tokens) if self.chunk_tokens else 0

    @property
    def bound(self) -> str:
        """"transfer" or "compute"; "buffers" when neither explains the time: device memory
        left too few stream buffers for the transfers to run ahead (e.g. through attention)."""
        if not self.feasible:
            return "infeasible"
        if self.strategy not in STREAMED:
            return "compute"
        if self.seconds > 1.15 * max(self.transfer_s, self.compute_s):
            return "buffers"
        return "transfer" if self.transfer_s > self.compute_s else "compute"


def _layer_s(mc: ModelCosts, r: _Rates, start: int, n: int, moe: bool) -> float:
    """One layer's resident part (MLA, dense MLP or router + shared experts) for n tokens."""
    lin = max(n * mc.layer_resident_flops(moe) / r.gemm, mc.layer_resident_bytes(moe) / r.mem)
    return lin + mc.attention_flops(start, n) / r.attn + r.overhead


def _routed_s(mc: ModelCosts, r: _Rates, n: int, fraction: float) -> float:
    """A fraction of one layer's routed experts on the GPU for n tokens (read once from HBM)."""
    return max(n * fraction * mc.routed_flops_per_layer / r.gemm, fraction * mc.layer_experts_bytes / r.mem)


def _cpu_routed_s(mc: ModelCosts, r: _Rates, n: int) -> float:
    return max(n * mc.routed_flops_per_layer / r.cpu, mc.touched_experts(n) * mc.expert_bytes / r.cpu_read)


def _pipeline(items: list[tuple[float, float | None]], buffers: int = 2,
              dense: dict[int, float] | None = None) -> tuple[float, float, float]:
    """Simulate one chunk: items in issue order, (compute s, None) or (compute s, transfer s) for
    a streamed unit, on one copy engine and one compute stream. T(v) starts when T(v-1) is done
    and C(v-buffers) has finished (its buffer freed), as streaming/slp.py issues them.
    dense (stream_dense): streamed unit v -> seconds of its layer's non-expert weights, moved
    first in T(v) (included in its transfer s); the unstreamed item just before unit v (the
    layer's attention) waits for them. Returns (elapsed, copy busy, compute busy)."""
    transfers = [t for _, t in items if t is not None]
    dense = dense or {}
    tr_end: list[float] = []
    dense_end: dict[int, float] = {}

    def issue(v: int, after: float) -> None:
        if v < len(transfers):
            start = max(tr_end[-1] if tr_end else 0.0, after)
            if v in dense:
                dense_end[v] = start + dense[v]
            tr_end.append(start + transfers[v])

    for v in range(buffers - 1):
        issue(v, 0.0)
    comp_end: list[float] = []
    clock = busy = 0.0
    for i, (c, t) in enumerate(items):
        busy += c
        if t is None:
            u = len(comp_end)
            if u in dense and i + 1 < len(items) and items[i + 1][1] is not None:  # the attention of unit u's layer
                clock = max(clock, dense_end[u])
            clock += c
            continue
        u = len(comp_end)
        clock = max(clock, tr_end[u]) + c
        comp_end.append(clock)
        issue(u + buffers - 1, comp_end[u - 1] if u else 0.0)
    return clock, sum(transfers), busy


def _chunks(n_tokens: int, chunk: int):
    for s in range(0, n_tokens, chunk):
        yield s, min(chunk, n_tokens - s)


def _stream(mc: ModelCosts, hw: Hardware, r: _Rates, n_tokens: int, n_dev: int, parts: int, buffers: int,
            attention: str, chunk: int | None, stream_dense: bool, scores: int) -> PrefillEstimate:
    name = PrefillStrategy.SLP if n_dev == 1 else PrefillStrategy.DSLP
    g = hw.gpu
    e = mc.cfg.n_routed_experts
    window = -(-e // (parts * n_dev))
    unit_bytes = window * mc.expert_bytes
    resident = mc.resident_bytes
    dense_bytes = 0.0  # stream_dense: per MoE layer, travelling with its first unit (streaming/slp.py)
    if stream_dense:  # MoE layers' MLA + router + shared experts travel with their experts
        dense_bytes = mc.layer_resident_bytes(True)
        resident -= mc.moe_layers * dense_bytes
    split = attention == "sequence" and n_dev > 1
    act = mc.activation_bytes_per_token(scores) / (n_dev if split else 1)
    in_window = min(buffers, -(-buffers // parts))  # first units among `buffers` resident ones, at most
    free = (g.memory_gb * 1e9 * hw.efficiency.gpu_usable_memory - resident - buffers * unit_bytes
            - in_window * dense_bytes - n_tokens * mc.kv_bytes_per_token)
    limit = int(free // act) if free > 0 else 0
    if limit < min(MIN_CHUNK, n_tokens):
        return PrefillEstimate(name, n_tokens, math.inf, parts_per_layer=parts, buffers=buffers, attention=attention,
                               stream_dense=stream_dense,
                               reason=f"{parts} part(s)/layer x {buffers} buffers: {free / 1e9:.1f} GB left "
                                      f"per GPU for activations")
    chunk = min(chunk or n_tokens, limit, n_tokens)
    # fake devices share one set of cores: their work adds up instead of running side by side
    serial = n_dev if g.shared_compute else 1
    share = 1.0 / n_dev if split else 1.0
    total = copy = busy = 0.0
    for s, n in _chunks(n_tokens, chunk):
        comm = n * mc.cfg.hidden_size * BF16 / r.pcie if n_dev > 1 else 0.0  # psum (and all-gather) of [n, H]
        items: list[tuple[float, float | None]] = []
        dense: dict[int, float] = {}
        for layer in range(mc.n_layers):
            moe = mc.cfg.is_moe_layer(layer)
            items.append((serial * share * _layer_s(mc, r, s, n, moe) + (comm if split else 0.0), None))
            if moe:
                unit = serial * _routed_s(mc, r, n, window / e) + comm
                if dense_bytes:
                    dense[sum(t is not None for _, t in items)] = dense_bytes / r.pcie
                items += [(unit, (unit_bytes + (dense_bytes if p == 0 else 0.0)) / r.pcie) for p in range(parts)]
        items.append((mc.lm_head_flops() / r.gemm, None))
        t, c, b = _pipeline(items, buffers, dense)
        total, copy, busy = total + t, copy + c, busy + b
    return PrefillEstimate(name, n_tokens, total, chunk, parts, buffers, copy, busy, attention,
                           stream_dense=stream_dense)


def estimate_prefill(cfg: Any, hw: Hardware, n_tokens: int, strategy: str, *, chunk: int | None = None,
                     parts_per_layer: int | None = None, buffers: int | None = None, attention: str = "replicated",
                     stream_dense: bool | str = False, fused_attention: bool = True,
                     cpu_chunk: int = 256) -> PrefillEstimate:
    """Predicted prefill of one prompt of n_tokens by `strategy` (see the module docstring).

    chunk / parts_per_layer / buffers: fixed instead of searched. attention ("dslp"):
    "replicated", "sequence" (attention and the per-token dense work split by tokens over the
    two GPUs, plus an all-gather per layer) or "auto" (the faster of the two; ties: replicated;
    other strategies: replicated). stream_dense:
    stream the MoE layers' MLA, router and shared experts with their first expert unit instead
    of keeping them resident (streaming/slp.py: frees device memory for larger chunks and
    buffers, costs their transfer per chunk), or "auto" (slp/dslp: True where predicted faster
    -- ties: False --, e.g. where only it fits; recorded in the estimate).
    fused_attention=False: attention scores materialized per chunk over the whole context
    (modelled only: model/mla.py attends blocked over keys), which caps the chunk by device
    memory."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown prefill strategy {strategy!r}; known: {STRATEGIES}")
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if stream_dense not in (False, True, "auto"):
        raise ValueError(f"stream_dense must be True, False or 'auto', got {stream_dense!r}")
    if stream_dense == "auto" and attention != "auto":
        kw = dict(chunk=chunk, parts_per_layer=parts_per_layer, buffers=buffers, attention=attention,
                  fused_attention=fused_attention, cpu_chunk=cpu_chunk)
        if strategy not in STREAMED:
            return estimate_prefill(cfg, hw, n_tokens, strategy, stream_dense=False, **kw)
        ests = [estimate_prefill(cfg, hw, n_tokens, strategy, stream_dense=d, **kw) for d in (False, True)]
        return min(ests, key=lambda e: float(f"{e.seconds:.6g}"))  # ties: the first, resident
    if attention == "auto":
        kw = dict(chunk=chunk, parts_per_layer=parts_per_layer, buffers=buffers, stream_dense=stream_dense,
                  fused_attention=fused_attention, cpu_chunk=cpu_chunk)
        if strategy != PrefillStrategy.DSLP:
            return estimate_prefill(cfg, hw, n_tokens, strategy, attention="replicated", **kw)
        ests = [estimate_prefill(cfg, hw, n_tokens, strategy, attention=a, **kw) for a in ATTENTION[:2]]
        return min(ests, key=lambda e: float(f"{e.seconds:.6g}"))  # ties: the first, replicated
    mc, r = model_costs(cfg), _rates(cfg, hw)
    scores = 0 if fused_attention else n_tokens
    inf = lambda why: PrefillEstimate(strategy, n_tokens, math.inf, reason=why)  # noqa: E731
    if strategy == PrefillStrategy.CPU and hw.gpu is None and hw.kernels is not None:
        chunk = chunk or cpu_chunk
        total, _ = kernel_model(cfg, hw).prefill(n_tokens, chunk)
        return PrefillEstimate(PrefillStrategy.CPU, n_tokens, total, chunk, compute_s=total)
    if strategy == PrefillStrategy.CPU:
        total = 0.0
        chunk = chunk or cpu_chunk
        for s, n in _chunks(n_tokens, chunk):
            for layer in range(mc.n_layers):
                moe = cfg.is_moe_layer(layer)
                total += _layer_s(mc, r, s, n, moe)
                if moe:
                    hop = 0.0 if hw.gpu is None else 2 * n * cfg.hidden_size * BF16 / r.pcie
                    total += hop + _cpu_routed_s(mc, r, n)
            total += mc.lm_head_flops() / r.gemm
        return PrefillEstimate(PrefillStrategy.CPU, n_tokens, total, chunk, compute_s=total)
    need = PrefillStrategy(strategy).accelerators
    if hw.n_gpus < need:
        return inf(f"needs {need} GPU(s), {hw.name} has {hw.n_gpus}")
    if strategy == PrefillStrategy.RESIDENT:
        free = (hw.gpu.memory_gb * 1e9 * hw.efficiency.gpu_usable_memory - mc.total_bytes
                - n_tokens * mc.kv_bytes_per_token)
        limit = int(free // mc.activation_bytes_per_token(scores)) if free > 0 else 0
        if limit < min(MIN_CHUNK, n_tokens):
            return inf(f"the model ({mc.total_bytes / 1e9:.1f} GB) does not fit in {hw.gpu.memory_gb} GB")
        chunk = min(chunk or n_tokens, limit, n_tokens)
        total = sum(_layer_s(mc, r, s, n, cfg.is_moe_layer(j)) + (_routed_s(mc, r, n, 1.0) if cfg.is_moe_layer(j) else 0)
                    for s, n in _chunks(n_tokens, chunk) for j in range(mc.n_layers))
        total += -(-n_tokens // chunk) * mc.lm_head_flops() / r.gemm
        return PrefillEstimate(PrefillStrategy.RESIDENT, n_tokens, total, chunk, compute_s=total)
    options = [(p, b) for p in ([parts_per_layer] if parts_per_layer else PARTS)
               for b in ([buffers] if buffers else BUFFERS) if buffers or b <= 2 * p]
    ests = [_stream(mc, hw, r, n_tokens, need, p, b, attention, chunk, stream_dense, scores) for p, b in options]
    return min(ests, key=lambda x: (x.seconds, x.parts_per_layer, x.buffers))


@dataclasses.dataclass(frozen=True)
class Plan:
    choice: PrefillEstimate
    estimates: dict[str, PrefillEstimate]
    forced: bool = False


def plan_prefill(cfg: Any, hw: Hardware, n_tokens: int, *, force: str | None = None,
                 strategies: tuple[str, ...] = STRATEGIES, **kw) -> Plan:
    """The fastest feasible strategy for a prompt of n_tokens (ties broken by `PREFERENCE`).

    force: a strategy to use whatever the model says (also from the environment variable
    JAXMOE_PREFILL_STRATEGY; "auto" there means no force); raises ValueError if that strategy
    cannot run on `hw`. dslp's attention, and whether slp/dslp stream the MoE layers' dense
    weights, are chosen ("auto") unless `attention=` / `stream_dense=` is given.
    """
    kw.setdefault("attention", "auto")
    kw.setdefault("stream_dense", "auto")
    force = force or os.environ.get(FORCE_ENV) or None
    if force == "auto":
        force = None
    ests = {s: estimate_prefill(cfg, hw, n_tokens, s, **kw) for s in strategies}
    if force is not None:
        est = ests.get(force) or estimate_prefill(cfg, hw, n_tokens, force, **kw)
        if not est.feasible:
            raise ValueError(f"forced prefill strategy {force!r} cannot run on {hw.name}: {est.reason}")
        return Plan(est, ests, forced=True)
    best = min((e for e in ests.values() if e.feasible), key=lambda e: (float(f"{e.seconds:.6g}"), PREFERENCE.index(e.strategy)),
               default=None)
    if best is None:
        raise ValueError(f"no prefill strategy fits {n_tokens} tokens on {hw.name}: "
                         + "; ".join(f"{s}: {e.reason}" for s, e in ests.items()))
    return Plan(best, ests)


def prefill_threshold(cfg: Any, hw: Hardware, strategy: str = "slp", against: str = "cpu",
                      max_tokens: int | None = None) -> int | None:
    """Smallest prompt length from which `strategy` beats `against` (None: never, up to max_tokens),
    each in its best form as a plan takes it (dslp's attention and the streamed dense weights
    chosen: "auto")."""
    top = max_tokens or cfg.max_position_embeddings

    def wins(n: int) -> bool:
        a, b = (estimate_prefill(cfg, hw, n, s, attention="auto", stream_dense="auto") for s in (strategy, against))
        return a.seconds < b.seconds

    hi = 1
    while not wins(hi):
        hi *= 2
        if hi > top:
            return None
    lo = hi // 2
    while hi - lo > max(1, lo // 64):  # ~1.5 % resolution
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if wins(mid) else (mid, hi)
    return hi


# ---- decode ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeEstimate:
    seconds: float  # per step (one token for each of `batch` requests)
    expert_s: float  # CPU: the routed experts of every MoE layer
    resident_s: float  # GPU (or CPU): everything else, with the latent cache
    overhead_s: float
    bytes_per_token: float
    attention_s: float = 0.0  # latent-space attention over the context (FLOPs)
    batch: int = 1

    @property
    def tok_per_s(self) -> float:
        """Tokens per second over all `batch` requests."""
        return self.batch / self.seconds

    @property
    def tok_per_s_per_request(self) -> float:
        return 1.0 / self.seconds


def kernel_model(cfg: Any, hw: Hardware) -> KernelModel:
    """The CPU-only step model of `hw` (its "cpu_kernels" block) for `cfg`."""
    if hw.kernels is None:
        raise ValueError(f"hardware profile {hw.name} has no cpu_kernels block")
    return KernelModel(cfg, hw.cpu, hw.kernels, hw.cpu.read_gbps * 1e9 * hw.efficiency.cpu_gemv_frac_of_read)


def estimate_decode(cfg: Any, hw: Hardware, *, context: int = 4096, batch: int = 1,
                    n_slots: int | None = None) -> DecodeEstimate:
    """`batch` requests decoding at `context` tokens each.

    With a GPU (or without a "cpu_kernels" block): experts on the CPU (read-bound GEMV over the
    experts the batch touches), the rest on the GPU (weights + latent caches read once per
    step), absorbed attention over the context (FLOPs, on the GPU or the CPU), and
    `decode_layer_overhead_us` per MoE layer with a GPU (one round trip each) or per layer
    without one. Without a GPU but with "cpu_kernels": the engine's fused CPU step
    (planning/kernel_model.py: the power-of-two row bucket of `batch` rows, capped by n_slots,
    through the kernels, attention over the power-of-two key window)."""
    mc, r = model_costs(cfg), _rates(cfg, hw)
    if hw.gpu is None and hw.kernels is not None:
        t = kernel_model(cfg, hw).decode(batch, context, n_slots)
        touched = mc.touched_experts(batch) * mc.expert_bytes * mc.moe_layers
        return DecodeEstimate(t.seconds, t.experts, t.linears, t.fixed,
                              mc.decode_resident_bytes + touched + batch * context * mc.kv_bytes_per_token,
                              t.attention, batch)
    expert_bytes = mc.moe_layers * min(batch * cfg.num_experts_per_tok, mc.touched_experts(batch)) * mc.expert_bytes
    resident_bytes = mc.decode_resident_bytes + batch * context * mc.kv_bytes_per_token
    expert_s = expert_bytes / r.cpu_read
    resident_s = resident_bytes / (r.cpu_read if hw.gpu is None else r.mem)
    attention_s = batch * cfg.num_hidden_layers * mc.absorbed_attention_flops(context) / r.attn
    layers = mc.moe_layers if hw.gpu is not None else cfg.num_hidden_layers
    overhead = layers * hw.efficiency.decode_layer_overhead_us * 1e-6
    return DecodeEstimate(expert_s + resident_s + attention_s + overhead, expert_s, resident_s, overhead,
                          expert_bytes + resident_bytes, attention_s, batch)
