"""A mixed step in one program (`model.groups.run_groups`): decode rows and a narrow prompt
chunk attend apart, each over its own key window, and share every per-token weight read."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.model.forward import forward_absorbed
from jaxmoe.model.groups import forward_groups
from jaxmoe.serving.engine import Engine
from jaxmoe.serving.executors import paged_pool
from jaxmoe.serving.request import Status
from jaxmoe.step_shapes import groups_in_one_program
from tests.serving.test_engine import MAX_LEN, greedy_reference

BLOCK = 8


def _filled_pool(cfg, rng, n_blocks: int):
    pool = paged_pool(cfg, n_blocks * BLOCK, BLOCK, MAX_LEN, jnp.float32)
    return pool.replace(c_kv=jnp.asarray(rng.standard_normal(pool.c_kv.shape), jnp.float32),
                        k_pe=jnp.asarray(rng.standard_normal(pool.k_pe.shape), jnp.float32))


def test_groups_attend_apart_and_give_each_group_its_own_logits(tiny_model):
    """Three decode rows (one padding row among them) over 16 keys beside a 4-token chunk over 64:
    logits and cache writes equal each group run alone."""
    cfg, w = tiny_model
    rng = np.random.default_rng(0)
    pool = _filled_pool(cfg, rng, 4 * MAX_LEN // BLOCK)
    tables = rng.permutation(np.arange(1, pool.c_kv.shape[1]))[: 4 * (MAX_LEN // BLOCK)].reshape(4, -1).astype(np.int32)
    dec_tok = rng.integers(0, cfg.vocab_size, (4, 1)).astype(np.int32)
    dec_pos = np.array([[9], [12], [MAX_LEN], [15]], np.int32)  # row 2: padding (never stored)
    chunk_tok = rng.integers(0, cfg.vocab_size, (1, 4)).astype(np.int32)
    chunk_pos = np.array([[40, 41, 42, MAX_LEN]], np.int32)  # 3 real tokens, one padding column
    dec_last, chunk_last = np.zeros(4, np.int32), np.array([2], np.int32)

    alone = []
    cache = pool
    for tok, pos, table, last, kv in ((dec_tok, dec_pos, tables[:4], dec_last, 16),
                                      (chunk_tok, chunk_pos, tables[3:], chunk_last, 64)):
        logits, cache = jax.jit(forward_absorbed, static_argnums=0, static_argnames="kv_len")(
            cfg, w, cache.replace(block_table=table), tok, pos, logit_index=last, kv_len=kv)
        alone.append(logits)
        cache = cache.replace(block_table=None)
    groups = ((dec_tok, dec_pos, tables[:4], dec_last), (chunk_tok, chunk_pos, tables[3:], chunk_last))
    logits, together = jax.jit(forward_groups, static_argnums=0, static_argnames=("kv_lens", "forms"))(
        cfg, w, pool, groups, kv_lens=(16, 64), forms=("absorbed", "absorbed"))
    # the chunk's row uses slot 3's table too: it wrote after the decode row, as in the step alone
    np.testing.assert_allclose(np.asarray(logits), np.asarray(jnp.concatenate(alone)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(together.c_kv), np.asarray(cache.c_kv), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(together.k_pe), np.asarray(cache.k_pe), rtol=1e-5, atol=1e-5)
    assert together.block_table is None


def test_narrow_chunks_beside_decoders_run_in_one_program_and_keep_the_tokens(tiny_model):
    cfg, w = tiny_model
    rng = np.random.RandomState(5)
    prompts = [list(rng.randint(0, cfg.vocab_size, n)) for n in (5, 6, 30)]
    reference = [greedy_reference(cfg, w, p, 6) for p in prompts]
    e = Engine(cfg, w, "cpu-only", n_slots=4, max_len=MAX_LEN, chunk_size=32, decode_chunk_size=32, tpot_target_ms=500.0)
    # a step model under which 4-token chunks fit the target and wider ones do not
    e.scheduler.step_time = lambda decoders, chunks, end, chunk_ends: 0.0 if max(chunks, default=0) <= 4 else 1.0
    grouped, program = e.executor._grouped, e.executor._program
    calls = {"grouped": 0, "alone": 0}

    def count(name, fn):
        def run(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return run

    e.executor._grouped, e.executor._program = count("grouped", grouped), count("alone", program)
    decoders = [e.submit(p, 40, background=False) for p in prompts[:2]]
    while any(r.status is not Status.DECODE for r in decoders):
        e.step()
    calls.update(grouped=0, alone=0)
    long = e.submit(prompts[2], 6, background=False)
    while long.status is not Status.DECODE:
        e.step()
    assert groups_in_one_program(4)
    assert calls == {"grouped": 30 // 4 + 1, "alone": 0}  # 7 chunks of 4 and one of 2, each with the decode rows
    e.run_until_idle()
    assert [r.output_ids[:6] for r in [*decoders, long]] == reference
