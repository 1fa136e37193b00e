"""The continuous-batching scheduler's bookkeeping, without a model."""

import pytest

from jaxmoe.serving.request import Request, RequestRefused, Status
from jaxmoe.serving.scheduler import Scheduler


def req(n_prompt, max_new=4, **kw):
    return Request(list(range(1, n_prompt + 1)), max_new, **kw)


def run_step(s: Scheduler, token=7):
    plan = s.plan()
    assert plan is not None
    sampled = {slot: token for slot, row in plan.rows.items() if row.samples}
    return plan, s.update(plan, sampled)


def test_refuses_what_can_never_fit():
    s = Scheduler(n_slots=2, max_len=16, chunk_size=4)
    with pytest.raises(RequestRefused, match="13 prompt \\+ 4 new = 17 positions.*holds 16"):
        s.add(req(13))
    with pytest.raises(RequestRefused, match="empty prompt"):
        s.add(Request([], 3))
    s.add(req(12))  # exactly fits


def test_chunked_prefill_then_one_token_per_step():
    s = Scheduler(n_slots=1, max_len=64, chunk_size=4)
    r = req(10, max_new=3)
    s.add(r)
    widths, starts = [], []
    while s.has_work():
        plan, _ = run_step(s)
        widths.append(plan.width)
        starts.append(plan.rows[0].start)
    # 10 prompt tokens in chunks 4+4+2 (the last one samples), then 2 decode steps
    assert starts == [0, 4, 8, 10, 11]
    assert widths == [4, 4, 4, 1, 1]
    assert r.output_ids == [7, 7, 7] and r.finish_reason == "length"


def test_waits_for_a_free_slot_and_mixes_prefill_with_decode():
    s = Scheduler(n_slots=1, max_len=64, chunk_size=8)
    a, b = req(3, max_new=2), req(5, max_new=2)
    s.add(a)
    s.add(b)
    run_step(s)
    assert a.status is Status.DECODE and b.status is Status.WAITING
    run_step(s)  # a finishes (2 tokens), b still waiting until the slot frees
    assert a.finish_reason == "length" and b.status is Status.WAITING
    s2 = Scheduler(n_slots=2, max_len=64, chunk_size=8)
    c, d = req(3, max_new=5), req(20, max_new=2)
    s2.add(c)
    run_step(s2)  # c prefilled
    s2.add(d)
    plan, _ = run_step(s2)
    kinds = sorted((len(r.tokens), r.samples) for r in plan.rows.values())
    assert kinds == [(1, True), (7, False)]  # c decodes while d's first chunk fills the budget
    assert plan.width == 8


def test_smaller_chunks_while_others_decode():
    """decode_chunk_size caps the prompt tokens of a step that also carries decode rows (the
    decoders wait for it); a prompt alone gets full chunk_size steps."""
    s = Scheduler(n_slots=2, max_len=128, chunk_size=32, decode_chunk_size=8)
    a = req(40, max_new=4)
    s.add(a)
    plan, _ = run_step(s)
    assert plan.width == 32 and [len(r.tokens) for r in plan.rows.values()] == [32]
    run_step(s)  # the rest of a's prompt: a decodes from here
    b = req(20, max_new=2)
    s.add(b)
    plan, _ = run_step(s)
    assert plan.width == 8 and sorted(len(r.tokens) for r in plan.rows.values()) == [1, 8]
    with pytest.raises(ValueError, match="decode_chunk_size"):
        Scheduler(n_slots=2, max_len=128, chunk_size=32, decode_chunk_size=0)


def test_eos_and_stop_sequences_end_requests():
    s = Scheduler(n_slots=2, max_len=64, chunk_size=8)
    a = req(3, max_new=10, eos_token_ids=(7,))
    b = req(3, max_new=10, stop_token_ids=((5, 6),))
    s.add(a)
    s.add(b)
    plan, done = run_step(s, token=7)
    assert a.finish_reason == "eos" and a in done and b.finish_reason is None
    for t in (5, 6):
        plan = s.plan()
        s.update(plan, {slot: t for slot in plan.rows})
    assert b.finish_reason == "stop" and b.output_ids == [7, 5, 6]
    assert not s.has_work()


def test_cancellation_frees_the_slot_and_ends_the_stream():
    s = Scheduler(n_slots=1, max_len=64, chunk_size=8)
    a, b = req(3, max_new=10), req(3, max_new=1)
    s.add(a)
    s.add(b)
    run_step(s)
    a.cancel()
    plan, _ = run_step(s)
    assert a.finish_reason == "cancelled"
    assert list(plan.rows.values())[0].request is b
    events = list(a.events(timeout=1))
    assert events[-1].finish_reason == "cancelled" and [e.token for e in events[:-1]] == [7]


