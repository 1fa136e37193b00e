"""The paged KV cache and prefix sharing: block accounting, exactness against cold runs,
partial-block prefixes, eviction under pressure, shared blocks, cancellation."""

import numpy as np
import pytest

from jaxmoe.serving.engine import Engine
from jaxmoe.serving.kv_blocks import NULL_BLOCK, BlockPool, KVBlocks, block_hashes
from jaxmoe.serving.request import Request, RequestRefused

BS = 16  # block size = chunk size: a prompt resumed after shared blocks runs the chunks a cold run does
MAX_LEN = 128
NEW = 6


def engine(tiny_model, **kw):
    cfg, w = tiny_model
    opts = dict(n_slots=2, max_len=MAX_LEN, chunk_size=BS, kv_block_size=BS) | kw
    return Engine(cfg, w, **opts)


def run(e, prompt, n=NEW):
    r = e.submit(prompt, n, background=False)
    e.run_until_idle()
    return r


@pytest.fixture(scope="module")
def texts(tiny_model):
    cfg, _ = tiny_model
    rng = np.random.RandomState(5)
    system = list(rng.randint(0, cfg.vocab_size, 2 * BS + 5))  # two full blocks and a partial one
    return system, [list(rng.randint(0, cfg.vocab_size, n)) for n in (9, 23, 14)]


# ---- bookkeeping -------------------------------------------------------------------------------


def test_hashes_chain_over_the_whole_prefix():
    a = block_hashes(list(range(40)), 16, "m")
    b = block_hashes([0, *range(1, 16), *range(100, 124)], 16, "m")
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    c = block_hashes([*range(16), *range(16, 32)], 16, "other model")
    assert c[0] != a[0]  # the seed (fingerprint) is part of every hash
    d = block_hashes([99, *range(1, 32)], 16, "m")
    assert d[1] != a[1]  # block 1's name depends on block 0's tokens too


def test_pool_shares_evicts_least_recently_used_and_refuses_without_change():
    pool = BlockPool(5)  # 4 usable + null
    a = pool.take([], 2)
    pool.register(a[0], "h0")
    pool.register(a[1], "h1")
    b = pool.take([], 2)
    assert NULL_BLOCK not in a + b and len(set(a + b)) == 4
    assert pool.take([], 1) is None and pool.usable == 0
    pool.release(a)  # registered: cached, idle
    assert pool.usable == 2 and pool.match(["h0", "h1", "h2"]) == a
    shared = pool.take(pool.match(["h0"]), 0)  # h0 is held again: only h1 may be evicted
    assert shared == [a[0]] and pool.refs[a[0]] == 1
    c = pool.take([], 1)
    assert c == [a[1]] and pool.match(["h0", "h1"]) == [a[0]]  # h1 evicted, its name dropped
    assert pool.take([], 1) is None
    before = (list(pool.free), dict(pool.by_hash), pool.refs.copy())
    assert pool.take([a[0]], 5) is None  # nothing referenced when it fails
    assert (list(pool.free), dict(pool.by_hash)) == before[:2] and (pool.refs == before[2]).all()
    pool.release(b + c + shared)
    assert pool.usable == 4


def test_partial_blocks_match_only_when_all_their_tokens_do():
    pool = BlockPool(6)
    a, b = pool.take([], 2)
    pool.register_partial(a, "p", [5, 6, 7])
    pool.register_partial(b, "p", [5, 6])
    pool.register_partial(b, "q", [5, 6, 7])  # a block is kept under one name only
    pool.release([a, b])
    assert pool.usable == 5 and set(pool.idle) == {a, b}
    assert pool.match_partial("p", [5, 6, 7, 8]) == (a, 3)  # the longest that fits
    assert pool.match_partial("p", [5, 6, 9]) == (b, 2)
    assert pool.match_partial("p", [5, 6]) == (b, 2) and pool.match_partial("p", [5]) is None
    assert pool.match_partial("q", [5, 6, 7]) is None
    taken = pool.take([], 5)  # evicts both: their names go
    assert set(taken) >= {a, b} and pool.match_partial("p", [5, 6, 7]) is None


def test_admission_reserves_only_what_the_request_needs():
    blocks = KVBlocks([1 + 6], lambda s: 0, 16, 96)
    r1, r2, r3 = Request(list(range(20)), 12), Request(list(range(30)), 30), Request(list(range(5)), 60)
    assert blocks.admit(r1, 0) and len(blocks.table(r1)) == 2  # 32 positions
    assert blocks.admit(r2, 1) and len(blocks.table(r2)) == 4  # 60 positions
    assert not blocks.admit(r3, 2)  # 65 positions: 5 blocks, the pool has 0 left
    blocks.release(r2)
    assert not blocks.admit(r3, 2)  # 4 free
    blocks.release(r1)
    assert blocks.admit(r3, 2) and r3.cached_tokens == 0


