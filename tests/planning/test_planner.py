"""The performance model and the planner against hand-computed cases (no JAX work here)."""

import dataclasses
import json
import math

import pytest

from jaxmoe.config import ModelConfig
from jaxmoe.planning import hardware, planner
from jaxmoe.planning.cost_model import model_costs
from jaxmoe.planning.planner import (
    _pipeline,
    estimate_decode,
    estimate_prefill,
    load_hardware,
    plan_prefill,
    prefill_threshold,
)

V3 = ModelConfig.named("deepseek-v3")
EXPERT = 3 * 2048 * 7168 + 3 * 16 * 56 * 4  # FP8 gate/up/down + fp32 scales [16, 56] / [56, 16]
ROUTED = 58 * 256 * EXPERT  # 58 MoE layers x 256 experts
ROUTED_FLOPS = 58 * 8 * 6 * 7168 * 2048  # per token: k=8 experts x 3 matrices x 2 FLOP


@pytest.fixture(scope="module")
def ref():
    return load_hardware("reference-box", calibrate=False)


def test_cost_model_deepseek_v3():
    mc = model_costs(V3)
    assert mc.expert_bytes == EXPERT == 44_050_944
    assert mc.routed_bytes == ROUTED
    assert mc.moe_layers * mc.routed_flops_per_layer == ROUTED_FLOPS
    assert mc.kv_bytes_per_token == 61 * (512 + 64) * 2
    # one query at position 0: 128 heads x (192 + 128) x 2, plus expanding one latent through kv_b
    assert mc.attention_flops(0, 1) == 128 * 320 * 2 + 2 * 512 * 128 * 256
    assert 18e9 < mc.resident_bytes < 20e9  # MLA 11.4 GB + embed/lm_head 3.7 GB + dense/shared ...
    assert mc.touched_experts(1) == pytest.approx(8) and mc.touched_experts(10**6) == pytest.approx(256)


@pytest.mark.parametrize("items, buffers, elapsed", [
    ([(0.5, 1.0), (0.5, 1.0)], 2, 2.5),  # T0 [0,1] C0 [1,1.5] T1 [1,2] C1 [2,2.5]
    ([(2, 1), (2, 1), (2, 1)], 2, 7.0),  # compute-bound; T2 waits for C0 (two buffers)
    ([(3.0, None), (0.1, 1.0), (0.1, 1.0), (0.1, 1.0)], 2, 4.2),  # a long attention: T2 waits for C0
    ([(3.0, None), (0.1, 1.0), (0.1, 1.0), (0.1, 1.0)], 3, 3.3),  # a third buffer: T1, T2 load during it
])
def test_pipeline_simulation(items, buffers, elapsed):
    t, copy, busy = _pipeline(items, buffers)
    assert t == pytest.approx(elapsed)
    assert copy == pytest.approx(sum(x for _, x in items if x is not None))
    assert busy == pytest.approx(sum(c for c, _ in items))


def test_slp_and_dslp_transfer_bound_below_the_balance_point(ref):
    # 4K tokens fit in one chunk: every expert crosses PCIe once (50 GB/s), compute is smaller
    slp = estimate_prefill(V3, ref.with_gpus(1), 4096, "slp")
    assert slp.bound == "transfer" and slp.n_chunks == 1
    assert ROUTED / 50e9 <= slp.seconds <= 1.03 * ROUTED / 50e9
    dslp = estimate_prefill(V3, ref, 4096, "dslp")  # each GPU half
    assert dslp.bound == "transfer"
    assert ROUTED / 2 / 50e9 <= dslp.seconds <= 1.03 * ROUTED / 2 / 50e9
    assert estimate_prefill(V3, ref.with_gpus(1), 4096, "dslp").reason.startswith("needs 2 GPU")


