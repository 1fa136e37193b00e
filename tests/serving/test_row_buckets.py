"""A step runs only the busy slots: `KVCache.rows` maps the step's rows to cache slots, and
the fused executor picks the rows (`active_rows`) and a power-of-two bucket of them."""

import jax
import numpy as np
import pytest

from jaxmoe.model.cache import init_cache
from jaxmoe.model.forward import forward_absorbed, forward_expanded
from jaxmoe.serving.engine import Engine
from jaxmoe.serving.executors import active_rows
from jaxmoe.step_shapes import MIN_WIDTH_BUCKET, STEP_OVERHEAD_COLUMNS, next_chunk, remainder_chunks, row_bucket, width_bucket

MAX_LEN = 32
_prefill = jax.jit(forward_expanded, static_argnums=0)
_decode = jax.jit(forward_absorbed, static_argnums=0)


@pytest.mark.parametrize("n,slots,want", [(1, 4, 1), (2, 4, 2), (3, 4, 4), (4, 4, 4), (3, 3, 3), (5, 8, 8), (0, 4, 1)])
def test_row_bucket(n, slots, want):
    assert row_bucket(n, slots) == want


@pytest.mark.parametrize("n,width,want", [(1, 64, 1), (2, 64, 16), (16, 64, 16), (17, 64, 32), (40, 64, 64), (64, 64, 64),
                                            (100, 256, 128), (3, 8, 8)])
def test_width_bucket(n, width, want):
    assert width_bucket(n, width) == want


def test_active_rows_puts_busy_slots_first_and_pads_with_idle_ones():
    busy = np.zeros(4, bool)
    assert active_rows(busy).tolist() == [0]
    busy[2] = True
    assert active_rows(busy).tolist() == [2]
    busy[3] = True
    assert active_rows(busy).tolist() == [2, 3]
    busy[0] = True
    assert active_rows(busy).tolist() == [0, 2, 3, 1]