def test_a_request_larger_than_the_pool_is_refused(tiny_model):
    cfg, _ = tiny_model
    from jaxmoe.serving.engine import cache_bytes_per_position

    e = engine(tiny_model, max_len=None, memory_budget_bytes=3 * BS * cache_bytes_per_position(cfg, np.float32))
    with pytest.raises(RequestRefused):
        e.submit(list(range(2 * BS)), 2 * BS, background=False)


# ---- sharing in the engine ---------------------------------------------------------------------


def test_shared_prefix_gives_the_cold_tokens_and_latents(tiny_model, texts):
    system, (x, y, _) = texts
    cold = engine(tiny_model, prefix_caching=False)
    ref = run(cold, system + y)
    warm = engine(tiny_model)
    first = run(warm, system + x)
    assert first.cached_tokens == 0
    second = warm.submit(system + y, NEW, background=False)
    warm.step()  # admitted: shares the two full blocks of the system prompt, not the partial third
    assert second.cached_tokens == 2 * BS
    hashes = block_hashes(system, BS, warm.blocks.seed)
    assert warm.blocks.table(second)[:2] == warm.blocks.pools[0].match(hashes)  # the blocks the first request filled
    warm.run_until_idle()
    assert second.output_ids == ref.output_ids
    assert cold.blocks.pools[0].by_hash == {}  # off: nothing registered


def test_partial_block_prefix_is_recomputed(tiny_model, texts):
    system, (x, _, _) = texts
    e = engine(tiny_model)
    run(e, system[:BS + 7] + x)  # one full block of the system prompt, then x
    r = run(e, system + x)  # shares block 0 only: block 1 differs after 7 tokens
    assert r.cached_tokens == BS
    again = run(e, system + x)  # its own prompt's blocks are registered now (2 full ones of the system + x's)
    assert again.cached_tokens == (len(system + x) - 1) // BS * BS
    assert again.output_ids == r.output_ids


def test_whole_prompt_cached_still_computes_the_last_token(tiny_model, texts):
    system, _ = texts
    prompt = system[: 2 * BS]  # exactly two blocks
    e = engine(tiny_model)
    a = run(e, prompt)
    b = run(e, prompt)
    assert b.cached_tokens == BS  # the second block holds the last token: it is recomputed
    assert b.output_ids == a.output_ids


def test_latents_of_a_shared_prefix_equal_a_cold_prefill(tiny_model, texts):
    """Bit for bit: the resumed prompt's latents (through its block table) equal a cold run's."""
    system, (x, y, _) = texts
    cold = engine(tiny_model, prefix_caching=False)
    c = cold.submit(system + y, NEW, background=False)
    while c.n_prefilled < len(c.prompt_ids):
        cold.step()
    n = len(system + y)
    cold_kv = gather(cold, cold.blocks.table(c), n)
    warm = engine(tiny_model)
    run(warm, system + x)
    w = warm.submit(system + y, NEW, background=False)
    while w.n_prefilled < len(w.prompt_ids):
        warm.step()
    assert w.cached_tokens == 2 * BS
    warm_kv = gather(warm, warm.blocks.table(w), n)
    for a, b in zip(cold_kv, warm_kv):
        np.testing.assert_array_equal(a, b)
    cold.run_until_idle()
    warm.run_until_idle()
    assert c.output_ids == w.output_ids


def gather(e, table, n):
    """(c_kv, k_pe) [L, n, .] of a sequence, read from the pool through its block table."""
    out = []
    for a in (e.executor.cache.c_kv, e.executor.cache.k_pe):
        a = np.asarray(a)[:, list(table)]  # [L, nb, bs, d]
        out.append(a.reshape(a.shape[0], -1, a.shape[-1])[:, :n])
    return out


def test_chat_turn_reuses_the_previous_turn_including_its_reply(tiny_model, texts):
    system, (x, y, _) = texts
    e = engine(tiny_model)
    t1 = run(e, system + x, 2 * BS)
    history = system + x + t1.output_ids
    t2 = run(e, history + y)
    written = len(system + x) + len(t1.output_ids) - 1  # the last reply token was never fed back
    assert written % BS  # the reply ends mid-block: that block's tokens come from the kept partial block
    assert t2.cached_tokens == written and e.blocks.partial_hits == 1
    cold = engine(tiny_model, prefix_caching=False)
    assert run(cold, history + y).output_ids == t2.output_ids  # reply blocks: decode-form latents, same greedy tokens