def test_cpu_experts_compute_bound(ref):
    per_token = ROUTED_FLOPS / (64 * 3.5e9 * 128 * 0.25)  # 5.7 ms of CPU expert GEMM per token
    cpu = estimate_prefill(V3, ref, 4096, "cpu")
    assert 4096 * per_token <= cpu.seconds <= 1.15 * 4096 * per_token
    # the token threshold: SLP (~13.1 s whatever the length, up to a chunk) vs CPU (n x >= 5.7 ms)
    n = prefill_threshold(V3, ref.with_gpus(1), "slp")
    assert ROUTED / 50e9 / (1.15 * per_token) <= n <= ROUTED / 50e9 / per_token


def test_planner_choices_reference_box(ref):
    assert plan_prefill(V3, ref, 512).choice.strategy == "cpu"
    long = plan_prefill(V3, ref, 32768)
    assert long.choice.strategy == "dslp"
    assert long.estimates["resident"].reason.startswith("the model (673.1 GB) does not fit")
    assert plan_prefill(V3, ref.with_gpus(1), 32768).choice.strategy == "slp"
    # whole layers double-buffered do not fit beside 19 GB of resident weights on a 32 GB card
    whole = estimate_prefill(V3, ref, 32768, "slp", parts_per_layer=1, buffers=2)
    assert not whole.feasible and "GB left per GPU" in whole.reason
    best = estimate_prefill(V3, ref, 32768, "slp")
    assert best.parts_per_layer > 1 and best.chunk_tokens >= 4096


def test_dslp_attention_is_planned(ref):
    """dslp's attention: the faster of replicated and sequence-split (ties: replicated) in the
    plan and with attention="auto"; as given otherwise (estimate_prefill's default: replicated)."""
    short = plan_prefill(V3, ref, 4096, stream_dense=False).estimates["dslp"]  # transfer-bound: splitting gains nothing
    assert short.attention == "replicated"
    assert short.seconds == estimate_prefill(V3, ref, 4096, "dslp", attention="sequence").seconds
    long = plan_prefill(V3, ref, 32768, stream_dense=False)  # with the MLA resident (stream_dense: below)
    rep, seq = (estimate_prefill(V3, ref, 32768, "dslp", attention=a) for a in ("replicated", "sequence"))
    assert long.choice.strategy == "dslp" and long.choice.attention == "sequence"
    assert long.choice.seconds == seq.seconds < 0.7 * rep.seconds and rep.attention == "replicated"
    assert estimate_prefill(V3, ref, 32768, "dslp", attention="auto") == long.choice
    assert plan_prefill(V3, ref, 32768, attention="replicated", stream_dense=False).choice == rep
    assert estimate_prefill(V3, ref, 32768, "slp", attention="auto").attention == "replicated"
    with pytest.raises(ValueError, match="attention must be one of"):
        estimate_prefill(V3, ref, 512, "dslp", attention="heads")


def test_stream_dense_is_planned(ref):
    """stream_dense (the MoE layers' MLA, router and shared experts streamed with their first
    expert unit, streaming/slp.py): chosen where predicted faster (memory freed for longer chunks
    and more buffers) or where only it fits; ties and short prompts keep them resident."""
    one = ref.with_gpus(1)
    short = plan_prefill(V3, ref, 4096)  # transfer-bound: streaming more only costs
    assert short.choice.strategy == "dslp" and not short.choice.stream_dense
    assert not short.estimates["slp"].stream_dense
    long = plan_prefill(V3, ref, 32768)
    kept = estimate_prefill(V3, ref, 32768, "dslp", attention="auto")
    assert long.choice.strategy == "dslp" and long.choice.stream_dense and not kept.stream_dense
    assert long.choice.seconds < 0.9 * kept.seconds and long.choice.chunk_tokens >= kept.chunk_tokens
    assert estimate_prefill(V3, ref, 32768, "dslp", attention="auto", stream_dense="auto") == long.choice
    streamed = estimate_prefill(V3, one, 32768, "slp", stream_dense=True)
    resident = estimate_prefill(V3, one, 32768, "slp")  # two chunks: every expert streamed twice
    assert streamed.stream_dense and streamed.chunk_tokens == 32768 > resident.chunk_tokens
    assert streamed.transfer_s < resident.transfer_s and plan_prefill(V3, one, 32768).choice == streamed
    # 128K tokens on one 32 GB card: the latent cache leaves no room beside the resident MLA
    huge = (estimate_prefill(V3, one, 131072, "slp", stream_dense=d) for d in (False, True, "auto"))
    kept, streamed, auto = huge
    assert not kept.feasible and streamed.feasible and auto == streamed
    assert not estimate_prefill(V3, ref, 512, "cpu", stream_dense="auto").stream_dense
    with pytest.raises(ValueError, match="stream_dense must be"):
        estimate_prefill(V3, ref, 512, "slp", stream_dense="yes")


