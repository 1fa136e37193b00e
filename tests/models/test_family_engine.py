"""The model families beside DeepSeek-V3 end to end, each test once per family (conftest's `TINY`:
Qwen3-MoE's qwen3-moe-tiny, GLM-4.5's glm4-moe-tiny): synthetic checkpoint -> jaxmoe.load ->
jaxmoe.generate / the engine / the server, against a plain argmax loop over the family's own
forward (`models.qwen3_moe.forward`, `models.glm4_moe.forward`) with a contiguous cache.
The engine runs its fused step with the family's forward on the paged GQA cache (keys in `c_kv`,
values in `k_pe`): continuous batching, chunked prefill, prefix sharing; and the staged presets
(routed experts on the host, the rest on simulated accelerators), a forced stream-loaded
prefill (SLP / DSLP) sized by the planner (with the family's attention costs: GQA), and the
CPU step model's TPOT target. A stream with no accelerator to stream to is refused with a
ValueError. Sequence-split DSLP against the family's forward: test_family_sequence_split.py."""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from jaxmoe.models import glm4_moe, qwen3_moe
from jaxmoe.serving.engine import Engine
from jaxmoe.serving.executors import StagedStep, paged_pool
from tests.models.conftest import one_family
from tests.serving import test_tpot_target as tpot

NEW = 6
BS = 16  # kv_block_size = chunk_size
REF_LEN = 128  # the plain loop's contiguous cache: one length for every prompt here, so its decode step compiles once


# each family's package: its own forward and contiguous cache (not the engine's paged path)
PACKAGES = {qwen3_moe.Qwen3MoeConfig: qwen3_moe, glm4_moe.Glm4MoeConfig: glm4_moe}


@functools.cache
def _jit_forward(forward):
    return jax.jit(forward, static_argnums=0)


def solo_greedy(cfg, weights, prompt: list[int], n: int, dtype=jnp.float32) -> list[int]:
    """The plain loop: prefill the whole prompt into a contiguous cache, then one token at a time."""
    package = PACKAGES[type(cfg)]
    step = _jit_forward(package.forward)
    cache = package.init_cache(cfg, 1, max(REF_LEN, len(prompt) + n), dtype)
    logits, cache = step(cfg, weights, cache, np.array([prompt], np.int32), np.arange(len(prompt), dtype=np.int32)[None])
    out = [int(jnp.argmax(logits[0, -1]))]
    for i in range(n - 1):
        logits, cache = step(cfg, weights, cache, np.array([[out[-1]]], np.int32), np.array([[len(prompt) + i]], np.int32))
        out.append(int(jnp.argmax(logits[0, 0])))
    return out


def prompts(vocab: int, lengths, seed: int = 7) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(2, vocab, n)] for n in lengths]  # no BOS / EOS ids inside


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_generate_greedy_equals_a_plain_argmax_loop(tiny_ckpts, fmt):
    model = jaxmoe.load(tiny_ckpts[fmt], chunk_size=16)
    ids = model.encode_prompt("The quick brown fox jumps over the lazy dog, again and again and again.")
    assert len(ids) > 16  # the prompt runs in several chunks
    r = jaxmoe.generate(model, ids, max_new_tokens=10, ignore_eos=True)
    assert r.token_ids == solo_greedy(model.cfg, model.weights, ids, 10)
    assert r.finish_reason == "length" and r.timings.prefill_strategy == "cpu"
    streamed = [p.token_id for p in jaxmoe.stream_generate(model, ids, max_new_tokens=10, ignore_eos=True)]
    assert streamed == r.token_ids