def test_concurrent_requests_share_blocks_and_references_come_back(tiny_model, texts):
    system, (x, y, z) = texts
    e = engine(tiny_model, n_slots=3)
    solo = [run(engine(tiny_model, prefix_caching=False), system + s).output_ids for s in (y, z)]
    run(e, system + x)
    pool = e.blocks.pools[0]
    full = pool.usable
    b, c = (e.submit(system + s, NEW, background=False) for s in (y, z))
    e.step()
    shared = e.blocks.table(b)[:2]
    assert e.blocks.table(c)[:2] == shared and all(pool.refs[s] == 2 for s in shared)
    e.run_until_idle()
    assert [b.output_ids, c.output_ids] == solo
    assert pool.usable == full and not pool.refs.any()


def test_cancellation_releases_references(tiny_model, texts):
    system, (x, y, _) = texts
    e = engine(tiny_model)
    run(e, system + x)
    pool = e.blocks.pools[0]
    full = pool.usable
    r = e.submit(system + y, 50, background=False)
    for _ in range(3):
        e.step()
    assert pool.usable < full
    r.cancel()
    e.run_until_idle()
    assert r.finish_reason == "cancelled" and pool.usable == full and not pool.refs.any()


def test_eviction_under_pressure_while_requests_run(tiny_model, texts):
    """A pool of 10 blocks for 2 slots: cached prefixes are evicted to admit new requests and
    every request still gets its cold tokens; nothing leaks."""
    cfg, _ = tiny_model
    system, _ = texts
    rng = np.random.RandomState(11)
    prompts = [system[: rng.randint(BS, len(system))] + list(rng.randint(0, cfg.vocab_size, rng.randint(3, 30)))
               for _ in range(8)]
    cold = engine(tiny_model, prefix_caching=False)
    ref = [run(cold, p).output_ids for p in prompts]
    from jaxmoe.serving.engine import cache_bytes_per_position

    per_pos = cache_bytes_per_position(cfg, tiny_model[1].embed_tokens.dtype)
    e = engine(tiny_model, max_len=80, memory_budget_bytes=10 * BS * per_pos)
    assert e.executor.pool_blocks == [11]
    reqs = [e.submit(p, NEW, background=False) for p in prompts]
    e.run_until_idle()
    assert [r.output_ids for r in reqs] == ref
    assert sum(r.cached_tokens for r in reqs) > 0
    pool = e.blocks.pools[0]
    assert pool.usable == 10 and not pool.refs.any()


def test_an_evicted_prefix_is_never_served(tiny_model, texts):
    """A's prefix blocks are taken for B and C while they run; D, with A's prefix, must then
    compute it again (a stale name would hand D the blocks B and C wrote)."""
    cfg, w = tiny_model
    system, (x, y, z) = texts
    rng = np.random.RandomState(3)
    other = [list(rng.randint(0, cfg.vocab_size, 3 * BS)) for _ in range(2)]
    from jaxmoe.serving.engine import cache_bytes_per_position

    per_pos = cache_bytes_per_position(cfg, w.embed_tokens.dtype)
    e = engine(tiny_model, max_len=80, memory_budget_bytes=8 * BS * per_pos)
    run(e, system + x)  # registers the system prompt's blocks (idle once A is done)
    b, c = (e.submit(o, BS, background=False) for o in other)  # 4 blocks each: the whole pool
    e.run_until_idle()
    assert b.cached_tokens == c.cached_tokens == 0
    d = run(e, system + y)
    assert d.cached_tokens == 0
    assert d.output_ids == run(engine(tiny_model, prefix_caching=False), system + y).output_ids


# ---- the store on disk -------------------------------------------------------------------------


