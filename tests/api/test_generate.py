"""The API contract of jaxmoe.generate / stream_generate on the tiny synthetic checkpoint."""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from jaxmoe.loading.synthetic import write_synthetic_checkpoint
from jaxmoe.model.cache import init_cache
from jaxmoe.model.forward import forward_absorbed, forward_expanded

G = sys.modules["jaxmoe.generate"]  # `jaxmoe.generate` is the function
PROMPT = "The quick brown fox"


def test_greedy_equals_a_plain_argmax_loop(model):
    """Bucketing, padding, in-jit sampling and overlapped dispatch change nothing."""
    ids = model.encode_prompt(PROMPT)
    n_new = 12
    r = jaxmoe.generate(model, ids, max_new_tokens=n_new, ignore_eos=True)

    cfg, w = model.cfg, model.weights
    cache = init_cache(cfg, 1, len(ids) + n_new, model.dtype)  # unpadded, exact size
    pos = np.arange(len(ids), dtype=np.int32)[None]
    logits, cache = jax.jit(forward_expanded, static_argnums=0)(cfg, w, cache, np.array([ids], np.int32), pos)
    expected = [int(jnp.argmax(logits[0, -1]))]
    step = jax.jit(forward_absorbed, static_argnums=0)
    for i in range(n_new - 1):
        p = np.array([[len(ids) + i]], np.int32)
        logits, cache = step(cfg, w, cache, np.array([[expected[-1]]], np.int32), p)
        expected.append(int(jnp.argmax(logits[0, 0])))
    assert r.token_ids == expected
    assert r.finish_reason == "length" and r.prompt_token_ids == ids


def test_same_seed_same_output_different_seed_different_output(model):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=100, top_p=0.95, ignore_eos=True)
    a = jaxmoe.generate(model, PROMPT, seed=7, **kw)
    b = jaxmoe.generate(model, PROMPT, seed=7, **kw)
    c = jaxmoe.generate(model, PROMPT, seed=8, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids  # 16 draws from ~100 tokens: equal with negligible probability
    greedy = jaxmoe.generate(model, PROMPT, max_new_tokens=16, ignore_eos=True)
    assert greedy.token_ids == jaxmoe.generate(model, PROMPT, max_new_tokens=16, ignore_eos=True, seed=99).token_ids


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.9, "seed": 3}, {"stop": "e"}])
def test_stream_yields_exactly_what_generate_returns(model, kw):
    r = jaxmoe.generate(model, PROMPT, max_new_tokens=20, **kw)
    parts = list(jaxmoe.stream_generate(model, PROMPT, max_new_tokens=20, **kw))
    assert [p.token_id for p in parts] == r.token_ids
    assert "".join(p.text for p in parts) == r.text
    assert [p.finish_reason for p in parts[:-1]] == [None] * (len(parts) - 1)
    assert parts[-1].finish_reason == r.finish_reason
    assert [p.timings.generated_tokens for p in parts] == list(range(1, len(parts) + 1))


def test_stop_string_ends_generation_and_is_not_in_the_text(model):
    full = jaxmoe.generate(model, PROMPT, max_new_tokens=40, ignore_eos=True)
    assert len(full.text) > 12, full.text
    stop = full.text[8:11]
    cut = full.text.find(stop)
    r = jaxmoe.generate(model, PROMPT, max_new_tokens=40, ignore_eos=True, stop=["never-in-output", stop])
    assert r.finish_reason == "stop"
    assert r.text == full.text[:cut]
    assert r.token_ids == full.token_ids[: len(r.token_ids)] and len(r.token_ids) < len(full.token_ids)
    # the token that completed the stop string is the last one generated
    assert stop in model.tokenizer.decode(r.token_ids)
    assert stop not in model.tokenizer.decode(r.token_ids[:-1])[cut:]


