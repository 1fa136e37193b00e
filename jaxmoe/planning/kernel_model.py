"""Time of the engine's CPU-only steps (cpu_ext kernels + XLA attention), from first principles.

On a box without accelerator the `cpu-only` preset runs one jitted program per step: every
Linear through cpu_ext (FP8 / bf16 `HostLinear`, kv_b_proj as per-head grouped matrices), the
routed experts through the fused MoE kernel, and attention, norms, RoPE and the router in
XLA. A step's time is the sum of:

- **Linears.** A call with M rows takes the GEMM path from `gemm_min_rows` rows (per expert
  for the MoE: the mean rows per active expert), else the GEMV path (cpu_ext's rule):
    GEMM: W x (decode_cycles / (cores x GHz) + 2 M / (peak x gemm))     (f32 panels decoded once per call)
    GEMV: W x max(1 / (cores x GHz x gemv_weights_per_cycle),            (FP8 decode: compute-bound on AVX2)
                  bytes per weight / (read bandwidth x cpu_gemv_frac_of_read),
                  2 M / (peak x gemv))                                  (FMA-bound from a few rows)
  plus `call_us` per kernel call. W = weights of the matrix, peak = cores x GHz x FLOP/cycle.
  The dense Linears see every row of the step, padding included (width and row buckets); the
  MoE sees only real tokens, spread over the touched experts (uniform routing).
- **Attention** (XLA f32 dots; the family's `attention_costs`): every query row attends over the
  whole power-of-two key window of the step (`kv_window`: padding and masked keys cost the
  same as visible ones). MLA attends absorbed (decode, narrow chunks: kv_b_proj's halves
  applied to the queries and outputs as two grouped kernel calls) or expanded (wide prompt
  chunks, where it costs less, `step_shapes.expanded_is_cheaper` on the CPU: the window's
  latents through kv_b_proj, one kernel call per 128-key block); GQA attends over its cached
  keys and values with per-head batched dots, as MLA's expanded form:
    2 x rows x window x heads x F FLOPs / (peak x eff),  F = 2 kv_lora_rank + rope, eff =
      attention (MLA absorbed) or F = nope + rope + v (MLA expanded), 2 head_dim (GQA),
      eff = attention_expanded
    + rows x window x heads x score_ns                                   (mask, exp, online softmax)
    + slots x window x layers x cache numbers per position x cache itemsize / cache_gbps
  (the last: each sequence's cache window read through the attention's passes -- what a
  decode step at long context pays; f32 cache, jaxmoe.load's default dtype).
- **Fixed costs**: `layer_us` per layer per step (the small XLA ops, FFI hand-offs) and
  `token_layer_ns` per row per layer (norms, RoPE, router, residuals).

The coefficients live in the profile's "cpu_kernels" block (jaxmoe/configs/hardware/this-machine.json,
with where each comes from). Without that block the planner keeps its generic formulas.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxmoe import step_shapes
from jaxmoe.planning.cost_model import ModelCosts, model_costs
from jaxmoe.step_shapes import CPU_ATTENTION_KEY_BLOCK, expanded_is_cheaper, next_chunk, row_bucket, width_bucket


@dataclasses.dataclass(frozen=True)
class CpuKernels:
    """Coefficients of the CPU-only step model (see the module docstring)."""

    gemm: float  # of peak: FMA rate of the Linear GEMM path per row
    gemm_decode_cycles: float  # core-cycles per weight per GEMM call (panel decode)
    moe_gemm: float  # of peak: the fused MoE's GEMM path
    moe_decode_cycles: float
    gemv: float  # of peak: the GEMV path once it is FLOP-bound (several rows)
    gemv_weights_per_cycle: float  # per core: FP8 weights decoded per cycle by the GEMV path
    moe_gemv: float = 0.0  # the fused MoE's GEMV path (0: as the Linears')
    moe_gemv_weights_per_cycle: float = 0.0
    gemm_min_rows: int = 24
    call_us: float = 0.0  # per kernel call
    attention: float = 0.5  # of peak: XLA's attention dots, absorbed form (latent keys: a few large dots)
    attention_expanded: float = 0.0  # expanded form (per-head batched dots over key blocks; 0: as absorbed)
    score_ns: float = 0.0  # per score (row x head x key)
    cache_gbps: float = 0.0  # GB/s at which a step's attention streams each slot's latent window (0: free)
    layer_us: float = 0.0  # per layer per step
    token_layer_ns: float = 0.0  # per row per layer


def kv_window(end: int, max_len: int | None = None) -> int:
    """The engine's key window for a step whose longest row ends at `end` (no cap: None)."""
    return step_shapes.kv_window(end, max_len or 1 << 62)


