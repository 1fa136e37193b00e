"""The engine: continuous batching, presets, overlap, refusal, cancellation, recompilation."""

import threading

import jax
import numpy as np
import pytest

from jaxmoe.model.cache import init_cache
from jaxmoe.model.forward import forward_absorbed, forward_expanded
from jaxmoe.serving.engine import Engine, cache_bytes_per_position
from jaxmoe.serving.request import RequestRefused
from jaxmoe.serving.sampling import SamplingParams
from jaxmoe.step_shapes import kv_window

PROMPT_LENS = (5, 37, 12, 70, 3)
NEW = 8


@pytest.fixture(scope="module")
def prompts(tiny_model):
    cfg, _ = tiny_model
    rng = np.random.RandomState(1)
    return [list(rng.randint(0, cfg.vocab_size, n)) for n in PROMPT_LENS]


MAX_LEN = 128
_prefill = jax.jit(forward_expanded, static_argnums=0)
_decode = jax.jit(forward_absorbed, static_argnums=0)


def greedy_reference(cfg, weights, prompt, n_new):
    """Plain argmax loop over the model's own prefill/decode, one sequence (the prompt padded
    to one shape; padding positions = MAX_LEN are dropped by the cache)."""
    cache = init_cache(cfg, 1, MAX_LEN)
    t = len(prompt)
    tokens = np.zeros((1, max(PROMPT_LENS)), np.int32)
    positions = np.full_like(tokens, MAX_LEN)
    tokens[0, :t], positions[0, :t] = prompt, np.arange(t)
    logits, cache = _prefill(cfg, weights, cache, tokens, positions, logit_index=np.array([t - 1]))
    out = [int(np.argmax(logits[0, -1]))]
    for i in range(n_new - 1):
        logits, cache = _decode(cfg, weights, cache, np.array([[out[-1]]]), np.array([[t + i]]))
        out.append(int(np.argmax(logits[0, -1])))
    return out


def run_all(engine, prompts, **kw):
    reqs = [engine.submit(p, NEW, background=False, **kw) for p in prompts]
    engine.run_until_idle()
    return [r.output_ids for r in reqs]


@pytest.fixture(scope="module")
def reference(tiny_model, prompts):
    cfg, w = tiny_model
    return [greedy_reference(cfg, w, p, NEW) for p in prompts]


def test_continuous_batching_gives_each_request_its_solo_tokens(tiny_model, prompts, reference):
    cfg, w = tiny_model
    # 2 slots for 5 requests of different lengths: requests wait, prefill in chunks of 16
    # next to decoding ones, and join as slots free up.
    engine = Engine(cfg, w, "cpu-only", n_slots=2, max_len=MAX_LEN, chunk_size=16)
    assert run_all(engine, prompts) == reference
    assert len({len(o) for o in reference}) == 1 and len(set(map(tuple, reference))) > 1


@pytest.mark.parametrize("preset", ["gpu+cpu-experts", "2gpu+cpu-experts"])
@pytest.mark.parametrize("overlap", [True, False])
def test_presets_match_cpu_only(tiny_model, prompts, reference, preset, overlap):
    cfg, w = tiny_model
    engine = Engine(cfg, w, preset, n_slots=4, max_len=MAX_LEN, chunk_size=16, overlap=overlap, simulate_accelerators=True)
    assert run_all(engine, prompts) == reference
    devs = engine.devices
    assert devs.host not in devs.accelerators and len(devs.accelerators) == (2 if preset.startswith("2") else 1)


def test_overlap_is_bit_identical_to_serial_and_interleaves(tiny_model, prompts):
    cfg, w = tiny_model
    outs, logs = {}, {}
    for overlap in (True, False):
        e = Engine(cfg, w, "gpu+cpu-experts", n_slots=4, max_len=MAX_LEN, chunk_size=16, overlap=overlap,
                   simulate_accelerators=True)
        sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
        step_logs = []
        ex = e.executor

        def logged(*a, _ex=ex, _logs=step_logs, **kw):
            out = _ex(*a, **kw)
            _logs.append(list(_ex.dispatch_log))
            return out

        e.executor = logged
        outs[overlap] = run_all(e, prompts, sampling=sampling)
        both = [log for log in step_logs if {mb for _, mb, _ in log} == {0, 1}]
        logs[overlap] = both[-1]  # a step where both micro-batches ran
        assert any({mb for _, mb, _ in log} == {0} for log in step_logs), "an idle micro-batch is skipped"
    assert outs[True] == outs[False]
    first_moe = cfg.first_k_dense_replace
    on = logs[True]
    # with overlap, micro-batch B's attention is dispatched before A's next layer
    i_exp_a = on.index(("experts", 0, first_moe))
    assert on[i_exp_a + 1] == ("attention", 1, first_moe)
    off = logs[False]
    assert off.index(("attention", 1, 0)) > off.index(("experts", 0, cfg.num_hidden_layers - 1))


