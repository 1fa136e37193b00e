"""The engine's prefill strategy per request: stream-loaded prompts (SLP on one of two
simulated accelerators, DSLP on both) give the same greedy tokens as the resident model while
another slot keeps decoding; "auto" follows the planner; keyword / environment forcing; clear
errors.

One engine (2gpu+cpu-experts, strategies forced per request) serves every streamed run; all
prompts are streamed, so its steps are decode steps only (one compiled width). Prompts of 37
and 50 tokens in chunks of 16 (3 and 4 streamed chunks; one prefill-cache window of 64, so the
streaming programs compile once per strategy) and a 5-token one.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxmoe.model.cache import init_cache
from jaxmoe.model.forward import forward_absorbed, forward_expanded
from jaxmoe.planning.cost_model import model_costs
from jaxmoe.planning.planner import FORCE_ENV, load_hardware, prefill_threshold
from jaxmoe.planning.strategies import PrefillStrategy
from jaxmoe.serving import prompt_runner as ps
from jaxmoe.serving.engine import Engine
from jaxmoe.serving.presets import RuntimeConfig

CHUNK, MAX_LEN, NEW = 16, 64, 6
LENS = (5, 37, 50)


@pytest.fixture(scope="module")
def prompts(tiny_model):
    cfg, _ = tiny_model
    rng = np.random.RandomState(7)
    return [list(rng.randint(0, cfg.vocab_size, n)) for n in LENS]


def traced(engine):
    """Log of the engine's work: ("stream", request id, chunk start) and ("step", {slot: (id, n tokens)})."""
    log = []
    run_chunk, step = engine.prefill.run_chunk, engine._execute_step

    def chunk(row, table):
        log.append(("stream", row.request.id, row.start))
        return run_chunk(row, table)

    def execute(plan):
        log.append(("step", {s: (r.request.id, len(r.tokens)) for s, r in plan.rows.items()}))
        return step(plan)

    engine.prefill.run_chunk, engine._execute_step = chunk, execute
    return log


@pytest.fixture(scope="module")
def engine(tiny_model):
    cfg, w = tiny_model
    e = Engine(cfg, w, "2gpu+cpu-experts", n_slots=2, max_len=MAX_LEN, chunk_size=CHUNK, simulate_accelerators=True,
               prefill_beside_decode=False)  # one streamed chunk per step: the interleaving these tests trace
    return e, traced(e)


_prefill = jax.jit(forward_expanded, static_argnums=0)
_decode = jax.jit(forward_absorbed, static_argnums=0)


@pytest.fixture(scope="module")
def reference(tiny_model, prompts):
    """Each prompt's greedy tokens from the resident model (prefill, then decode steps; the
    step path equals this, tests/serving/test_engine.py)."""
    cfg, w = tiny_model
    out = []
    for p in prompts:
        tokens = np.zeros((1, max(LENS)), np.int32)
        positions = np.full_like(tokens, MAX_LEN)  # padding
        tokens[0, : len(p)], positions[0, : len(p)] = p, np.arange(len(p))
        logits, cache = _prefill(cfg, w, init_cache(cfg, 1, MAX_LEN), tokens, positions, logit_index=np.array([len(p) - 1]))
        toks = [int(np.argmax(logits[0, -1]))]
        for i in range(NEW - 1):
            logits, cache = _decode(cfg, w, cache, np.array([[toks[-1]]], np.int32), np.array([[len(p) + i]], np.int32))
            toks.append(int(np.argmax(logits[0, -1])))
        out.append(toks)
    assert len({tuple(t) for t in out}) == 3
    return out


@pytest.mark.parametrize("strategy, attention, stream_dense", [
    ("slp", "replicated", False), ("dslp", "sequence", False), ("dslp", "replicated", False),
    ("slp", "replicated", True), ("dslp", "sequence", True), ("dslp", "replicated", True)])
