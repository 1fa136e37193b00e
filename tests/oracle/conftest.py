"""Module-scoped oracle fixtures: each Hugging Face reference model is built, saved and loaded
into jaxmoe once per test module; jaxmoe's forward_expanded/forward_absorbed are jit'd once per config and shape.

Cases (see hf_models.py for the configs):
  qlora     DeepSeek-V3-like (q_lora, YaRN with mscale != mscale_all_dim, normalised top-k)
  no_qlora  V2-Lite-like (q_proj, two shared experts, un-normalised top-k)
  fp8       the qlora model FP8 block-quantized: jaxmoe reads the e4m3 checkpoint, transformers
            our own dequantized copy of it
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from . import hf_models as H

torch.set_num_threads(2)

PROMPT_LEN = 40  # >= 32: a wrong RoPE pairing still agrees on most argmaxes over short prompts
NEW_TOKENS = 32
MAX_LEN = 96  # one cache size for every run: >= PROMPT_LEN + NEW_TOKENS
SEEDS = {"qlora": 1234, "no_qlora": 4321}

_prefill = None
_decode = None


def jitted():
    """(forward_expanded, forward_absorbed), jit'd once for the session (cfg is static; XLA caches per shape)."""
    global _prefill, _decode
    if _prefill is None:
        from jaxmoe.model.forward import forward_absorbed, forward_expanded

        _prefill = jax.jit(forward_expanded, static_argnums=0)
        _decode = jax.jit(forward_absorbed, static_argnums=0)
    return _prefill, _decode


def new_cache(cfg, batch: int):
    from jaxmoe.model.cache import init_cache

    return init_cache(cfg, batch, MAX_LEN, jnp.float32)


def jx_prefill(cfg, weights, tokens: np.ndarray, positions: np.ndarray | None = None, cache=None):
    """jaxmoe prefill of tokens [B, T] at positions (default 0..T-1) into a fresh cache."""
    prefill, _ = jitted()
    tokens = np.asarray(tokens, np.int32)
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    if cache is None:
        cache = new_cache(cfg, tokens.shape[0])
    logits, cache = prefill(cfg, weights, cache, jnp.asarray(tokens), jnp.asarray(positions, jnp.int32))
    return np.asarray(logits), cache


def jx_greedy(cfg, weights, prompts: np.ndarray, n: int, lengths: np.ndarray | None = None):
    """jaxmoe greedy continuation: one prefill, then one cached `decode` call per new token.

    prompts [B, T], right-padded when `lengths` [B] says some are shorter (padding tokens get
    position MAX_LEN: computed, never cached or attended to). Returns (tokens [B, n],
    step_logits [B, n, V], cache) with step_logits[:, i] the logits new token i was chosen from."""
    _, decode = jitted()
    prompts = np.asarray(prompts, np.int32)
    b, t = prompts.shape
    lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
    pos = np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], MAX_LEN).astype(np.int32)
    logits, cache = jx_prefill(cfg, weights, prompts, pos)
    step = [logits[np.arange(b), lengths - 1]]
    toks = [step[-1].argmax(-1)]
    for i in range(n - 1):
        lg, cache = decode(cfg, weights, cache, jnp.asarray(toks[-1][:, None], jnp.int32),
                           jnp.asarray((lengths + i)[:, None], jnp.int32))
        step.append(np.asarray(lg)[:, 0])
        toks.append(step[-1].argmax(-1))
    return np.stack(toks, 1), np.stack(step, 1), cache


@dataclasses.dataclass
class Case:
    """One reference model: transformers' copy and jaxmoe's copy of the same weights."""

    name: str
    hf: Any  # DeepseekV3ForCausalLM, fp32, eager
    jx_dir: Path  # the checkpoint jaxmoe loads
    prompt: np.ndarray  # [1, PROMPT_LEN]
    prompt2: np.ndarray  # [1, PROMPT_LEN], a different one
    extra: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def loaded(self):
        from jaxmoe.loading.loader import load_checkpoint

        return load_checkpoint(self.jx_dir, dtype=jnp.float32)

    @property
    def cfg(self):
        return self.loaded[0]

    @property
    def weights(self):
        return self.loaded[1]

    @functools.cached_property
    def hf_greedy(self):
        return H.greedy(self.hf, self.prompt, NEW_TOKENS)

    @functools.cached_property
    def jx_greedy(self):
        return jx_greedy(self.cfg, self.weights, self.prompt, NEW_TOKENS)


def _prompts(seed: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (1, PROMPT_LEN)), rng.integers(0, vocab, (1, PROMPT_LEN))


def _hf_case(name: str, tmp_path_factory) -> Case:
    kwargs = H.CONFIGS[name]
    model = H.build_model(kwargs, SEEDS[name])
    path = H.save_model(model, tmp_path_factory.mktemp(f"hf_{name}"))
    return Case(name, model, path, *_prompts(SEEDS[name], kwargs["vocab_size"]))


@pytest.fixture(scope="module")
def qlora(tmp_path_factory) -> Case:
    return _hf_case("qlora", tmp_path_factory)


@pytest.fixture(scope="module")
def no_qlora(tmp_path_factory) -> Case:
    return _hf_case("no_qlora", tmp_path_factory)


@pytest.fixture(scope="module")
def fp8(qlora, tmp_path_factory) -> Case:
    tmp = tmp_path_factory.mktemp("fp8")
    pair = H.write_fp8_pair(qlora.jx_dir, tmp / "fp8", tmp / "dequantized")
    ref = H.load_model(pair.ref_dir)
    case = Case("fp8", ref, pair.fp8_dir, qlora.prompt, qlora.prompt2)
    case.extra.update(pair=pair, unquantized=qlora.hf)
    return case


@pytest.fixture(scope="module", params=["qlora", "no_qlora", "fp8"])
def case(request) -> Case:
    return request.getfixturevalue(request.param)