def test_eos_ends_generation(model):
    full = jaxmoe.generate(model, PROMPT, max_new_tokens=12, ignore_eos=True)
    eos = full.token_ids[5]
    first = full.token_ids.index(eos)
    m = dataclasses.replace(model, eos_token_ids=frozenset({eos}))
    r = jaxmoe.generate(m, PROMPT, max_new_tokens=12)
    assert r.finish_reason == "eos"
    assert r.token_ids == full.token_ids[: first + 1]  # EOS is the last token id...
    assert r.text == model.tokenizer.decode(full.token_ids[:first])  # ...but not in the text
    assert jaxmoe.generate(m, PROMPT, max_new_tokens=12, ignore_eos=True).token_ids == full.token_ids


def test_eos_ids_come_from_config_and_tokenizer(model):
    assert model.eos_token_ids == {1} == {*model.cfg.eos_token_id, model.tokenizer.eos_token_id}


def test_prompt_as_text_ids_or_messages(model, tokenizer):
    by_text = jaxmoe.generate(model, PROMPT, max_new_tokens=6)
    ids = tokenizer.encode(PROMPT)
    assert by_text.prompt_token_ids == ids and ids[0] == tokenizer.bos_token_id
    by_ids = jaxmoe.generate(model, np.array(ids), max_new_tokens=6)
    assert by_ids.token_ids == by_text.token_ids and by_ids.text == by_text.text

    msgs = [{"role": "user", "content": "Hi"}]
    by_chat = jaxmoe.generate(model, messages=msgs, max_new_tokens=6)
    assert by_chat.prompt_token_ids == tokenizer.encode_chat(msgs)
    rendered = tokenizer.decode(by_chat.prompt_token_ids, skip_special_tokens=False)
    assert rendered.endswith("<|User|>Hi<|Assistant|>")


def test_prompt_too_long_names_the_lengths(model):
    ctx = model.cfg.max_position_embeddings  # 512 for tiny
    with pytest.raises(ValueError, match=rf"500 prompt tokens \+ max_new_tokens 20 = 520 .*context of {ctx}"):
        jaxmoe.generate(model, [5] * 500, max_new_tokens=20)
    with pytest.raises(ValueError, match="prompt too long"):
        jaxmoe.stream_generate(model, [5] * ctx, max_new_tokens=1)  # raised at the call, before iterating
    capped = dataclasses.replace(model, max_seq_len=64)
    with pytest.raises(ValueError, match=r"context of 64 tokens \(max_seq_len=64\)"):
        jaxmoe.generate(capped, [5] * 60, max_new_tokens=5)
    assert len(jaxmoe.generate(capped, [5] * 10, max_new_tokens=54, ignore_eos=True).token_ids) == 54


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -3}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 2.0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": ""}, "stop"),
    ],
)
def test_invalid_parameters_raise_before_running(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxmoe.generate(model, PROMPT, **kwargs)
    with pytest.raises(ValueError, match=match):
        jaxmoe.stream_generate(model, PROMPT, **kwargs)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "empty"),
        ([], "empty"),
        ([3, 512], r"token id 512 at index 1 .*\[0, 512\)"),
        ([-1], "token id -1"),
        ([[1, 2]], "1-D"),
        ([1.5], "integer"),
        (None, "exactly one"),
    ],
)
def test_bad_prompts(model, prompt, match):
    with pytest.raises(ValueError, match=match):
        jaxmoe.generate(model, prompt)


def test_prompt_and_messages_are_exclusive(model):
    with pytest.raises(ValueError, match="exactly one"):
        jaxmoe.generate(model, "hi", messages=[{"role": "user", "content": "hi"}])


def test_no_recompilation_across_requests_in_a_kv_window(model):
    jaxmoe.generate(model, [5] * 3, max_new_tokens=4)
    compiles = []

    def count(event, *args, **kwargs):
        if "compil" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:  # all within the first 64-slot kv window; other sampling settings are traced values
        for n, kw in ((5, {}), (9, {"temperature": 0.5, "top_k": 3}), (14, {"top_p": 0.5, "temperature": 1.0, "seed": 4})):
            jaxmoe.generate(model, list(range(2, 2 + n)), max_new_tokens=20, **kw)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []


def test_timings_are_consistent(model):
    r = jaxmoe.generate(model, PROMPT, max_new_tokens=8, ignore_eos=True)
    t = r.timings
    assert t.prompt_tokens == len(r.prompt_token_ids) and t.generated_tokens == len(r.token_ids) == 8
    assert t.ttft_s > 0 and t.prefill_tok_s > 0 and t.decode_tok_s > 0


def test_checkpoint_without_tokenizer_takes_token_ids(tmp_path, tiny_cfg, jax_model):
    path = write_synthetic_checkpoint(tmp_path / "notok", tiny_cfg, fmt="fp8", seed=0, with_tokenizer=False)
    m = jaxmoe.load(path, cpu_kernels=False)
    assert m.tokenizer is None
    r = jaxmoe.generate(m, [0, 5, 6, 7], max_new_tokens=5, ignore_eos=True)
    assert r.text == "" and r.token_ids == jaxmoe.generate(jax_model, [0, 5, 6, 7], max_new_tokens=5, ignore_eos=True).token_ids
    with pytest.raises(ValueError, match="tokenizer"):
        jaxmoe.generate(m, "text")
    with pytest.raises(ValueError, match="tokenizer"):
        jaxmoe.generate(m, [0, 5], stop="x")


def test_load_options(tiny_ckpt):
    with pytest.raises(ValueError, match="max_seq_len"):
        jaxmoe.load(tiny_ckpt, max_seq_len=0)
    m = jaxmoe.load(tiny_ckpt, max_seq_len=100)
    assert m.context_len == 100 and m.engine.max_len == 100
    with pytest.raises(ValueError, match="max_seq_len=100"):
        jaxmoe.generate(m, [1] * 90, max_new_tokens=20)
    with pytest.raises(ValueError, match="unknown runtime option"):
        jaxmoe.load(tiny_ckpt, n_slotz=3)


def test_cpu_kernel_path_agrees_with_the_pure_jax_path(tiny_ckpt, model, jax_model):
    ref = jax_model
    assert not ref.cpu_kernels
    if jax.default_backend() == "cpu":
        assert model.cpu_kernels  # the default placement on a CPU-only box
    for prompt in ("Hello", "def f(x): return"):
        kw = dict(max_new_tokens=16, ignore_eos=True)
        assert jaxmoe.generate(model, prompt, **kw).token_ids == jaxmoe.generate(ref, prompt, **kw).token_ids
    m = jaxmoe.load(tiny_ckpt)
    m.close()
    assert m.weights is None and not m.cpu_kernels


def test_prefix_cache_on_disk_survives_a_reload(tiny_ckpt, tmp_path):
    """jaxmoe.load(prefix_cache_dir=...): a second load of the checkpoint starts a resent prompt
    from the blocks the first wrote (Timings.cached_tokens), with the same tokens; without the
    directory nothing is reused across loads."""
    prompt = [(7 * i) % 300 + 3 for i in range(150)]
    first = jaxmoe.load(tiny_ckpt, cpu_kernels=False, prefix_cache_dir=tmp_path)
    a = jaxmoe.generate(first, prompt, max_new_tokens=6, ignore_eos=True)
    assert a.timings.cached_tokens == 0
    first.engine.blocks.flush()
    block = first.engine.blocks.block_size
    again = jaxmoe.load(tiny_ckpt, cpu_kernels=False, prefix_cache_dir=tmp_path)
    b = jaxmoe.generate(again, prompt, max_new_tokens=6, ignore_eos=True)
    assert b.timings.cached_tokens == (len(prompt) - 1) // block * block > 0
    assert b.token_ids == a.token_ids
    plain = jaxmoe.load(tiny_ckpt, cpu_kernels=False)
    assert jaxmoe.generate(plain, prompt, max_new_tokens=6, ignore_eos=True).timings.cached_tokens == 0