def test_streamed_prompts_equal_resident_path_while_another_decodes(engine, prompts, reference, strategy, attention,
                                                                    stream_dense, monkeypatch):
    """dslp: the planner's estimate carries the attention (sequence-split: predicted faster on
    these fake devices, whose compute is shared; replicated forced into the estimate), and
    stream_dense (forced: the MoE layers' MLA, router and shared experts streamed from the
    engine's host copy)."""
    e, log = engine
    log.clear()
    estimate = ps._estimate
    monkeypatch.setattr(ps, "_estimate", lambda *a: dataclasses.replace(estimate(*a), attention=attention,
                                                                        stream_dense=stream_dense))
    short = e.submit(prompts[0], NEW, background=False, prefill_strategy=strategy)
    e.step()  # the short prompt: one streamed chunk, its first token
    assert short.output_ids and short.status.value == "decode"
    longs = [e.submit(p, NEW, background=False, prefill_strategy=strategy) for p in prompts[1:]]
    e.run_until_idle()
    assert [r.output_ids for r in (short, *longs)] == reference
    assert [r.prefill_strategy for r in (short, *longs)] == [strategy] * 3
    assert [r.prefill_plan.attention for r in (short, *longs)] == [attention] * 3
    assert [r.prefill_plan.stream_dense for r in (short, *longs)] == [stream_dense] * 3
    if stream_dense:  # the MoE layers' dense weights passed as their host copy, the others resident
        dense = e.prefill.dense_weights(strategy, True)
        moe = [i for i in range(e.cfg.num_hidden_layers) if e.cfg.is_moe_layer(i)]
        assert all(dense.layers[i] is e.prefill.host_moe_layers()[i] for i in moe)
        assert len(dense.embed_tokens.sharding.device_set) == PrefillStrategy(strategy).accelerators
    assert estimate(e.cfg, e.prefill.hardware, len(prompts[1]), strategy).attention == (
        "sequence" if strategy == "dslp" else "replicated")  # the planner's own choice
    # every prompt chunk went through the streaming hook (oldest prompt first), none through
    # a step (only one-token decode rows there), and a decode step ran between any two
    # streamed chunks -- the short request's between the first long prompt's
    chunks = [ev[1:] for ev in log if ev[0] == "stream"]
    assert chunks == [(short.id, 0)] + [(r.id, s) for r in longs for s in range(0, len(r.prompt_ids), CHUNK)]
    assert all(n == 1 for ev in log if ev[0] == "step" for _, n in ev[1].values())
    at = [i for i, ev in enumerate(log) if ev[0] == "stream"]
    assert all(any(ev[0] == "step" for ev in log[i:j]) for i, j in zip(at[1:], at[2:])), log
    assert any(ev[0] == "step" and ev[1].get(short.slot) == (short.id, 1) for ev in log[at[1]:at[2]])


def _threshold_profile(tmp_path, cfg):
    """A box where the threshold is hand-computable: GPU compute, memory and per-layer
    overheads ~free, so per chunk SLP costs the transfer of every MoE layer's experts
    (E / pcie each) and the CPU path n tokens x (router hop 4H / pcie + routed FLOPs / cpu)
    per MoE layer: n* = E / (4H + pcie * F / cpu)."""
    d = {"name": "threshold-box", "cpu": {"name": "c", "cores": 1, "ghz": 1.0, "flops_per_cycle": 20, "read_gbps": 1e4},
         "gpu": {"name": "g", "count": 1, "memory_gb": 8, "bf16_tflops": 1e6, "fp8_tflops": 1e6, "mem_gbps": 1e9,
                 "pcie_gbps": 1.0},
         "efficiency": {"cpu_gemm": 1.0, "gpu_gemm": 1.0, "gpu_attention": 1.0, "gpu_mem": 1.0, "layer_overhead_us": 0}}
    path = tmp_path / "threshold-box.json"
    path.write_text(json.dumps(d))
    mc = model_costs(cfg)
    n_star = mc.layer_experts_bytes / (4 * cfg.hidden_size + 1e9 * mc.routed_flops_per_layer / 20e9)
    return path, n_star