def _binomial(n: int, p: float):
    """(m, P[m]) for m = 0..n of Binomial(n, p), by the recurrence (no factorials)."""
    if p >= 1.0:
        yield n, 1.0
        return
    q, pr = 1.0 - p, (1.0 - p) ** n
    for m in range(n + 1):
        yield m, pr
        pr *= (n - m) / (m + 1) * p / q


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Seconds of one step by part."""

    linears: float  # dense Linears + lm_head + kv_b_proj (absorption or expansion) (kernels)
    experts: float  # routed experts (kernels)
    attention: float  # XLA
    fixed: float  # per-layer and per-row costs

    @property
    def seconds(self) -> float:
        return self.linears + self.experts + self.attention + self.fixed


class KernelModel:
    """The step model for one config on one CPU (`cpu`: hardware.Cpu; `read`: B/s the GEMV
    can stream, i.e. read bandwidth x cpu_gemv_frac_of_read)."""

    def __init__(self, cfg: Any, cpu, kernels: CpuKernels, read: float, cache_itemsize: int = 4):
        self.cfg, self.k, self.read, self.cache_itemsize = cfg, kernels, read, cache_itemsize
        self.mc: ModelCosts = model_costs(cfg)
        self.cycles = cpu.cores * cpu.ghz * 1e9  # core-cycles per second
        self.peak = self.cycles * cpu.flops_per_cycle
        self.fp8 = 1 if cfg.quantization is not None else 2

    # ---- one matrix ------------------------------------------------------------------------
    def gemv_per_weight(self, rows: float, bytes_per_weight: float, moe: bool = False) -> float:
        k = self.k
        wpc = (k.moe_gemv_weights_per_cycle if moe else 0.0) or k.gemv_weights_per_cycle
        eff = (k.moe_gemv if moe else 0.0) or k.gemv
        return max(1.0 / (self.cycles * wpc), bytes_per_weight / self.read, 2.0 * rows / (self.peak * eff))

    def linear(self, weights: float, rows: int, bytes_per_weight: float | None = None) -> float:
        """One kernel call: a [N, K] matrix (weights = N x K) applied to `rows` rows."""
        k = self.k
        bpw = self.fp8 if bytes_per_weight is None else bytes_per_weight
        if rows >= k.gemm_min_rows:
            per = k.gemm_decode_cycles / self.cycles + 2.0 * rows / (self.peak * k.gemm)
        else:
            per = self.gemv_per_weight(rows, bpw)
        return weights * per + k.call_us * 1e-6

    def experts(self, n_tokens: int) -> float:
        """One MoE layer's routed experts for n real tokens (one fused call)."""
        if n_tokens <= 0:
            return 0.0
        mc, k = self.mc, self.k
        w_e = mc.expert_weights
        rows = n_tokens * self.cfg.num_experts_per_tok
        touched = mc.touched_experts(n_tokens)
        per_expert = rows / touched
        if per_expert >= k.gemm_min_rows:
            t = touched * w_e * k.moe_decode_cycles / self.cycles + rows * w_e * 2.0 / (self.peak * k.moe_gemm)
        else:  # each expert's rows (binomial under uniform routing) on the GEMV path
            e = self.cfg.n_routed_experts
            t = e * w_e * sum(pr * self.gemv_per_weight(m, self.fp8, moe=True)
                              for m, pr in _binomial(n_tokens, self.cfg.num_experts_per_tok / e) if m)
        return t + k.call_us * 1e-6

    # ---- one step --------------------------------------------------------------------------
    def step(self, rows: int, tokens: int, window: int, logit_rows: int, slots: int = 1) -> StepTime:
        """One step over all layers: `rows` rows through the dense kernels and attention (all
        slots' columns, padding included), `tokens` real tokens through the routed experts,
        keys over `window` cache slots of each of `slots` sequences, `logit_rows` rows
        through lm_head."""
        cfg, mc, k, a = self.cfg, self.mc, self.k, self.mc.attn
        layers, heads = cfg.num_hidden_layers, a.heads
        expanded = a.absorbs and rows > slots and expanded_is_cheaper(cfg, rows // slots, window, on_cpu=True)
        lin = exp = 0.0
        for layer in range(layers):
            moe = cfg.is_moe_layer(layer)
            lin += sum(self.linear(n * kk, rows) for n, kk in mc.layer_matrices(moe))
            if expanded:  # the window's latents through kv_b_proj, one call per key block
                blocks = -(-window // CPU_ATTENTION_KEY_BLOCK) if window > CPU_ATTENTION_KEY_BLOCK else 1
                lin += slots * blocks * self.linear(sum(a.absorbed_groups), min(window, CPU_ATTENTION_KEY_BLOCK))
            elif a.absorbs:  # queries and outputs through kv_b_proj's two halves
                lin += sum(self.linear(w, rows) for w in a.absorbed_groups)
            if moe:
                exp += self.experts(tokens)
        lin += self.linear(cfg.vocab_size * cfg.hidden_size, logit_rows, 2)
        scores = rows * window * heads * layers
        plain = expanded or not a.absorbs  # GQA: per-head batched dots, as MLA's expanded form
        per_score = a.score_flops if plain else a.absorbed_score_flops
        eff = (k.attention_expanded or k.attention) if plain else k.attention
        attn = scores * (per_score / (self.peak * eff) + k.score_ns * 1e-9)
        if k.cache_gbps:
            attn += slots * window * layers * a.kv_width * self.cache_itemsize / (k.cache_gbps * 1e9)
        fixed = cfg.num_hidden_layers * (k.layer_us * 1e-6 + rows * k.token_layer_ns * 1e-9)
        return StepTime(lin, exp, attn, fixed)

    def prefill(self, n_tokens: int, chunk: int, max_len: int | None = None) -> tuple[float, list[StepTime]]:
        """One request's prompt in chunks of `chunk` (alone in the engine: one row per step)."""
        steps, s = [], 0
        while s < n_tokens:  # the scheduler's cut of the cpu-only engine (step_shapes.next_chunk)
            n = next_chunk(n_tokens - s, chunk)
            s += n
            steps.append(self.step(width_bucket(n, chunk), n, kv_window(s, max_len), 1))
        return sum(x.seconds for x in steps), steps

    def decode(self, batch: int, context: int, n_slots: int | None = None, max_len: int | None = None) -> StepTime:
        """One decode step of `batch` requests at `context` tokens: rows = the power-of-two row
        bucket (<= n_slots), one column each."""
        rows = 1 << max(batch - 1, 0).bit_length()
        if n_slots:
            rows = min(rows, n_slots)
        return self.step(rows, batch, kv_window(context + 1, max_len), rows, slots=rows)

    def mixed_step(self, decoders: int, chunks: list[int], window: int, n_slots: int | None = None,
                   max_width: int | None = None, chunk_window: int | None = None, grouped: bool = False) -> StepTime:
        """One engine step carrying `decoders` decode rows and prompt chunks of `chunks` tokens (one
        row each): the fused executor runs it as two groups (serving/executors.FusedStep), the
        one-token rows over a key window of `window` slots (row bucket x 1 column, a logit each)
        and the chunks over `chunk_window` (default `window`; row bucket x the width bucket of the
        longest chunk, <= max_width, one logit row each; a one-token chunk runs with the decode
        rows, so `window` must cover it). Either part is absent when it has no row. Two programs,
        or with `grouped` one (`model.groups.run_groups`): every row through the kernels
        and every token through the experts in one pass, each group's attention over its window."""
        slots = n_slots or 1 << 30
        decoders += sum(1 for n in chunks if n == 1)
        chunks = [n for n in chunks if n > 1]
        parts = []
        d_rows, c_rows = row_bucket(decoders, slots), row_bucket(len(chunks), slots)
        if decoders:
            parts.append(self.step(d_rows, decoders, window, d_rows, slots=d_rows))
        if chunks:
            w = width_bucket(max(chunks), max_width or max(chunks))
            parts.append(self.step(c_rows * w, sum(chunks), chunk_window or window, c_rows, slots=c_rows))
        if grouped and len(parts) == 2:
            one = self.step(d_rows + c_rows * w, decoders + sum(chunks), window, d_rows + c_rows, slots=d_rows)
            return StepTime(one.linears, one.experts, sum(p.attention for p in parts), one.fixed)
        return StepTime(*(sum(getattr(p, f) for p in parts) for f in ("linears", "experts", "attention", "fixed")))
