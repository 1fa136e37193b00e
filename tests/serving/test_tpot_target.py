"""tpot_target_ms: the step model sizes the prompt chunks beside decoders; the tokens never change."""

import numpy as np
import pytest

from jaxmoe.config import ModelConfig
from jaxmoe.planning.hardware import load_hardware
from jaxmoe.planning.planner import kernel_model
from jaxmoe.serving.engine import Engine
from jaxmoe.serving.presets import RuntimeConfig
from jaxmoe.serving.request import Status
from jaxmoe.serving.step_model import HISTORY, StepModel
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
    e.step_model.measured = lambda *a: None  # the model as the profile has it, not corrected by this box's timings
    # a target between the predicted steps with a 32- and a 64-token chunk (the hardware
    # profile's CPU step model, this-machine): 32-token chunks fit, 64 do not
    t32, t64 = e.step_model(1, [32], 8, [32]), e.step_model(1, [64], 8, [64])
    assert t32 < t64
    e.scheduler.tpot_target_s = (t32 + t64) / 2
    out_t, chunks_t, predicted_t = run_mixed(e, prompts)
    assert chunks_t == [32, 32, 6]  # the last 6 in a step 8 wide
    assert all(t <= e.scheduler.tpot_target_s for t, _ in predicted_t) and len(predicted_t) == 3
    assert out_t == out


def test_impossible_target_still_completes_the_prompt(tiny_model, two_prompts):
    cfg, w = tiny_model
    prompts, reference = two_prompts
    e = Engine(cfg, w, "cpu-only", n_slots=2, max_len=MAX_LEN, chunk_size=64, decode_chunk_size=64, tpot_target_ms=1e-3)
    out, chunks, predicted = run_mixed(e, prompts, short_new=LONG + NEW)
    assert chunks == [1] * LONG  # one token per step, with the decode row, to the end
    assert all(t > e.scheduler.tpot_target_s for t, _ in predicted)
    assert out == reference


def test_the_step_model_corrects_itself_by_the_steps_it_measures():
    km = kernel_model(ModelConfig.named("demo"), load_hardware("this-machine", calibrate=False))
    m = StepModel(km, n_slots=4, max_len=1024, cap=64)
    dec, chunk, chunk_end = [40, 41, 42], [16], [200]  # 3 decode rows ending by 42 keys, a chunk by 200

    def predicted():
        return m(3, chunk, max(dec), chunk_end)

    modelled = predicted()  # each program over its own rows' window
    assert modelled == km.mixed_step(3, chunk, 64, 4, 64, chunk_window=256).seconds
    m.measured(dec, chunk, chunk_end, 10 * modelled)  # a shape's first step (it may have compiled): left out
    assert predicted() == modelled
    for ratio in (2.0, 3.0, 2.5):
        m.measured(dec, chunk, chunk_end, ratio * modelled)
    assert predicted() == pytest.approx(3 * modelled)  # the largest ratio of the last HISTORY steps
    # no chunk program, none of its own measured yet: the other kind's correction
    assert m(3, [1], max(dec), chunk_end) == pytest.approx(3 * m.modelled(m.shape(3, [1], max(dec), chunk_end)))
    for _ in range(HISTORY):
        m.measured(dec, chunk, chunk_end, 1.5 * modelled)
    assert predicted() == pytest.approx(1.5 * modelled)


