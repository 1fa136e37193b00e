"""tpot_target_ms: the step model sizes the prompt chunks beside decoders; the tokens never change."""

import numpy as np
import pytest

from jaxmoe.serving.engine import Engine
from jaxmoe.serving.presets import RuntimeConfig
from jaxmoe.serving.request import Status
from tests.serving.test_engine import MAX_LEN, greedy_reference

SHORT, LONG, NEW = 5, 70, 8


@pytest.fixture(scope="module")
def two_prompts(tiny_model):
    cfg, w = tiny_model
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(0, cfg.vocab_size, n)) for n in (SHORT, LONG)]
    return prompts, [greedy_reference(cfg, w, p, NEW) for p in prompts]


def run_mixed(engine, prompts, short_new: int = 40):
    """The short prompt (short_new tokens to generate) decodes when the long one arrives. Returns
    (the first NEW tokens of each, the long prompt's chunk per step, (predicted seconds, chunk) of
    the steps the target sized)."""
    short = engine.submit(prompts[0], short_new, background=False)
    while short.status is not Status.DECODE:
        engine.step()
    long = engine.submit(prompts[1], NEW, background=False)
    chunks, predicted = [], []
    plan_fn = engine.scheduler.plan

    def plan():
        p = plan_fn()
        if p is not None and long.slot in p.rows and long.status is Status.PREFILL:
            chunks.append(len(p.rows[long.slot].tokens))
            if p.predicted_s is not None:
                predicted.append((p.predicted_s, chunks[-1]))
        return p

    engine.scheduler.plan = plan
    engine.run_until_idle()
    return [short.output_ids[:NEW], long.output_ids], chunks, predicted


def test_target_changes_the_chunking_not_the_tokens(tiny_model, two_prompts):
    cfg, w = tiny_model
    prompts, reference = two_prompts
    kw = dict(n_slots=2, max_len=MAX_LEN, chunk_size=64, decode_chunk_size=64)
    out, chunks, predicted = run_mixed(Engine(cfg, w, "cpu-only", **kw), prompts)
    assert chunks == [63, 7] and predicted == []  # the token budget (64) less the decode row
    assert out == reference
    e = Engine(cfg, w, "cpu-only", tpot_target_ms=1000.0, **kw)
    # a target between the predicted steps with a 32- and a 64-token chunk (the hardware
    # profile's CPU step model, this-machine): 32-token chunks fit, 64 do not
    t32, t64 = e.step_model(1, [32], 64), e.step_model(1, [64], 64)
    assert t32 < t64
    e.scheduler.tpot_target_s = (t32 + t64) / 2
    out_t, chunks_t, predicted_t = run_mixed(e, prompts)
    assert chunks_t == [32, 32, 6]
    assert all(t <= e.scheduler.tpot_target_s for t, _ in predicted_t) and len(predicted_t) == 3
    assert out_t == out


def test_impossible_target_still_completes_the_prompt(tiny_model, two_prompts):
    cfg, w = tiny_model
    prompts, reference = two_prompts
    e = Engine(cfg, w, "cpu-only", n_slots=2, max_len=MAX_LEN, chunk_size=64, decode_chunk_size=64, tpot_target_ms=1e-3)
    out, chunks, predicted = run_mixed(e, prompts)
    assert chunks == [16, 16, 16, 16, 6]  # the smallest width bucket per step, to the end
    assert all(t > e.scheduler.tpot_target_s for t, _ in predicted)
    assert out == reference


def test_runtime_option_validation():
    assert RuntimeConfig.load("cpu-only", tpot_target_ms=20).tpot_target_ms == 20
    with pytest.raises(ValueError, match="tpot_target_ms"):
        RuntimeConfig(tpot_target_ms=0)


def test_mixed_step_is_the_decode_program_plus_the_chunk_program():
    from jaxmoe.config import ModelConfig
    from jaxmoe.planning.hardware import load_hardware
    from jaxmoe.planning.planner import kernel_model

    km = kernel_model(ModelConfig.named("demo"), load_hardware("this-machine", calibrate=False))
    assert km.mixed_step(3, [], 1024, 4).seconds == km.decode(3, 1023, 4).seconds
    alone = km.step(32, 20, 1024, 1).seconds  # a 20-token chunk runs 32 wide (its width bucket)
    assert km.mixed_step(0, [20], 1024, 4, 64).seconds == pytest.approx(alone)
    both = km.mixed_step(3, [20], 1024, 4, 64).seconds
    assert both == pytest.approx(alone + km.decode(3, 1023, 4).seconds)
    # one-token chunks run with the decode rows; wider chunks cost more
    assert km.mixed_step(3, [1], 1024, 4).seconds == km.decode(4, 1023, 4).seconds
    assert km.mixed_step(3, [16], 1024, 4, 64).seconds < both < km.mixed_step(3, [64], 1024, 4, 64).seconds


def test_target_is_cpu_only(tiny_model):
    cfg, w = tiny_model
    with pytest.raises(ValueError, match="cpu-only runtime only"):
        Engine(cfg, w, "gpu+cpu-experts", max_len=MAX_LEN, simulate_accelerators=True, tpot_target_ms=20)
