"""Stream-loaded prompts in the prefill worker beside the decode steps (prefill_beside_decode,
the GPU presets' default): the resident path's tokens, decoders that never wait for the
prompt, cancellation mid-prompt, and prefixes taken from the prefix cache."""

import threading

import numpy as np
import pytest

from jaxmoe.serving.engine import Engine

CHUNK, MAX_LEN, NEW = 16, 64, 6


def engine(tiny_model, beside: bool, **kw):
    cfg, w = tiny_model
    return Engine(cfg, w, "2gpu+cpu-experts", n_slots=2, max_len=MAX_LEN, chunk_size=CHUNK, kv_block_size=CHUNK,
                  simulate_accelerators=True, prefill_beside_decode=beside, **kw)


@pytest.fixture(scope="module")
def prompts(tiny_model):
    cfg, _ = tiny_model
    rng = np.random.RandomState(9)
    return [list(rng.randint(0, cfg.vocab_size, n)) for n in (5, 50)]


@pytest.fixture(scope="module")
def reference(tiny_model, prompts):
    """Each prompt's tokens from the step path (resident experts: the cpu strategy)."""
    e = engine(tiny_model, False)
    out = []
    for p in prompts:
        r = e.submit(p, NEW, background=False, prefill_strategy="cpu")
        e.run_until_idle()
        out.append(r.output_ids)
    return out


def test_the_presets_prefill_beside_decode(tiny_model):
    cfg, w = tiny_model
    e = Engine(cfg, w, "gpu+cpu-experts", n_slots=2, max_len=MAX_LEN, simulate_accelerators=True)
    assert e.runtime.prefill_beside_decode and e.worker is not None and not e.scheduler.stream_chunks


@pytest.mark.parametrize("strategy", ["slp", "dslp"])
def test_streamed_prompt_beside_decode_gives_the_resident_tokens(tiny_model, prompts, reference, strategy):
    e = engine(tiny_model, True)
    short = e.submit(prompts[0], NEW, background=False, prefill_strategy=strategy)
    e.step()
    long = e.submit(prompts[1], NEW, background=False, prefill_strategy=strategy)
    e.run_until_idle()
    assert [short.output_ids, long.output_ids] == reference
    assert long.prefill_strategy == strategy and not e.worker.busy
    _worker_thread_ends(e)  # with the last prompt (it holds the weights)
    again = e.submit(prompts[1][::-1], NEW, background=False, prefill_strategy=strategy)  # and starts for the next
    e.run_until_idle()
    assert len(again.output_ids) == NEW and again.cached_tokens == 0
    _worker_thread_ends(e)


def _worker_thread_ends(e):
    t = e.worker._thread
    if t is not None:
        t.join(30)
    assert e.worker._thread is None


def test_decoders_do_not_wait_for_a_streamed_prompt(tiny_model, prompts, reference):
    """The worker is held inside the prompt's second chunk: the other request still decodes
    to the end in the meantime, then the prompt completes with its own tokens."""
    e = engine(tiny_model, True)
    short = e.submit(prompts[0], NEW, background=False, prefill_strategy="cpu")
    e.step()  # short's prompt; it decodes from now on
    gate, inside = threading.Event(), threading.Event()
    compute = e.prefill.compute_chunk

    def held(row):
        if row.start == CHUNK:
            inside.set()
            assert gate.wait(60)
        return compute(row)

    e.prefill.compute_chunk = held
    long = e.submit(prompts[1], NEW, background=False, prefill_strategy="slp")
    e.step()  # starts the worker on long's prompt, and a decode step for short
    assert inside.wait(60)
    while short.finish_reason is None:
        e.step()
    assert short.output_ids == reference[0] and long.n_prefilled == CHUNK and not long.output_ids
    gate.set()
    e.run_until_idle()
    assert long.output_ids == reference[1]


def test_cancel_mid_prompt_writes_nothing_more(tiny_model, prompts, reference):
    e = engine(tiny_model, True)
    gate = threading.Event()
    compute = e.prefill.compute_chunk
    e.prefill.compute_chunk = lambda row: (gate.wait(60), compute(row))[1]
    r = e.submit(prompts[1], NEW, background=False, prefill_strategy="slp")
    e.step()
    r.cancel()
    writes = []
    write = e.executor.write_latents
    e.executor.write_latents = lambda *a: (writes.append(a), write(*a))
    gate.set()
    e.run_until_idle()
    assert r.finish_reason == "cancelled" and writes == [] and not e.worker.busy
    assert e.blocks.pools[0].usable == e.blocks.pools[0].n_blocks - 1  # every block back
    again = e.submit(prompts[1], NEW, background=False, prefill_strategy="slp")  # the worker is free for the next
    e.run_until_idle()
    assert again.output_ids == reference[1]


def test_a_streamed_prompt_beside_decode_resumes_after_its_cached_prefix(tiny_model, prompts, reference):
    e = engine(tiny_model, True)
    first = e.submit(prompts[1], NEW, background=False, prefill_strategy="slp")
    e.run_until_idle()
    again = e.submit(prompts[1], NEW, background=False, prefill_strategy="slp")
    e.run_until_idle()
    assert again.cached_tokens == (len(prompts[1]) - 1) // CHUNK * CHUNK > 0
    assert first.output_ids == again.output_ids == reference[1]