def test_a_kind_not_chosen_ages_out_its_slow_steps():
    """One slow step with a chunk program would keep chunks out for good (none runs again to be
    measured): while decode-only steps run, the chunk kind's ratios drop one per HISTORY steps."""
    km = kernel_model(ModelConfig.named("demo"), load_hardware("this-machine", calibrate=False))
    m = StepModel(km, n_slots=4, max_len=1024, cap=64)
    dec, chunk, chunk_end = [40, 41, 42], [8], [100]
    with_chunk = m.modelled(m.shape(3, chunk, 42, chunk_end))
    alone = m.modelled(m.shape(3, [], 42, []))
    for ratio in (None, 4.0):  # the first run of a program is left out
        m.measured(dec, chunk, chunk_end, (ratio or 100.0) * with_chunk)
    for _ in range(HISTORY - 1):  # the decode program ran in the chunk steps: these count
        m.measured(dec, [], [], 1.2 * alone)
    assert m(3, chunk, 42, chunk_end) == pytest.approx(4.0 * with_chunk)  # still there
    m.measured(dec, [], [], 1.2 * alone)  # HISTORY steps without a chunk: the slow one ages out
    assert m(3, chunk, 42, chunk_end) == pytest.approx(1.2 * with_chunk)  # the other kind's correction


def test_runtime_option_validation():
    assert RuntimeConfig.load("cpu-only", tpot_target_ms=20).tpot_target_ms == 20
    with pytest.raises(ValueError, match="tpot_target_ms"):
        RuntimeConfig(tpot_target_ms=0)


def test_mixed_step_is_the_decode_program_plus_the_chunk_program():
    km = kernel_model(ModelConfig.named("demo"), load_hardware("this-machine", calibrate=False))
    assert km.mixed_step(3, [], 1024, 4).seconds == km.decode(3, 1023, 4).seconds
    alone = km.step(32, 20, 1024, 1).seconds  # a 20-token chunk runs 32 wide (its width bucket)
    assert km.mixed_step(0, [20], 1024, 4, 64).seconds == pytest.approx(alone)
    both = km.mixed_step(3, [20], 1024, 4, 64).seconds
    assert both == pytest.approx(alone + km.decode(3, 1023, 4).seconds)
    # one-token chunks run with the decode rows; wider chunks cost more
    assert km.mixed_step(3, [1], 1024, 4).seconds == km.decode(4, 1023, 4).seconds
    assert km.mixed_step(3, [16], 1024, 4, 64).seconds < both < km.mixed_step(3, [64], 1024, 4, 64).seconds
    # each program over its own window: decode rows that end early beside a chunk that reaches far
    apart = km.mixed_step(3, [20], 128, 4, 64, chunk_window=1024).seconds
    assert apart == pytest.approx(alone + km.decode(3, 127, 4).seconds) and apart < both
    # in one program (model.groups.run_groups): one pass of the kernels, each group's attention
    two = km.mixed_step(3, [4], 128, 4, 4, chunk_window=1024)
    one = km.mixed_step(3, [4], 128, 4, 4, chunk_window=1024, grouped=True)
    assert km.decode(3, 127, 4).seconds < one.seconds < two.seconds
    assert one.attention == pytest.approx(two.attention) and one.fixed < two.fixed


def test_the_step_model_knows_which_steps_run_in_one_program():
    km = kernel_model(ModelConfig.named("demo"), load_hardware("this-machine", calibrate=False))
    grouped, apart = (StepModel(km, n_slots=4, max_len=1024, cap=64, grouped=g) for g in (True, False))
    narrow, wide = grouped.shape(3, [4], 42, [100]), grouped.shape(3, [32], 42, [100])
    assert grouped.programs(narrow) == {("grouped", ("decode", 4, 64), ("chunks", 1, 4, 128))}
    assert apart.programs(narrow) == {("decode", 4, 64), ("chunks", 1, 4, 128)}
    assert grouped.programs(wide) == apart.programs(wide)  # wide chunks: a program of their own
    assert grouped.modelled(narrow) < apart.modelled(narrow) and grouped.modelled(wide) == apart.modelled(wide)


def test_target_is_cpu_only(tiny_model):
    cfg, w = tiny_model
    with pytest.raises(ValueError, match="cpu-only runtime only"):
        Engine(cfg, w, "gpu+cpu-experts", max_len=MAX_LEN, simulate_accelerators=True, tpot_target_ms=20)