def test_auto_follows_the_planner(tiny_model, prompts, tmp_path, monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    cfg, w = tiny_model
    path, n_star = _threshold_profile(tmp_path, cfg)
    found = prefill_threshold(cfg, load_hardware(path), "slp")
    assert LENS[0] < n_star < LENS[1] and abs(found - n_star) <= 2, (n_star, found)
    e = Engine(cfg, w, "gpu+cpu-experts", n_slots=4, max_len=MAX_LEN, chunk_size=CHUNK, simulate_accelerators=True,
               hardware=str(path))
    assert e.prefill.candidates == ("cpu", "slp") and e.prefill.hardware.name == "threshold-box"
    reqs = [e.submit(p, NEW, background=False) for p in prompts]  # 5 < n* < 37, 50
    assert [r.prefill_strategy for r in reqs] == ["cpu", "slp", "slp"]
    assert reqs[0].prefill_plan.strategy == "cpu" and reqs[1].prefill_plan.strategy == "slp"
    assert e.submit(prompts[2], NEW, background=False, prefill_strategy="cpu").prefill_strategy == "cpu"


def test_defaults_and_forcing(tiny_model, monkeypatch):
    cfg, w = tiny_model
    monkeypatch.delenv(FORCE_ENV, raising=False)
    kw = dict(n_slots=2, max_len=MAX_LEN, chunk_size=CHUNK, simulate_accelerators=True)
    e = Engine(cfg, w, "2gpu+cpu-experts", **kw)
    assert e.prefill.mode == "auto" and e.prefill.candidates == ("cpu", "slp", "dslp")
    assert e.prefill.hardware.name == "this-machine-fake-devices" and e.prefill.hardware.n_gpus == 2
    one = Engine(cfg, w, "gpu+cpu-experts", **kw)
    assert one.prefill.candidates == ("cpu", "slp") and one.prefill.hardware.n_gpus == 1
    cpu = Engine(cfg, w, "cpu-only", n_slots=1, max_len=MAX_LEN)
    assert cpu.prefill.candidates == ("cpu",) and cpu.prefill.choose(400) == ("cpu", None)
    monkeypatch.setenv(FORCE_ENV, "dslp")
    assert Engine(cfg, w, "2gpu+cpu-experts", **kw).prefill.choose(3)[0] == "dslp"
    assert Engine(cfg, w, "2gpu+cpu-experts", prefill_strategy="cpu", **kw).prefill.choose(300)[0] == "cpu"
    assert RuntimeConfig.load("cpu-only", prefill_strategy="slp").prefill_strategy == "slp"
    monkeypatch.setenv(FORCE_ENV, "auto")
    assert Engine(cfg, w, "gpu+cpu-experts", **kw).prefill.mode == "auto"


def test_impossible_or_unknown_strategies_are_clear_errors(tiny_model, monkeypatch):
    cfg, w = tiny_model
    monkeypatch.delenv(FORCE_ENV, raising=False)
    kw = dict(n_slots=2, max_len=MAX_LEN, simulate_accelerators=True)
    with pytest.raises(ValueError, match="prefill_strategy must be one of .* got 'fast'"):
        RuntimeConfig(prefill_strategy="fast")
    with pytest.raises(ValueError, match=r"prefill_strategy='dslp' is impossible here: needs 2 accelerator\(s\).* has 1"):
        Engine(cfg, w, "gpu+cpu-experts", prefill_strategy="dslp", **kw)
    with pytest.raises(ValueError, match=r"prefill_strategy='slp' is impossible here: needs 1 accelerator"):
        Engine(cfg, w, "cpu-only", prefill_strategy="slp", n_slots=1, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="resident on the accelerator"):
        Engine(cfg, w, "gpu+cpu-experts", routed_experts="accelerator", prefill_strategy="slp", **kw)
    resident = Engine(cfg, w, "gpu+cpu-experts", routed_experts="accelerator", **kw)
    assert resident.prefill.candidates == ("resident",) and resident.prefill.choose(50) == ("resident", None)
    e = Engine(cfg, w, "gpu+cpu-experts", **kw)
    with pytest.raises(ValueError, match="prefill_strategy='dslp' is impossible here"):
        e.submit([1, 2, 3], 2, background=False, prefill_strategy="dslp")
    with pytest.raises(ValueError, match="prefill_strategy must be one of"):
        e.submit([1, 2, 3], 2, background=False, prefill_strategy="gpu")
    assert not e.scheduler.has_work()
    monkeypatch.setenv(FORCE_ENV, "dslp")
    with pytest.raises(ValueError, match=f"{FORCE_ENV}=dslp is impossible here"):
        Engine(cfg, w, "gpu+cpu-experts", **kw)
    monkeypatch.setenv(FORCE_ENV, "gpu")
    with pytest.raises(ValueError, match=f"environment variable {FORCE_ENV} must be one of"):
        Engine(cfg, w, "gpu+cpu-experts", **kw)
    monkeypatch.delenv(FORCE_ENV)
    # routed experts as native handles and no expert_source: nothing to stream from
    assert ps.host_expert_source((None, object())) is None and ps.host_expert_source((None, None)) is None
    with pytest.raises(ValueError, match="no expert_source was given"):
        ps.StreamedPromptRunner(cfg, RuntimeConfig.load("gpu+cpu-experts", prefill_strategy="slp", **kw),
                                Engine(cfg, w, "gpu+cpu-experts", **kw).devices, _FusedLike(), _handles(w), None, 16,
                                MAX_LEN, np.float32)


class _FusedLike:
    """An executor that reads the weights' own routed experts (as `FusedStep` does)."""

    def host_experts(self):
        return None


def _handles(w):
    """The weights with every MoE layer's routed experts replaced by a non-array handle."""
    from jaxmoe.model.weights import MoEWeights

    layers = tuple(lw.replace(mlp=lw.mlp.replace(experts=object())) if isinstance(lw.mlp, MoEWeights) else lw
                   for lw in w.layers)
    return w.replace(layers=layers)


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_load_and_generate_with_a_forced_strategy(tmp_path, prompts, reference, monkeypatch, cpu_kernels):
    """jaxmoe.load(..., prefill_strategy=...) reaches the engine, which streams from the one
    host copy decode reads: the expert store's slabs with the CPU kernels, the weights' own
    arrays without; the checkpoint is not reopened. The chosen strategy shows in the result's
    timings; the environment variable forces one when the keyword does not."""
    import jaxmoe
    from jaxmoe.config import ModelConfig
    from jaxmoe.loading.synthetic import write_synthetic_checkpoint

    monkeypatch.delenv(FORCE_ENV, raising=False)
    path = write_synthetic_checkpoint(tmp_path / "tiny", ModelConfig.named("tiny"), fmt="fp8", seed=0)  # = tiny_model
    opts = dict(runtime="2gpu+cpu-experts", simulate_accelerators=True, n_slots=2, chunk_size=CHUNK, max_seq_len=MAX_LEN,
                cpu_kernels=cpu_kernels, cpu_precision="exact")  # exact kernels: the reference's tokens on every ISA
    model = jaxmoe.load(path, prefill_strategy="dslp", **opts)
    try:
        source = model.engine.prefill.source
        if cpu_kernels:
            from jaxmoe.cpu.tiled import StoreExperts

            assert isinstance(source, StoreExperts)
        else:
            assert isinstance(source, tuple) and source[1] is model.engine.executor.experts[1]  # what decode reads
        assert model.runtime.prefill_strategy == "dslp" and model._checkpoint is None
        out = jaxmoe.generate(model, prompts[1], max_new_tokens=NEW, ignore_eos=True)
        assert out.token_ids == reference[1] and out.timings.prefill_strategy == "dslp"
    finally:
        model.close()
    monkeypatch.setenv(FORCE_ENV, "slp")
    model = jaxmoe.load(path, **opts)
    assert model.engine.prefill.choose(len(prompts[1]))[0] == "slp"
    model.close()


def test_cancelled_streamed_prompt_frees_its_prefill_cache(engine, prompts):
    e, _ = engine
    r = e.submit(prompts[2], NEW, background=False, prefill_strategy="slp")
    e.step()  # its first streamed chunk
    assert e.prefill._cache is not None and e.prefill._cache[0] == r.id and r.n_prefilled == CHUNK
    r.cancel()
    e.run_until_idle()
    assert r.finish_reason == "cancelled" and e.prefill._cache is None