def test_prefix_blocks_survive_a_restart_on_disk(tiny_model, texts, tmp_path):
    """A new engine on the same directory starts from the blocks an earlier one wrote, with the
    latents and tokens of a cold run; other weights (another identity) never see them."""
    system, (x, y, _) = texts
    first = engine(tiny_model, prefix_cache_dir=tmp_path, weights_identity="tiny-a")
    run(first, system + x)
    first.blocks.flush()
    assert len(first.blocks.store) >= 2
    del first

    cold = engine(tiny_model, prefix_caching=False)
    c = cold.submit(system + y, NEW, background=False)
    while c.n_prefilled < len(c.prompt_ids):
        cold.step()
    cold_kv = gather(cold, cold.blocks.table(c), len(c.prompt_ids))

    other = engine(tiny_model, prefix_cache_dir=tmp_path, weights_identity="tiny-b")
    assert run(other, system + y).cached_tokens == 0 and other.blocks.disk_hits == 0

    again = engine(tiny_model, prefix_cache_dir=tmp_path, weights_identity="tiny-a")
    r = again.submit(system + y, NEW, background=False)
    while r.n_prefilled < len(r.prompt_ids):
        again.step()
    assert r.cached_tokens == 2 * BS and again.blocks.disk_hits == 2
    for a, b in zip(cold_kv, gather(again, again.blocks.table(r), len(r.prompt_ids))):
        np.testing.assert_array_equal(a, b)
    cold.run_until_idle()
    again.run_until_idle()
    assert r.output_ids == c.output_ids


def test_a_corrupt_block_on_disk_is_recomputed(tiny_model, texts, tmp_path):
    system, (x, y, _) = texts
    first = engine(tiny_model, prefix_cache_dir=tmp_path, weights_identity="tiny")
    run(first, system + x)
    first.blocks.flush()
    files = sorted(tmp_path.rglob("*.safetensors"))
    target = next(f for f in files if f.stem == block_hashes(system, BS, first.blocks.seed)[1])
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the tensor data
    target.write_bytes(bytes(data))
    again = engine(tiny_model, prefix_cache_dir=tmp_path, weights_identity="tiny")
    with pytest.warns(RuntimeWarning, match="crc|corrupt|checksum"):
        r = run(again, system + y)
    assert r.cached_tokens == BS and again.blocks.disk_hits == 1  # block 0 from disk, block 1 recomputed
    assert r.output_ids == run(engine(tiny_model, prefix_caching=False), system + y).output_ids


def test_a_prefix_directory_needs_an_identity(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="weights_identity"):
        engine(tiny_model, prefix_cache_dir=tmp_path)


@pytest.mark.parametrize("preset", ["gpu+cpu-experts", "2gpu+cpu-experts"])
def test_staged_presets_share_prefixes_within_their_pools(tiny_model, texts, preset):
    """Staged execution: one pool for both micro-batches on one accelerator, one per
    accelerator on two (slot 0 and slot 1 are in different micro-batches); a shared prefix
    gives the cold tokens either way."""
    system, (x, y, z) = texts
    kw = dict(runtime=preset, simulate_accelerators=True, prefill_strategy="cpu")
    cold = engine(tiny_model, prefix_caching=False, **kw)
    ref = [run(cold, p).output_ids for p in (system + x, system + y, z, system + y)]
    e = engine(tiny_model, **kw)
    assert len(e.executor.pool_blocks) == (1 if preset == "gpu+cpu-experts" else 2)
    a = run(e, system + x)  # slot 0
    b = run(e, system + y)  # slot 0 again: the same pool
    c = e.submit(z, NEW, background=False)  # holds slot 0 ...
    d = e.submit(system + y, NEW, background=False)  # ... so this one takes slot 1
    e.step()
    assert (c.slot, d.slot) == (0, 1) and b.cached_tokens == 2 * BS
    assert d.cached_tokens == ((len(system + y) - 1) // BS * BS if preset == "gpu+cpu-experts" else 0)  # b's blocks
    e.run_until_idle()
    assert [r.output_ids for r in (a, b, c, d)] == ref


@pytest.mark.parametrize("strategy", ["slp", "dslp"])
def test_a_streamed_prompt_resumes_after_its_cached_prefix(tiny_model, texts, strategy):
    """SLP/DSLP: the cached prefix's latents are copied from the pool into the streamed
    prompt's own cache and streaming starts after them: the cold tokens, fewer chunks."""
    system, (x, y, _) = texts
    kw = dict(runtime="2gpu+cpu-experts", simulate_accelerators=True, prefill_strategy=strategy)
    cold = engine(tiny_model, prefix_caching=False, **kw)
    ref = run(cold, system + y).output_ids
    e = engine(tiny_model, **kw)
    run(e, system + x)
    starts = []
    compute = e.prefill.compute_chunk  # both ways of running streamed chunks (beside decode: the presets' default)
    e.prefill.compute_chunk = lambda row: starts.append(row.start) or compute(row)
    r = run(e, system + y)
    assert r.prefill_strategy == strategy and r.cached_tokens == 2 * BS
    assert starts == list(range(2 * BS, len(system + y), BS))
    assert r.output_ids == ref
