"""The public generation API: `load`, `generate`, `stream_generate`.

One request runs as: tokenize -> validate -> an empty latent cache of a bucketed length ->
one jitted prefill step over the prompt padded to a bucket (padding tokens sit at position
`cache_len`, so the model drops them) that samples the first token from the last real
position -> one jitted decode step per further token. Sampling runs inside the jitted steps
with traced parameters, so each (cache bucket, prompt bucket) pair compiles once and serves
every request and every sampling setting. The next decode step is dispatched before the
host looks at the current token (detokenize, stop strings), so host work overlaps device work.

`generate` is literally the join of `stream_generate`.
"""

from __future__ import annotations

import functools
import numbers
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.model.cache import init_cache
from jaxmoe.model.forward import decode, prefill
from jaxmoe.runtime.sampling import SamplingParams, sample, step_key
from jaxmoe.runtime.stopping import StopMatcher, normalize_stop
from jaxmoe.tokenizer import Message, Tokenizer

MIN_CACHE_BUCKET = 64
MIN_PROMPT_BUCKET = 16


# ---- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timings:
    ttft_s: float = 0.0  # request start -> first generated token on the host
    prefill_tok_s: float = 0.0  # prompt tokens / prefill time
    decode_tok_s: float = 0.0  # tokens after the first / time since the first
    prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass(frozen=True)
class StreamResponse:
    """One generated token: its id, the text it completes (may be empty), running timings."""

    token_id: int
    text: str
    finish_reason: str | None  # None while generating; then "stop" | "length" | "eos"
    timings: Timings


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # every generated token, including a final EOS or stop-string token
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (stop string) | "length" (max_new_tokens) | "eos"
    timings: Timings


# ---- the loaded model -------------------------------------------------------------------------
@dataclass(eq=False)
class Model:
    """A loaded checkpoint: config, weights pytree, tokenizer (None without tokenizer.json)."""

    cfg: ModelConfig = field(repr=False)
    weights: Any = field(repr=False)
    tokenizer: Tokenizer | None = field(default=None, repr=False)
    max_seq_len: int | None = None  # a cap on the context below max_position_embeddings
    path: Path | None = None
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    cpu_kernels: bool = False  # large matmuls and routed experts run on cpu_ext

    def close(self) -> None:
        """Free the native memory of CPU-kernel weights now (rather than at exit)."""
        if self.cpu_kernels:
            from jaxmoe.cpu.placement import release

            release(self.weights)
            self.cpu_kernels, self.weights = False, None

    @property
    def dtype(self) -> jnp.dtype:
        """Activation and KV-cache dtype (that of the embeddings)."""
        return self.weights.embed_tokens.dtype

    @property
    def context_len(self) -> int:
        """Most positions one request may use (prompt + generated tokens)."""
        limit = self.cfg.max_position_embeddings
        return limit if self.max_seq_len is None else min(limit, self.max_seq_len)

    def buckets(self, prompt_tokens: int, max_new_tokens: int) -> tuple[int, int]:
        """(cache length, padded prompt length) used for a request of these sizes."""
        cache_len = _bucket(prompt_tokens + max_new_tokens, MIN_CACHE_BUCKET, self.context_len)
        return cache_len, _bucket(prompt_tokens, MIN_PROMPT_BUCKET, cache_len)

    def compile(self, prompt_tokens: int, max_new_tokens: int) -> float:
        """Compile the steps a request of these sizes uses (seconds taken); later requests
        in the same buckets start without compiling."""
        t0 = time.perf_counter()
        cache_len, padded = self.buckets(prompt_tokens, max_new_tokens)
        cache = init_cache(self.cfg, 1, cache_len, self.dtype)
        tokens, positions = _pad_prompt([0], padded, cache_len)
        s = _sampling_args(SamplingParams())
        tok, cache = _prefill_step(self.cfg, self.weights, cache, tokens, positions, np.int32(0), *s)
        tok, cache = _decode_step(self.cfg, self.weights, cache, tok, np.int32(1), np.int32(1), *s)
        jax.block_until_ready(tok)
        return time.perf_counter() - t0

    def encode_prompt(self, prompt: str | Sequence[int] | None = None, messages: Sequence[Message] | None = None) -> list[int]:
        """Token ids of a text prompt, a token-id prompt or chat `messages`, validated."""
        if (prompt is None) == (messages is None):
            raise ValueError("pass exactly one of `prompt` (text or token ids) or `messages`")
        if messages is not None:
            ids = self._require_tokenizer("messages").encode_chat(messages)
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self._require_tokenizer("a text prompt").encode(prompt)
        else:
            ids = _token_ids(prompt)
        if not ids:
            raise ValueError("prompt is empty (0 tokens)")
        vocab = self.cfg.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t} at index {i} is outside the vocabulary [0, {vocab})")
        return ids

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and {self.path} has no tokenizer.json; pass token ids")
        return self.tokenizer

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        total, limit = prompt_tokens + max_new_tokens, self.context_len
        if total > limit:
            why = f"max_position_embeddings={self.cfg.max_position_embeddings}"
            if self.max_seq_len is not None and self.max_seq_len < self.cfg.max_position_embeddings:
                why = f"max_seq_len={self.max_seq_len}"
            raise ValueError(
                f"prompt too long: {prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} = "
                f"{total} tokens exceeds the model's context of {limit} tokens ({why})"
            )