def test_missing_accelerator_is_a_clear_error(tiny_model):
    cfg, w = tiny_model
    with pytest.raises(RuntimeError, match="needs 1 GPU"):
        Engine(cfg, w, "gpu+cpu-experts", n_slots=2, max_len=64)


def test_refusal_and_waiting(tiny_model):
    cfg, w = tiny_model
    e = Engine(cfg, w, n_slots=2, max_len=MAX_LEN, chunk_size=16)
    with pytest.raises(RequestRefused, match=f"holds {MAX_LEN}"):
        e.submit(list(range(MAX_LEN - 3)), 5, background=False)
    with pytest.raises(RequestRefused, match="out of the vocabulary"):
        e.submit([cfg.vocab_size], 2, background=False)
    a = e.submit([1, 2, 3], 3, background=False)
    b = e.submit([4, 5], 3, background=False)
    c = e.submit([6], 3, background=False)  # must wait: two slots
    e.step()
    assert c.status.value == "waiting" and a.status.value == b.status.value == "decode"
    e.run_until_idle()
    assert a.finish_reason == b.finish_reason == c.finish_reason == "length"


def test_kv_window_follows_the_longest_sequence():
    assert [kv_window(n, 4096) for n in (1, 64, 65, 200, 5000)] == [64, 64, 128, 256, 4096]
    assert kv_window(100, 96) == 96


def test_memory_budget_sizes_the_cache(tiny_model):
    cfg, w = tiny_model
    per_pos = cache_bytes_per_position(cfg)
    e = Engine(cfg, w, n_slots=2, memory_budget_bytes=2 * 48 * per_pos, kv_block_size=16)
    assert e.max_len == 96  # one request may fill the whole pool
    assert e.executor.pool_blocks == [96 // 16 + 1]  # + the null block


def test_cancellation_and_stop_tokens(tiny_model, prompts, reference):
    cfg, w = tiny_model
    e = Engine(cfg, w, n_slots=2, max_len=MAX_LEN, chunk_size=16)
    stop_at = reference[0][2]
    a = e.submit(prompts[0], NEW, background=False, eos_token_ids=[stop_at])
    b = e.submit(prompts[1], NEW, background=False)
    for _ in range(4):
        e.step()
    b.cancel()
    e.run_until_idle()
    assert a.finish_reason == "eos" and a.output_ids == reference[0][: reference[0].index(stop_at) + 1]
    assert b.finish_reason == "cancelled" and len(b.output_ids) < NEW


def test_concurrent_callers_from_threads(tiny_model, prompts, reference):
    cfg, w = tiny_model
    e = Engine(cfg, w, n_slots=2, max_len=MAX_LEN, chunk_size=16)
    results = {}

    def caller(i):
        r = e.submit(prompts[i], NEW)
        results[i] = [ev.token for ev in r.events(timeout=120) if ev.token is not None]

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [results[i] for i in range(len(prompts))] == reference


def test_no_recompilation_in_steady_state(tiny_model, prompts):
    cfg, w = tiny_model
    e = Engine(cfg, w, n_slots=2, max_len=MAX_LEN, chunk_size=16)
    run_all(e, prompts)  # warm: compiles the prefill- and decode-width steps for each kv window used
    compiles = []

    def count(event, *args, **kwargs):
        if "compil" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        # same lengths, other order and slot mix, other tokens (no cached prefix shortens a prompt)
        run_all(e, [[(t + 1) % cfg.vocab_size for t in p] for p in prompts[::-1]])
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
