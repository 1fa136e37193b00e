"""The CPU-only step model (planning/kernel_model.py) against hand-computed cases (no timing)."""

import dataclasses

import pytest

from jaxmoe import step_shapes
from jaxmoe.config import ModelConfig
from jaxmoe.planning.hardware import Cpu
from jaxmoe.planning.kernel_model import CpuKernels, KernelModel, kv_window, width_bucket
from jaxmoe.planning.planner import estimate_decode, estimate_prefill, load_hardware

DEMO = ModelConfig.named("demo")  # 4 layers (1 dense + 3 MoE), hidden 1024, 8 heads, 16 experts top-4
# round numbers: 2 cores x 1 GHz = 2e9 core-cycles/s, x 32 FLOP/cycle = 64 GFLOP/s peak
CPU = Cpu(name="test", cores=2, ghz=1.0, flops_per_cycle=32, read_gbps=100)
K = CpuKernels(gemm=1.0, gemm_decode_cycles=2.0, moe_gemm=0.5, moe_decode_cycles=1.0, gemv=0.5,
               gemv_weights_per_cycle=4.0, gemm_min_rows=24, call_us=10.0, attention=0.25, score_ns=2.0,
               layer_us=100.0, token_layer_ns=50.0)
READ = 50e9  # B/s the GEMV can stream


@pytest.fixture
def km():
    return KernelModel(DEMO, CPU, K, READ)


def test_windows_without_a_cap():
    """The model uses the engine's own rules (step_shapes.kv_window / width_bucket); None = no cap."""
    assert kv_window(300) == 512 and kv_window(300, 400) == 400 and kv_window(1) == step_shapes.MIN_KV_WINDOW
    assert width_bucket(17, 256) == 32


def test_linear_gemm_and_gemv_paths(km):
    w = 1_000_000
    # 24 rows: GEMM path = decode 2 cycles / 2e9 + 2 x 24 FLOP / 64e9, per weight, + 10 us per call
    assert km.linear(w, 24) == pytest.approx(w * (2 / 2e9 + 48 / 64e9) + 10e-6)
    # 1 row, FP8: max(decode cap 1 / (2e9 x 4), 1 B / 50e9, 2 / 32e9) = 1.25e-10 s per weight
    assert km.linear(w, 1) == pytest.approx(w * 1.25e-10 + 10e-6)
    # 8 rows: FLOP-bound, 16 FLOP / (64e9 x 0.5)
    assert km.linear(w, 8) == pytest.approx(w * 16 / 32e9 + 10e-6)
    # bf16 (lm_head) at 1 row: 2 B / 50e9 = 4e-11 < the decode cap: still 1.25e-10
    assert km.linear(w, 1, 2) == pytest.approx(w * 1.25e-10 + 10e-6)


def test_routed_experts_paths(km):
    w_e = 3 * 1024 * 352
    # 4 tokens x top-4 over 16 experts: 1 row per touched expert on average (< 24): GEMV path,
    # each expert's rows m ~ Binomial(4, 1/4): P[m] = 108/256, 54/256, 12/256, 1/256 for m = 1..4
    per_weight = {m: max(1 / 8e9, 1 / 50e9, 2 * m / 32e9) for m in range(1, 5)}  # moe_gemv* unset: the Linears'
    expect = 16 * w_e * sum(pr / 256 * per_weight[m] for m, pr in zip(range(1, 5), (108, 54, 12, 1)))
    assert km.experts(4) == pytest.approx(expect + 10e-6)
    own = KernelModel(DEMO, CPU, dataclasses.replace(K, moe_gemv=0.25, moe_gemv_weights_per_cycle=2.0), READ)
    assert own.experts(1) == pytest.approx(4 * w_e * max(1 / 4e9, 2 / 16e9) + 10e-6)  # 4 experts of 1 row
    # 256 tokens: all 16 experts, 64 rows each: GEMM with the MoE coefficients
    t = 16 * (1 - 0.75**256)
    assert km.experts(256) == pytest.approx(t * w_e * 1 / 2e9 + 1024 * w_e * 2 / 32e9 + 10e-6)
    assert km.experts(0) == 0.0


def test_prefill_pads_to_width_and_key_window(km):
    """300 tokens in chunks of 256: a step of 256 rows over a 256-key window, then one of 44
    real tokens padded to 64 rows over a 512-key window; attention and fixed costs by rows."""
    total, steps = km.prefill(300, 256)
    assert len(steps) == 2
    a = km.step(256, 256, 256, 1)
    b = km.step(64, 44, 512, 1)
    assert [s.seconds for s in steps] == pytest.approx([a.seconds, b.seconds])
    assert total == pytest.approx(a.seconds + b.seconds)
    # attention of the second step: 2 x 64 rows x 512 keys x 8 heads x (2 x 256 + 64) FLOP per layer,
    # at 64e9 x 0.25, + 64 x 512 x 8 scores x 2 ns, over 4 layers
    flops = 2 * 64 * 512 * 8 * (2 * 256 + 64) * 4
    assert b.attention == pytest.approx(flops / 16e9 + 64 * 512 * 8 * 4 * 2e-9)
    assert b.fixed == pytest.approx(4 * (100e-6 + 64 * 50e-9))
    # routed experts see the 44 real tokens only
    assert b.experts == pytest.approx(3 * km.experts(44))