def load(
    path: str | Path,
    *,
    dtype: Any = jnp.float32,
    max_seq_len: int | None = None,
    cpu_kernels: bool | None = None,
    progress: Any = None,
) -> Model:
    """Load a checkpoint directory (config.json, safetensors, optional tokenizer files).

    dtype: the dtype of norms, embeddings, activations and the KV cache (Linears keep their
      stored format: FP8 stays FP8).
    max_seq_len: cap the context (prompt + generated tokens) below max_position_embeddings.
    cpu_kernels: run the large matmuls and the routed experts through jaxmoe's native CPU
      kernels (cpu_ext). None (default) = when JAX runs on the CPU and the kernels load;
      True = required; False = the pure JAX path.
    progress: show a progress bar (None = only for slow loads on a terminal).
    """
    from jaxmoe.loading.loader import load_checkpoint

    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    path = Path(path)
    cfg, weights = load_checkpoint(path, dtype=dtype, progress=progress)
    weights, on_kernels = _place(weights, cpu_kernels)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    eos = set(cfg.eos_token_id)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return Model(cfg, weights, tokenizer, max_seq_len, path, frozenset(eos), on_kernels)


def _place(weights: Any, cpu_kernels: bool | None) -> tuple[Any, bool]:
    """(weights, whether they run on the CPU kernels)."""
    if cpu_kernels is False or (cpu_kernels is None and jax.default_backend() != "cpu"):
        return weights, False
    try:
        from jaxmoe.cpu import placement

        install = getattr(placement, "install_linear", None)  # a shim until quant.linear dispatches on HostLinear
        if install is not None:
            install()
        return placement.to_cpu_placement(weights), True
    except (ImportError, OSError, RuntimeError) as e:  # the native library cannot be built or loaded here
        if cpu_kernels:
            raise RuntimeError(f"cpu_kernels=True, but jaxmoe's CPU kernels are unavailable: {e}") from e
        warnings.warn(f"jaxmoe's CPU kernels are unavailable ({e}); running the pure JAX path", stacklevel=3)
        return weights, False


# ---- generation -------------------------------------------------------------------------------
def generate(
    model: Model,
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Sequence[Message] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
) -> GenerationResult:
    """Generate a completion: the join of `stream_generate` with the same arguments."""
    req = _prepare(model, prompt, messages, max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos)
    token_ids, texts, last = [], [], None
    for last in _run(model, req):
        token_ids.append(last.token_id)
        texts.append(last.text)
    assert last is not None and last.finish_reason is not None
    return GenerationResult("".join(texts), token_ids, req.prompt_ids, last.finish_reason, last.timings)


def stream_generate(
    model: Model,
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Sequence[Message] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
) -> Iterator[StreamResponse]:
    """Yield one `StreamResponse` per generated token; the last has its finish_reason set.

    prompt: text (tokenized with the checkpoint's tokenizer, BOS added as its config says) or
    a sequence of token ids; or pass `messages` to use the chat template instead.
    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; `seed` fixes the
    sampled tokens. Generation ends at EOS (unless ignore_eos), at a stop string (which is not
    part of the text), or after max_new_tokens. Invalid arguments raise ValueError here,
    before anything runs.
    """
    req = _prepare(model, prompt, messages, max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos)
    return _run(model, req)