def test_dense_transfer_gates_attention():
    """_pipeline with stream_dense: a layer's attention waits for its dense weights (moved first
    in its first unit's transfer), not for the whole unit."""
    items = [(1.0, None), (0.5, 3.0)]
    assert _pipeline(items, 2) == (3.5, 3.0, 1.5)  # attention 0 -> 1 under T(0); C(0) 3 -> 3.5
    assert _pipeline(items, 2, {0: 2.5}) == (4.0, 3.0, 1.5)  # attention after the dense 2.5 s: 2.5 -> 3.5
    items = [(1.0, None), (1.0, 3.0), (1.0, None), (1.0, 3.0)]  # T(1) issued at 0, after T(0): 3 -> 6
    assert _pipeline(items, 2) == (7.0, 6.0, 4.0)
    assert _pipeline(items, 2, {0: 2.0, 1: 2.0}) == (7.0, 6.0, 4.0)  # attention 1 waits for 5, hidden by T(1)


def test_planner_choices_other_profiles():
    here = load_hardware("this-machine", calibrate=False)
    plan = plan_prefill(V3, here, 100_000)
    assert plan.choice.strategy == "cpu"
    assert all(not plan.estimates[s].feasible for s in ("slp", "dslp", "resident"))
    h100 = load_hardware("h100-box", calibrate=False)
    mid = ModelConfig.named("bench-v3-mid")  # 3 layers, 32 experts: 4.3 GB, fits in 80 GB
    assert plan_prefill(mid, h100, 8192).choice.strategy == "resident"
    tie = plan_prefill(mid, h100, 32768)  # compute-bound: streaming hides its transfers, same time
    assert tie.estimates["slp"].seconds == pytest.approx(tie.estimates["resident"].seconds, rel=1e-3)
    assert tie.choice.strategy == "resident"
    assert plan_prefill(V3, h100, 32768).choice.strategy == "slp"
    fake = load_hardware("this-machine-fake-devices", calibrate=False)
    assert estimate_prefill(ModelConfig.named("tiny"), fake, 64, "dslp").feasible


def test_force_strategy(ref, monkeypatch):
    here = load_hardware("this-machine", calibrate=False)
    with pytest.raises(ValueError, match="forced prefill strategy 'slp' cannot run on this-machine: needs 1 GPU"):
        plan_prefill(V3, here, 4096, force="slp")
    forced = plan_prefill(V3, ref, 32768, force="cpu")
    assert forced.forced and forced.choice.strategy == "cpu"
    monkeypatch.setenv(planner.FORCE_ENV, "slp")
    assert plan_prefill(V3, ref, 512).choice.strategy == "slp"
    with pytest.raises(ValueError, match="unknown prefill strategy"):
        estimate_prefill(V3, ref, 512, "gpu")


def test_decode_bytes_over_bandwidth(ref):
    d = estimate_decode(V3, ref, context=4096)
    mc = model_costs(V3)
    assert d.expert_s == pytest.approx(58 * 8 * EXPERT / (940e9 * 0.9))
    assert d.resident_s == pytest.approx((mc.decode_resident_bytes + 4096 * mc.kv_bytes_per_token) / (1792e9 * 0.8))
    assert d.overhead_s == pytest.approx(58 * 100e-6)
    assert 0.8 * 21.5 <= d.tok_per_s <= 1.2 * 21.5  # the published FP8 figure (docs/PERFORMANCE_MODEL.md)


