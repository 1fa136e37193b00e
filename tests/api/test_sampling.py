"""Sampling: the top-k / top-p masks against plain numpy references, greedy == argmax, the
empirical distribution of temperature sampling against softmax, parameter validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.serving.sampling import SamplingParams, sample, step_key, top_k_mask, top_p_mask, validate_sampling


def ref_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0:
        return np.ones_like(logits, bool)
    kth = np.sort(logits)[::-1][min(k, logits.size) - 1]
    return logits >= kth


def ref_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Walk the tokens from the most likely, adding them while the kept mass is below p."""
    if p >= 1.0:
        return np.ones_like(logits, bool)
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keep = np.zeros(logits.size, bool)
    mass = 0.0
    for i in np.argsort(-probs, kind="stable"):
        if mass >= p:
            break
        keep[i] = True
        mass += probs[i]
    return probs >= probs[keep].min()  # ties with the last kept token are kept too


def random_logits(rng: np.random.Generator, v: int) -> np.ndarray:
    return (rng.standard_normal(v) * rng.uniform(0.5, 4.0)).astype(np.float32)


@pytest.mark.parametrize("v", [1, 7, 50])
def test_top_k_mask_matches_reference(v):
    rng = np.random.default_rng(v)
    fn = jax.jit(top_k_mask)
    for _ in range(20):
        logits = random_logits(rng, v)
        for k in (0, 1, 2, v // 2, v, v + 3):
            np.testing.assert_array_equal(np.asarray(fn(logits, k)), ref_top_k(logits, k), err_msg=f"k={k}")


def test_top_k_keeps_ties():
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0], np.float32)
    assert np.asarray(top_k_mask(logits, 1)).tolist() == [False, True, False, True, False]
    assert np.asarray(top_k_mask(logits, 3)).tolist() == [False, True, True, True, True]


@pytest.mark.parametrize("v", [1, 7, 50])
def test_top_p_mask_matches_reference(v):
    rng = np.random.default_rng(100 + v)
    fn = jax.jit(top_p_mask)
    checked = 0
    for _ in range(30):
        logits = random_logits(rng, v)
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        cum = np.cumsum(np.sort(probs)[::-1])
        for p in (0.05, 0.3, 0.5, 0.8, 0.95, 1.0):
            if p < 1.0 and np.min(np.abs(cum - p)) < 1e-4:
                continue  # too close to a boundary for float32 vs float64 to agree
            np.testing.assert_array_equal(np.asarray(fn(logits, p)), ref_top_p(logits, p), err_msg=f"p={p}")
            checked += 1
    assert checked > 100


def test_top_p_always_keeps_the_most_likely_token():
    logits = np.array([0.0, 10.0, 1.0], np.float32)
    assert np.asarray(top_p_mask(logits, 1e-6)).tolist() == [False, True, False]


def test_greedy_is_argmax_whatever_the_other_parameters():
    rng = np.random.default_rng(0)
    fn = jax.jit(sample)
    for i in range(20):
        logits = random_logits(rng, 97)
        key = step_key(np.uint32(i), i)
        for top_k, top_p in ((0, 1.0), (5, 0.5), (1, 0.1)):
            assert int(fn(logits, key, 0.0, top_k, top_p)) == int(np.argmax(logits))


_keys = jax.jit(jax.vmap(step_key, in_axes=(None, 0)))
_sample_many = jax.jit(jax.vmap(sample, in_axes=(None, 0, None, None, None)))


def _draw(logits, n, temperature, top_k=0, top_p=1.0, seed=0):
    keys = _keys(np.uint32(seed), jnp.arange(n))
    draws = np.asarray(_sample_many(logits, keys, np.float32(temperature), np.int32(top_k), np.float32(top_p)))
    return np.bincount(draws, minlength=logits.size) / n


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    freq = _draw(logits, 20000, temperature)
    np.testing.assert_allclose(freq, _softmax(logits / temperature), atol=0.015)


def test_filtered_sampling_renormalizes_over_the_kept_tokens():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    freq = _draw(logits, 20000, 1.0, top_k=3)
    expected = np.zeros(6)
    expected[:3] = _softmax(logits[:3])
    np.testing.assert_allclose(freq, expected, atol=0.015)
    assert freq[3:].sum() == 0

    p = _softmax(logits)  # top_p 0.8 keeps the first three (mass before the 3rd is 0.71 < 0.8)
    freq = _draw(logits, 20000, 1.0, top_p=0.8)
    expected = np.zeros(6)
    expected[:3] = p[:3] / p[:3].sum()
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_same_key_same_draw_different_seed_different_draws():
    logits = np.zeros(1000, np.float32)
    a, b, c = (_draw(logits, 64, 1.0, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.0}, "seed"),
    ],
)
def test_invalid_parameters_raise_naming_the_parameter(kwargs, name):
    args = {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=name):
        validate_sampling(**args)
    with pytest.raises(ValueError, match=name):
        SamplingParams(**args)


def test_valid_parameters_pass():
    for t, k, p in ((0.0, 0, 1.0), (1e-3, 1, 1e-3), (5, 100, 0.5), (np.float32(0.7), np.int64(3), 1)):
        validate_sampling(t, k, p, 0)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.1).greedy