def test_rows_address_cache_slots(tiny_model):
    """Prefill two prompts into slots 3 and 1 of a 4-slot cache through `rows`, then decode
    slot 1 alone: logits and cache contents equal a dense 2-row run, and the slots no row
    addresses stay untouched."""
    cfg, w = tiny_model
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 6)).astype(np.int32)
    positions = np.tile(np.arange(6, dtype=np.int32), (2, 1))
    positions[1, 4:] = MAX_LEN  # second prompt is 4 long (padding dropped)
    last = np.array([5, 3])
    dense_logits, dense = _prefill(cfg, w, init_cache(cfg, 2, MAX_LEN), tokens, positions, logit_index=last)
    rows = np.array([3, 1], np.int32)
    sparse = init_cache(cfg, 4, MAX_LEN).replace(rows=rows)
    logits, sparse = _prefill(cfg, w, sparse, tokens, positions, logit_index=last)
    np.testing.assert_allclose(logits, dense_logits, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(sparse.c_kv[:, rows], dense.c_kv)
    np.testing.assert_array_equal(sparse.k_pe[:, rows], dense.k_pe)
    assert not np.any(sparse.c_kv[:, [0, 2]])

    nxt = np.array([[5]], np.int32)
    d_logits, _ = _decode(cfg, w, dense.replace(rows=np.array([1], np.int32)), nxt, np.array([[4]], np.int32))
    s_logits, _ = _decode(cfg, w, sparse.replace(rows=np.array([1], np.int32)), nxt, np.array([[4]], np.int32))
    np.testing.assert_allclose(s_logits, d_logits, atol=1e-6, rtol=0)


def spy_engine(cfg, w, chunk_size=8, max_len=MAX_LEN):
    """An engine whose row groups' (shape, rows' slots) land in `seen`, their key windows in
    `eng.kv_lens`: a program's, or each group's of a grouped program (decode rows, then chunks)."""
    eng = Engine(cfg, w, "cpu-only", n_slots=4, max_len=max_len, chunk_size=chunk_size, decode_chunk_size=None)
    seen, eng.kv_lens, eng.grouped = [], [], []
    program, grouped = eng.executor._program, eng.executor._grouped

    def record(table, tokens, kv_len):
        # the slot of each row, from its block table (-1: a padding row's null table)
        running = {tuple(eng.blocks.table(r)): s for s, r in eng.scheduler.running.items()}
        rows = [running.get(tuple(t[: len(next(iter(running)))]), -1) for t in np.asarray(table)]
        seen.append((tokens.shape, rows))
        eng.kv_lens.append(kv_len)

    def spy(cfg_, weights, cache, table, tokens, *rest, **kw):
        record(table, tokens, kw["kv_len"])
        return program(cfg_, weights, cache, table, tokens, *rest, **kw)

    def spy_grouped(cfg_, weights, cache, groups, *rest, **kw):
        eng.grouped.append(len(seen))
        for (tokens, _, table, _), kv_len in zip(groups, kw["kv_lens"]):
            record(table, tokens, kv_len)
        return grouped(cfg_, weights, cache, groups, *rest, **kw)

    eng.executor._program, eng.executor._grouped = spy, spy_grouped
    return eng, seen


def test_lone_request_runs_one_row(tiny_model):
    eng, seen = spy_engine(*tiny_model)
    r = eng.submit([3, 4, 5], 3, background=False)
    eng.run_until_idle()
    assert len(r.output_ids) == 3
    assert [shape for shape, _ in seen] == [(1, 8), (1, 1), (1, 1)]
    assert all(rows == [0] for _, rows in seen)


def test_short_prompt_runs_a_narrow_step(tiny_model):
    cfg, w = tiny_model
    eng, seen = spy_engine(cfg, w, chunk_size=32)
    r = eng.submit(list(range(3, 8)), 2, background=False)  # 5 tokens: a 16-wide step, not 32
    eng.run_until_idle()
    assert [shape for shape, _ in seen] == [(1, 16), (1, 1)] and len(r.output_ids) == 2


def test_mixed_step_runs_decode_rows_at_width_one(tiny_model):
    """A prompt chunk arriving while another request decodes: the decode row runs at width 1,
    the chunk at full width (8: narrow, so the two groups run in one program), and both
    requests get their solo tokens."""
    cfg, w = tiny_model
    solo = []
    for prompt in ([3, 4, 5], list(range(7, 27))):
        eng, _ = spy_engine(cfg, w)
        r = eng.submit(prompt, 4, background=False)
        eng.run_until_idle()
        solo.append(r.output_ids)
    eng, seen = spy_engine(cfg, w)
    a = eng.submit([3, 4, 5], 4, background=False)
    eng.step()  # a's prompt
    eng.step()  # a decodes alone
    b = eng.submit(list(range(7, 27)), 4, background=False)
    del seen[:]
    eng.step()  # a decodes while b's first chunk runs
    assert seen == [((1, 1), [0]), ((1, 8), [1])] and eng.grouped == [0]
    eng.run_until_idle()
    assert [a.output_ids, b.output_ids] == solo


def test_each_program_of_a_mixed_step_attends_over_its_own_keys(tiny_model):
    """A decode row beside a prompt chunk that reaches further: the decode rows attend over
    their own key window, not the chunk's, and both requests get their solo tokens."""
    cfg, w = tiny_model
    prompts = ([3, 4, 5], list(range(7, 97)))
    solo = []
    for prompt in prompts:
        eng, _ = spy_engine(cfg, w, max_len=256)
        r = eng.submit(prompt, 12, background=False)
        eng.run_until_idle()
        solo.append(r.output_ids)
    eng, seen = spy_engine(cfg, w, max_len=256)
    a = eng.submit(prompts[0], 12, background=False)
    eng.step()  # a's prompt
    b = eng.submit(prompts[1], 12, background=False)
    eng.run_until_idle()
    runs = list(zip([shape for shape, _ in seen], eng.kv_lens))
    mixed = [(d, c) for d, c in zip(runs, runs[1:]) if d[0] == (1, 1) and c[0] == (1, 8)]  # a's row, then b's chunk
    assert len(mixed) == 11  # a's 11 decode steps, each beside one of b's 12 chunks
    assert {d[1] for d, _ in mixed} == {64}  # a ends before 16 keys
    assert {c[1] for _, c in mixed} == {64, 128}  # b's chunks reach 90
    assert [a.output_ids, b.output_ids] == solo


def _cost(chunks, width, overhead):
    return sum(overhead + width_bucket(c, width) for c in chunks)


def _cheapest(n, width, overhead, memo={}):  # noqa: B006  (a memo across calls)
    """Brute force over every cut of n tokens into steps of <= width columns, each chunk but the
    last at least MIN_WIDTH_BUCKET (a 1-token step is not 1 column's cost): the least cost."""
    key = (n, width, overhead)
    if key not in memo:
        memo[key] = min([overhead + width_bucket(n, width)]
                        + [overhead + width_bucket(c, width) + _cheapest(n - c, width, overhead)
                           for c in range(MIN_WIDTH_BUCKET, min(n - 1, width) + 1)])
    return memo[key]


@pytest.mark.parametrize("width,overhead", [(256, 16), (64, 16), (256, 4), (100, 16)])
def test_remainder_chunks_cost_the_least(width, overhead):
    """Every remainder is cut at the least cost of any cut into steps (brute force over all cuts),
    its chunks cover it exactly, only the last one partly fills its bucket, and ties go to fewer steps."""
    for n in range(1, width + 1):
        chunks = remainder_chunks(n, width, overhead)
        assert sum(chunks) == n and all(0 < c <= width for c in chunks), (n, chunks)
        assert all(width_bucket(c, width) == c for c in chunks[:-1]), (n, chunks)
        assert _cost(chunks, width, overhead) == _cheapest(n, width, overhead), (n, chunks)
        if _cost((n,), width, overhead) == _cheapest(n, width, overhead):
            assert chunks == (n,)


def test_next_chunk():
    assert remainder_chunks(151, 256) == (128, 23)  # 160 columns in two steps, not 256 in one
    assert next_chunk(1000, 256) == 256 and next_chunk(151, 256) == 128 and next_chunk(23, 256) == 23
    assert next_chunk(151, 256, None) == 151 and next_chunk(250, 256) == 250
    with pytest.raises(ValueError, match="do not fit"):
        remainder_chunks(300, 256)


def test_cpu_engine_cuts_a_prompt_tail_into_buckets(tiny_model):
    """The cpu-only engine runs a 72-token prompt in 128-wide steps as 64 + 8 (steps of 64 and
    16 columns, not one of 128) and generates the tokens of the same engine told not to cut
    (`step_overhead` None: what the accelerator presets do, whose padding costs next to nothing)."""
    cfg, w = tiny_model
    assert remainder_chunks(72, 128) == (64, 8)
    prompt = [int(t) for t in np.random.default_rng(3).integers(2, cfg.vocab_size, 72)]
    out = {}
    for overhead in (STEP_OVERHEAD_COLUMNS, None):
        eng, seen = spy_engine(cfg, w, chunk_size=128, max_len=128)
        assert eng.scheduler.step_overhead == STEP_OVERHEAD_COLUMNS
        eng.scheduler.step_overhead = overhead
        r = eng.submit(prompt, 3, background=False)
        eng.run_until_idle()
        out[overhead] = r.output_ids
        want = [(1, 64), (1, 16)] if overhead else [(1, 128)]
        assert [shape for shape, _ in seen] == [*want, (1, 1), (1, 1)]
    assert out[STEP_OVERHEAD_COLUMNS] == out[None] and len(out[None]) == 3