def test_cpu_only_decode_counts_every_layer_and_the_attention():
    """No GPU and no "cpu_kernels" block (the generic formulas; this-machine's own block is
    tested in test_planner_cpu.py): everything is read at the CPU's rate, absorbed attention
    costs FLOPs at the CPU's GEMM rate, and every layer pays the per-layer dispatch overhead."""
    here = dataclasses.replace(load_hardware("this-machine", calibrate=False), kernels=None).with_efficiency(
        cpu_gemm=0.45, decode_layer_overhead_us=1000)
    cfg = ModelConfig.named("demo")
    mc = model_costs(cfg)
    read = 48e9 * 0.9
    short, long = (estimate_decode(cfg, here, context=c) for c in (64, 2048))
    assert short.overhead_s == pytest.approx(cfg.num_hidden_layers * 1000e-6)
    flops = 2 * 2048 * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
    assert long.attention_s == pytest.approx(flops / (2 * 2.45e9 * 32 * 0.45))
    assert long.resident_s - short.resident_s == pytest.approx((2048 - 64) * mc.kv_bytes_per_token / read)
    assert long.seconds == pytest.approx(long.expert_s + long.resident_s + long.attention_s + long.overhead_s)


def test_hardware_profiles_and_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXMOE_CALIBRATION", raising=False)
    for name in ("reference-box", "h100-box", "this-machine", "this-machine-fake-devices"):
        load_hardware(name)
    ref = load_hardware("reference-box")
    assert (ref.n_gpus, ref.gpu.bf16_tflops, ref.gpu.fp8_tflops, ref.gpu.pcie_gbps, ref.gpu.memory_gb) == (2, 209.5, 419, 50, 32)
    # no calibration file: the profile's shipped figures
    cached = tmp_path / "cache" / "calibration" / "kernels.json"
    assert hardware.calibration_path() == cached
    assert load_hardware("this-machine").efficiency.cpu_gemv_frac_of_read == 0.9
    assert not load_hardware("this-machine").calibrated_from
    # the one a full `python -m benchmarks.kernels` leaves in the cache
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps({"metrics": {"fp8_gemv_m1_frac_of_read": 0.8}}))
    here = load_hardware("this-machine")
    assert here.efficiency.cpu_gemv_frac_of_read == 0.8 and here.calibrated_from == (f"{cached}: cpu_gemv_frac_of_read",)
    assert load_hardware("this-machine", calibrate=False).efficiency.cpu_gemv_frac_of_read == 0.9
    assert not load_hardware("reference-box").calibrated_from  # not measured there
    # an explicit file: the argument, then $JAXMOE_CALIBRATION, before the cache
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"metrics": {"fp8_gemv_m1_frac_of_read": 0.7}}))
    assert load_hardware("this-machine", calibration=other).efficiency.cpu_gemv_frac_of_read == 0.7
    monkeypatch.setenv("JAXMOE_CALIBRATION", str(other))
    assert hardware.calibration_path() == other
    assert load_hardware("this-machine").efficiency.cpu_gemv_frac_of_read == 0.7
    assert load_hardware("this-machine", calibration=cached).efficiency.cpu_gemv_frac_of_read == 0.8
    monkeypatch.setenv("JAXMOE_CALIBRATION", str(tmp_path / "missing.json"))
    assert load_hardware("this-machine").efficiency.cpu_gemv_frac_of_read == 0.9  # named but absent: shipped figures
    other.write_text("{not json")
    with pytest.warns(UserWarning, match="not used"):
        assert load_hardware("this-machine", calibration=other).efficiency.cpu_gemv_frac_of_read == 0.9
    with pytest.raises(ValueError, match=r"unknown hardware profile 'no-such-box'; known: \['h100-box', 'reference-box'"):
        load_hardware("no-such-box")
    mine = tmp_path / "my-box.json"  # a profile by path
    mine.write_text(hardware.named_config_path("hardware", "h100-box", "profile").read_text())
    assert load_hardware(mine).gpu == load_hardware(str(mine)).gpu == load_hardware("h100-box").gpu
    assert math.isinf(estimate_prefill(V3, here, 10, "resident").seconds)