@one_family("qwen3-moe-tiny")
def test_concurrent_requests_get_their_solo_tokens(tiny_model):
    """Three requests batched together, prompts longer than chunk_size (chunked prefill beside
    decode rows): each gets exactly what it gets alone."""
    cfg, w = tiny_model.cfg, tiny_model.weights
    ps = prompts(cfg.vocab_size, (37, 21, 50))
    solo = [solo_greedy(cfg, w, p, NEW) for p in ps]
    e = tiny_model.engine
    assert e.n_slots == 3 and e.chunk_size == BS
    reqs = [e.submit(p, NEW, background=False) for p in ps]
    assert e.step()
    assert sorted(r.slot for r in reqs) == [0, 1, 2]  # all three admitted at once
    steps = 1
    while e.step():
        steps += 1
    assert [r.output_ids for r in reqs] == solo
    assert steps < sum(-(-len(p) // BS) + NEW for p in ps)  # fewer steps than one request at a time: batched
    assert all(r.prefill_strategy == "cpu" for r in reqs)  # "auto" resolved to the step path


def test_concurrent_generate_calls_from_threads(tiny_model):
    ps = prompts(tiny_model.cfg.vocab_size, (19, 33), seed=11)
    solo = [solo_greedy(tiny_model.cfg, tiny_model.weights, p, NEW) for p in ps]
    out: dict[int, list[int]] = {}

    def run(i):
        out[i] = jaxmoe.generate(tiny_model, ps[i], max_new_tokens=NEW, ignore_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out[i] for i in range(len(ps))] == solo


@one_family("glm4-moe-tiny")
def test_prefix_cache_shares_blocks_and_keeps_the_cold_tokens(tiny_model):
    cfg, w = tiny_model.cfg, tiny_model.weights
    system, x, y = prompts(cfg.vocab_size, (2 * BS + 5, 9, 13), seed=5)
    e = Engine(cfg, w, "cpu-only", n_slots=2, max_len=128, chunk_size=BS, kv_block_size=BS)
    first = e.submit(system + x, NEW, background=False)
    e.run_until_idle()
    second = e.submit(system + y, NEW, background=False)
    e.run_until_idle()
    assert first.cached_tokens == 0 and second.cached_tokens == 2 * BS
    assert second.output_ids == solo_greedy(cfg, w, system + y, NEW)
    assert first.output_ids == solo_greedy(cfg, w, system + x, NEW)
    cold = Engine(cfg, w, "cpu-only", n_slots=2, max_len=128, chunk_size=BS, kv_block_size=BS, prefix_caching=False)
    again = cold.submit(system + y, NEW, background=False)
    cold.run_until_idle()
    assert again.cached_tokens == 0 and again.output_ids == second.output_ids


def test_the_pool_has_the_gqa_widths(tiny_model):
    e = tiny_model.engine
    kv = tiny_model.cfg.num_key_value_heads * tiny_model.cfg.head_dim
    pool = e.executor.cache
    assert pool.c_kv.shape[-1] == pool.k_pe.shape[-1] == kv and pool.c_kv.shape[0] == tiny_model.cfg.num_hidden_layers




# one staged preset and one streamed strategy per family (the presets' and strategies' own
# machinery is family-agnostic, tested on DeepSeek-V3; the family's stage / prefill layer is not)
STAGED = {"qwen3-moe-tiny": "2gpu+cpu-experts", "glm4-moe-tiny": "gpu+cpu-experts"}
STREAMED = {"qwen3-moe-tiny": "slp", "glm4-moe-tiny": "dslp"}


def test_staged_presets_give_the_plain_loop_tokens(tiny_model, tiny_name):
    """Routed experts on the host, the rest on (simulated) accelerators, the slots in two
    micro-batches (one per accelerator with two): three requests batched, prompts over several
    chunks, each gets the plain loop's tokens; the host program ran the routed experts. The
    prompts run on the staged step path ("cpu": the planner would stream them, see below)."""
    cfg, w, preset = tiny_model.cfg, tiny_model.weights, STAGED[tiny_name]
    ps = prompts(cfg.vocab_size, (37, 21, 50), seed=11)
    e = Engine(cfg, w, preset, n_slots=4, max_len=128, chunk_size=BS, kv_block_size=BS, simulate_accelerators=True,
               prefill_strategy="cpu")
    assert isinstance(e.executor, StagedStep)
    assert [x is not None for x in e.executor.experts] == [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
    reqs = [e.submit(p, NEW, background=False) for p in ps]
    ran = set()
    while e.step():
        ran |= {mb for stage, mb, _ in e.executor.dispatch_log if stage == "experts"}
    assert ran == {0, 1}
    assert [r.output_ids for r in reqs] == [solo_greedy(cfg, w, p, NEW) for p in ps]
    assert {r.prefill_strategy for r in reqs} == {"cpu"}


def test_streamed_prefill_gives_the_plain_loop_tokens(tiny_model, tiny_name):
    """A forced slp / dslp prompt streams the routed experts from the host copy to the (simulated)
    accelerators through the family's layers, chunk after chunk, beside another request on the
    step path: both get the plain loop's tokens. The planner sizes the stream (parts, buffers,
    and for dslp the attention split) from the family's costs."""
    cfg, w, strategy = tiny_model.cfg, tiny_model.weights, STREAMED[tiny_name]
    long, short = prompts(cfg.vocab_size, (50, 21), seed=13)
    e = Engine(cfg, w, "2gpu+cpu-experts", n_slots=2, max_len=128, chunk_size=BS, kv_block_size=BS,
               simulate_accelerators=True, prefill_beside_decode=False)
    assert strategy in e.prefill.possible and e.prefill.planned
    a = e.submit(short, NEW, background=False)
    b = e.submit(long, NEW, background=False, prefill_strategy=strategy)
    e.run_until_idle()
    assert b.prefill_strategy == strategy and b.prefill_plan is not None and b.prefill_plan.strategy == strategy
    assert [a.output_ids, b.output_ids] == [solo_greedy(cfg, w, short, NEW), solo_greedy(cfg, w, long, NEW)]


def test_streaming_without_an_accelerator_is_refused(tiny_model):
    cfg, w = tiny_model.cfg, tiny_model.weights
    with pytest.raises(ValueError, match="prefill_strategy='slp'.*impossible here: needs 1 accelerator"):
        Engine(cfg, w, "cpu-only", prefill_strategy="slp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXMOE_PREFILL_STRATEGY", "dslp")
        with pytest.raises(ValueError, match="JAXMOE_PREFILL_STRATEGY=dslp.*impossible here"):
            Engine(cfg, w, "cpu-only")


def test_a_mixed_step_in_one_program_equals_each_group_alone(tiny_model, tiny_family):
    """The family's `grouped_forward` (model.groups.run_groups over its GQA layer): decode rows
    (one of them padding) over 16 keys beside a 4-column chunk (one padding column) over 64 that
    shares a slot's blocks, on a filled paged pool: logits and cache writes equal each group
    through the family's own forward."""
    cfg, w = tiny_model.cfg, tiny_model.weights
    rng = np.random.default_rng(1)
    pool = paged_pool(cfg, 32 * REF_LEN // BS, BS, REF_LEN, jnp.float32)
    pool = pool.replace(c_kv=jnp.asarray(rng.standard_normal(pool.c_kv.shape), jnp.float32),
                        k_pe=jnp.asarray(rng.standard_normal(pool.k_pe.shape), jnp.float32))
    tables = rng.permutation(np.arange(1, pool.c_kv.shape[1]))[: 4 * (REF_LEN // BS)].reshape(4, -1).astype(np.int32)
    dec = (rng.integers(0, cfg.vocab_size, (4, 1)).astype(np.int32), np.array([[9], [12], [REF_LEN], [15]], np.int32),
           tables, np.zeros(4, np.int32))
    chunk = (rng.integers(0, cfg.vocab_size, (1, 4)).astype(np.int32), np.array([[40, 41, 42, REF_LEN]], np.int32),
             tables[3:], np.array([2], np.int32))
    alone, cache = [], pool
    for (tok, pos, table, last), kv in ((dec, 16), (chunk, 64)):
        forward = jax.jit(tiny_family.step_forward(cfg, tok.shape[1], kv), static_argnums=0, static_argnames="kv_len")
        logits, cache = forward(cfg, w, cache.replace(block_table=table), tok, pos, logit_index=last, kv_len=kv)
        alone.append(logits)
        cache = cache.replace(block_table=None)
    grouped = tiny_family.grouped_forward(cfg, (1, 4), (16, 64))
    logits, together = jax.jit(grouped, static_argnums=0, static_argnames="kv_lens")(cfg, w, pool, (dec, chunk),
                                                                                  kv_lens=(16, 64))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(jnp.concatenate(alone)), rtol=1e-5, atol=1e-5)
    for name in ("c_kv", "k_pe"):
        np.testing.assert_allclose(np.asarray(getattr(together, name)), np.asarray(getattr(cache, name)), rtol=1e-5,
                                   atol=1e-5)


@one_family("glm4-moe-tiny")
def test_a_tpot_target_sizes_the_chunks_and_keeps_the_tokens(tiny_model):
    """tpot_target_ms on the cpu-only engine: the CPU step model (with the family's GQA costs)
    sizes a prompt's chunks beside a decoding request. A wider chunk is predicted slower; a
    target between the steps with a 4- and an 8-token chunk runs the 70-token prompt 4 tokens
    (and 4 columns) per step, to the end, each step one program with the decode row
    (`grouped_forward`); the tokens are the plain loop's."""
    cfg, w = tiny_model.cfg, tiny_model.weights
    e = Engine(cfg, w, "cpu-only", n_slots=2, max_len=128, chunk_size=64, decode_chunk_size=64, tpot_target_ms=1.0)
    e.step_model.measured = lambda *a: None  # the model as the profile has it, not corrected by this box's timings
    step = {c: e.step_model(1, [c], 6, [c]) for c in (1, 4, 8, 16, 64)}
    assert 0 < step[1] < step[4] < step[8] < step[16] < step[64]
    e.scheduler.tpot_target_s = (step[4] + step[8]) / 2
    ps = prompts(cfg.vocab_size, (5, 70), seed=3)
    out, chunks, predicted = tpot.run_mixed(e, ps, short_new=24)  # the decoder outlives the 18 prompt steps
    assert chunks == [4] * 17 + [2]
    assert len(predicted) == 18 and all(t <= e.scheduler.tpot_target_s for t, _ in predicted)
    assert out == [solo_greedy(cfg, w, p, tpot.NEW) for p in ps]  # run_mixed's NEW tokens of each


@one_family("qwen3-moe-tiny")
def test_auto_on_an_accelerator_resolves_to_the_step_path_without_the_planner(tiny_model, monkeypatch):
    import jaxmoe.serving.prompt_runner as runner

    def no_planner(*a, **k):
        raise AssertionError("the planner was asked")

    monkeypatch.setattr(runner, "plan_prefill", no_planner)
    monkeypatch.setattr(runner, "estimate_prefill", no_planner)
    cfg, w = tiny_model.cfg, tiny_model.weights
    e = Engine(cfg, w, "cpu-only", accelerators=1, routed_experts="accelerator", simulate_accelerators=True,
               n_slots=1, max_len=64, chunk_size=BS)
    p = prompts(cfg.vocab_size, (20,), seed=2)[0]
    r = e.submit(p, 3, background=False)
    e.run_until_idle()
    assert r.prefill_strategy == "resident" and r.output_ids == solo_greedy(cfg, w, p, 3)


def test_the_server_answers(tiny_model, tiny_name):
    from fastapi.testclient import TestClient

    from jaxmoe.server.app import create_app

    prompt = "Once upon a time"
    expected = jaxmoe.generate(tiny_model, prompt, max_new_tokens=5, ignore_eos=True)
    with TestClient(create_app(tiny_model, served_model_name=tiny_name)) as client:
        resp = client.post("/v1/completions", json={"model": tiny_name, "prompt": prompt, "max_tokens": 5,
                                                    "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["text"] == expected.text
    assert body["usage"]["completion_tokens"] == 5