def fake_step_time(decoders, chunks, end, chunk_ends):
    """Seconds: 1 per decode row + 0.1 per prompt token (no dependence on the windows)."""
    return decoders + 0.1 * sum(chunks)


def test_tpot_target_sizes_the_chunk_of_steps_with_decoders():
    """With decoders, the chunk is the widest width bucket (16, 32, ... up to decode_chunk_size)
    whose predicted step fits the target; alone, the prompt takes chunk_size."""
    s = Scheduler(n_slots=2, max_len=512, chunk_size=128, decode_chunk_size=64, tpot_target_s=5.0,
                  step_time=fake_step_time)
    a = req(3, max_new=50)
    s.add(a)
    run_step(s)  # a decodes from here
    b = req(200, max_new=2)
    s.add(b)
    plan, _ = run_step(s)
    assert plan.width == 64  # the planned width stays the cap: the executor narrows to the bucket
    assert sorted(len(r.tokens) for r in plan.rows.values()) == [1, 32]  # 1 + 3.2 <= 5 < 1 + 6.4
    assert plan.predicted_s == pytest.approx(4.2) and plan.predicted_s <= s.tpot_target_s
    a.cancel()
    plan, _ = run_step(s)  # b alone: a full chunk
    assert [len(r.tokens) for r in plan.rows.values()] == [128] and plan.predicted_s is None


def test_a_tight_tpot_target_plans_narrow_chunks_in_narrow_steps():
    """Under MIN_WIDTH_BUCKET the chunk is 8, 4, 2 or 1 token(s) and the step that narrow
    (`narrow_width`), so the executor does not pad it to 16 columns."""
    s = Scheduler(n_slots=2, max_len=512, chunk_size=128, decode_chunk_size=64, tpot_target_s=1.85,
                  step_time=fake_step_time)
    a = req(3, max_new=50)
    s.add(a)
    run_step(s)
    b = req(13, max_new=2)
    s.add(b)
    widths, chunks = [], []
    while b.status is not Status.DECODE:
        plan, _ = run_step(s)
        widths.append(plan.width)
        chunks.append(len(plan.rows[b.slot].tokens))
    assert chunks == [8, 5] and widths == [8, 8]  # 1 + 0.8 <= 1.85 < 1 + 1.6; the last 5 run 8 wide


def test_a_tpot_target_prefers_a_chunk_that_compiles_nothing():
    """Where the model knows what has been compiled, the widest fitting chunk whose programs have
    run is taken over a wider one that would compile (and stall the decoders meanwhile)."""
    def step_time(decoders, chunks, end, chunk_ends):
        return fake_step_time(decoders, chunks, end, chunk_ends)

    step_time.compiled = lambda decoders, chunks, end, chunk_ends: max(chunks) <= 8
    s = Scheduler(n_slots=2, max_len=512, chunk_size=128, decode_chunk_size=64, tpot_target_s=5.0, step_time=step_time)
    a = req(3, max_new=50)
    s.add(a)
    run_step(s)
    s.add(req(200, max_new=2))
    plan, _ = run_step(s)
    assert sorted(len(r.tokens) for r in plan.rows.values()) == [1, 8]  # 32 fits the target, but would compile
    step_time.compiled = lambda *a: False  # nothing run yet: the widest that fits
    plan, _ = run_step(s)
    assert sorted(len(r.tokens) for r in plan.rows.values()) == [1, 32]


def test_impossible_tpot_target_still_advances_the_prompt():
    s = Scheduler(n_slots=2, max_len=512, chunk_size=128, decode_chunk_size=64, tpot_target_s=1e-6,
                  step_time=fake_step_time)
    a, b = req(3, max_new=60), req(100, max_new=2)
    s.add(a)
    run_step(s)
    s.add(b)
    chunks = []
    while b.status is not Status.DECODE and b.finish_reason is None:
        plan, _ = run_step(s)
        chunks.append(len(plan.rows[b.slot].tokens))
    # one token per step beside a's decode row (it runs with it), the rest at once when a is done
    assert chunks == [1] * 59 + [41]
    assert b.output_ids == [7]


def test_tpot_target_needs_a_step_model():
    with pytest.raises(ValueError, match="step_time"):
        Scheduler(n_slots=2, max_len=64, chunk_size=8, tpot_target_s=0.02)