@dataclass(frozen=True)
class _Request:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    stops: tuple[str, ...]
    eos: frozenset[int]
    prepare_s: float  # tokenizing and validating, counted in the time to first token


def _prepare(model, prompt, messages, max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos) -> _Request:
    t0 = time.perf_counter()
    params = SamplingParams(temperature, top_k, top_p, seed)
    stops = normalize_stop(stop)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if stops and model.tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode text; this checkpoint has none")
    ids = model.encode_prompt(prompt, messages)
    model.check_fits(len(ids), int(max_new_tokens))
    eos = frozenset() if ignore_eos else model.eos_token_ids
    return _Request(ids, int(max_new_tokens), params, stops, eos, time.perf_counter() - t0)


def _run(model: Model, req: _Request) -> Iterator[StreamResponse]:
    t0 = time.perf_counter() - req.prepare_s
    cfg, weights, ids, max_new = model.cfg, model.weights, req.prompt_ids, req.max_new_tokens
    n = len(ids)
    cache_len, padded = model.buckets(n, max_new)
    cache = init_cache(cfg, 1, cache_len, model.dtype)
    tokens, positions = _pad_prompt(ids, padded, cache_len)
    s = _sampling_args(req.params)
    detok = model.tokenizer.detokenizer() if model.tokenizer is not None else None
    stopper = StopMatcher(req.stops)

    t_prefill = time.perf_counter()
    tok_dev, cache = _prefill_step(cfg, weights, cache, tokens, positions, np.int32(n - 1), *s)
    tok = int(tok_dev)
    t_first = time.perf_counter()
    timings = Timings(t_first - t0, n / max(t_first - t_prefill, 1e-9), 0.0, n, 0)

    for step in range(1, max_new + 1):  # `tok` is generated token number `step`
        is_eos = tok in req.eos
        if step < max_new and not is_eos:  # dispatch the next step before looking at this token
            next_dev, cache = _decode_step(cfg, weights, cache, tok_dev, np.int32(n + step - 1), np.int32(step), *s)
        finish = "eos" if is_eos else ("length" if step == max_new else None)
        text = ""
        if detok is not None:
            delta = "" if is_eos else detok.add(tok)
            if finish:
                delta += detok.flush()
            text = stopper.feed(delta)
            if stopper.stopped:
                finish = "stop"
            elif finish:
                text += stopper.flush()
        now = time.perf_counter()
        rate = (step - 1) / (now - t_first) if step > 1 else 0.0
        timings = replace(timings, decode_tok_s=rate, generated_tokens=step)
        yield StreamResponse(tok, text, finish, timings)
        if finish:
            return
        tok_dev = next_dev
        tok = int(tok_dev)


# ---- jitted steps -----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill_step(cfg, weights, cache, tokens, positions, last, seed, temperature, top_k, top_p):
    logits, cache = prefill(cfg, weights, cache, tokens, positions, logit_index=last.reshape(1))
    return sample(logits[0, 0], step_key(seed, 0), temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode_step(cfg, weights, cache, token, position, step, seed, temperature, top_k, top_p):
    logits, cache = decode(cfg, weights, cache, token.reshape(1, 1), position.reshape(1, 1))
    return sample(logits[0, 0], step_key(seed, step), temperature, top_k, top_p), cache


def _sampling_args(p: SamplingParams) -> tuple[np.ndarray, ...]:
    return np.uint32(p.seed), np.float32(p.temperature), np.int32(p.top_k), np.float32(p.top_p)


def _pad_prompt(ids: Sequence[int], padded: int, cache_len: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens and positions [1, padded]; padding sits at position cache_len (dropped)."""
    n = len(ids)
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, :n] = ids
    positions = np.full((1, padded), cache_len, np.int32)
    positions[0, :n] = np.arange(n, dtype=np.int32)
    return tokens, positions


def _bucket(n: int, lo: int, hi: int) -> int:
    """The next power of two >= max(n, lo), capped at hi."""
    return min(hi, 1 << (max(n, lo) - 1).bit_length())


def _token_ids(prompt: Any) -> list[int]:
    arr = np.asarray(prompt)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"prompt must be a string or a 1-D sequence of integer token ids, got {type(prompt).__name__}")
    return [int(t) for t in arr]