def test_step_linears_count_every_matrix(km):
    """One decode row: per layer the MLA projections (q_a, q_b, kv_a, o_proj), the dense MLP
    or the shared expert, kv_b's two halves, and lm_head once."""
    s = km.step(1, 1, 64, 1)
    per = max(1 / 8e9, 1 / 50e9, 2 / 32e9)  # GEMV, 1 row
    mla = 384 * 1024 + 8 * 128 * 384 + 320 * 1024 + 1024 * 8 * 64
    kv_b = 8 * 64 * 256 * 2
    dense, shared = 3 * 2816 * 1024, 3 * 352 * 1024
    calls = 4 * (4 + 3 + 2) + 1
    weights = 4 * (mla + kv_b) + dense + 3 * shared + 8192 * 1024
    assert s.linears == pytest.approx(weights * per + calls * 10e-6)


def test_decode_rows_bucket_and_window(km):
    d = km.decode(3, 1000)  # 3 requests: a row bucket of 4, keys over kv_window(1001) = 1024
    assert d.seconds == pytest.approx(km.step(4, 3, 1024, 4).seconds)
    assert km.decode(3, 1000, n_slots=2).seconds == pytest.approx(km.step(2, 3, 1024, 2).seconds)


def test_planner_uses_the_kernel_model_on_this_machine():
    here = load_hardware("this-machine", calibrate=False)
    assert here.kernels is not None and load_hardware("reference-box").kernels is None
    hw = dataclasses.replace(here, cpu=CPU, kernels=K).with_efficiency(cpu_gemv_frac_of_read=0.5)
    km = KernelModel(DEMO, CPU, K, READ)
    e = estimate_prefill(DEMO, hw, 300, "cpu")
    assert e.seconds == pytest.approx(km.prefill(300, 256)[0]) and e.chunk_tokens == 256
    d = estimate_decode(DEMO, hw, context=1000, batch=3)
    assert d.seconds == pytest.approx(km.decode(3, 1000).seconds)
    assert d.tok_per_s == pytest.approx(3 / d.seconds) and d.batch == 3
    # without the block: the generic formulas (one request)
    g = estimate_decode(DEMO, dataclasses.replace(hw, kernels=None), context=1000)
    assert g.seconds == pytest.approx(g.expert_s + g.resident_s + g.attention_s + g.overhead_s)


def test_wide_chunks_attend_expanded(km):
    """A 256-row chunk over 1024 keys: on the CPU expanded (192 MACs per score per head + the
    window's latents through kv_b_proj, eight 128-key blocks) costs less than absorbed (576 per
    score, at 1 / CPU_ABSORBED_SPEEDUP); a 128-row chunk attends absorbed there."""
    from jaxmoe.step_shapes import expanded_is_cheaper  # the engine's rule, which the model uses

    assert expanded_is_cheaper(DEMO, 256, 1024, on_cpu=True) and not expanded_is_cheaper(DEMO, 1, 1024, on_cpu=True)
    assert expanded_is_cheaper(DEMO, 128, 1024) and not expanded_is_cheaper(DEMO, 128, 1024, on_cpu=True)
    wide, narrow = km.step(256, 256, 1024, 1), km.step(1, 1, 1024, 1)
    scores = 256 * 1024 * 8 * 4
    assert wide.attention == pytest.approx(scores * (2 * 192 / 16e9 + 2e-9))
    mid = km.step(128, 128, 1024, 1)
    assert mid.attention == pytest.approx(128 * 1024 * 8 * 4 * (2 * 576 / 16e9 + 2e-9))
    mats = km.mc.layer_matrices(False), km.mc.layer_matrices(True)
    rest = lambda rows: sum(km.linear(n * k, rows) for j in range(4) for n, k in mats[j > 0])  # noqa: E731
    lm_head = km.linear(8192 * 1024, 1, 2)
    kv_b = 8 * (64 + 64) * 256  # kv_b_proj, applied to eight 128-key blocks per layer
    assert wide.linears == pytest.approx(rest(256) + 4 * 8 * km.linear(kv_b, 128) + lm_head)
    assert narrow.linears == pytest.approx(rest(1) + 4 * 2 * km.linear(kv_b // 2, 1) + lm_head)
