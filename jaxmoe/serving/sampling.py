"""Token sampling as pure JAX functions: greedy, temperature, top-k, top-p (nucleus).

All parameters are traced values, so one compiled step serves every request whatever its
sampling settings:

- `temperature == 0` is greedy (argmax); otherwise logits are divided by the temperature.
- `top_k == 0` keeps every token; otherwise the tokens whose logit is >= the k-th largest
  (ties with the k-th are kept).
- `top_p == 1` keeps every token; otherwise the smallest set of most likely tokens whose
  probability mass reaches `top_p` (a token is kept when the mass of the tokens strictly more
  likely than it -- by sorted order -- is below `top_p`; ties with the last kept one are kept).

Randomness comes only from the key: `step_key(seed, step)` derives one key per generated
token, so the same seed gives the same tokens.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_sampling(temperature: float, top_k: int, top_p: float, seed: int = 0) -> None:
    """Raise ValueError naming the parameter when a sampling setting is out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 <= top_k < 2**31:
        raise ValueError(f"top_k must be an integer in [0, 2**31) (0 = disabled), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not (0.0 < top_p <= 1.0):  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1] (1 = disabled), got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def top_k_mask(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Boolean mask [..., V] of the tokens kept by top-k (all of them when top_k <= 0)."""
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, v)
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, desc.shape[:-1])[..., None], axis=-1)
    return (logits >= kth) | (jnp.asarray(top_k) <= 0)


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Boolean mask [..., V] of the nucleus: the most likely tokens whose mass reaches top_p."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    desc = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(desc, axis=-1) - desc
    kept = mass_before < top_p
    kept = kept.at[..., 0].set(True)
    # The smallest kept probability; every token at least that likely is kept.
    threshold = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
    return (probs >= threshold) | (jnp.asarray(top_p) >= 1.0)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with the tokens outside top-k and then top-p set to -inf."""
    neg = jnp.finfo(logits.dtype).min

    def apply(x):
        x = jnp.where(top_k_mask(x, top_k), x, neg)
        return jnp.where(top_p_mask(x, top_p), x, neg)

    # The sorts are skipped at run time when neither filter is active.
    active = (jnp.asarray(top_k) > 0) | (jnp.asarray(top_p) < 1.0)
    return jax.lax.cond(active, apply, lambda x: x, logits)


def step_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    """The PRNG key of generated token number `step` of a request seeded with `seed`."""
    return jax.random.fold_in(jax.random.key(seed), step)


def sample(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """Next token ids [...] from logits [..., V]; greedy where temperature == 0."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.asarray(temperature, jnp.float32)
    scaled = filter_logits(logits / jnp.where(t > 0, t, 1.0), top_k, top_p)
    drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(t > 0, drawn, greedy)


def sample_rows(logits, seeds, steps, temperature, top_k, top_p):
    """Each row's next token with its own parameters. Under vmap a `cond` runs both branches,
    so the all-greedy case (no sorts, no draws) is decided here, once for the batch."""
    logits = logits[:, 0].astype(jnp.float32)

    def draw(_):
        keys = jax.vmap(step_key)(seeds, steps)
        return jax.vmap(sample)(logits, keys, temperature, top_k, top_p)

    greedy = lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(jnp.any(temperature > 0), draw, greedy, None)
