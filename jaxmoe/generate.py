"""The public generation API: `generate` and `stream_generate` over a loaded `Model`
(`loaded_model.load`).

A request runs as: tokenize -> validate -> submit to the model's serving engine
(`serving.engine`: continuous batching over cache slots, chunked prefill, the runtime
preset's placement) -> per emitted token: detokenize, stop strings, one StreamResponse.
Concurrent calls (threads) share the engine and are batched together. Sampling runs inside
the engine's jitted step with per-request parameters and keys, so the tokens of a request
do not depend on what else runs beside it.

`generate` is literally the join of `stream_generate`.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from jaxmoe.loaded_model import Model, load  # noqa: F401  (the public API: jaxmoe.generate.load)
from jaxmoe.serving.sampling import SamplingParams
from jaxmoe.serving.stopping import StopMatcher, normalize_stop
from jaxmoe.tokenizer import Message


# ---- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timings:
    ttft_s: float = 0.0  # request start -> first generated token on the host
    prefill_tok_s: float = 0.0  # prompt tokens / prefill time
    decode_tok_s: float = 0.0  # tokens after the first / time since the first
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_strategy: str = ""  # how the engine prefilled the prompt: "cpu" | "resident" | "slp" | "dslp"
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (not computed)


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
    keep_special_tokens: Sequence[str] = (),
    on_submit: Callable[[Any], None] | None = None,
) -> Iterator[StreamResponse]:
    """Yield one `StreamResponse` per generated token; the last has its finish_reason set.

    prompt: text (tokenized with the checkpoint's tokenizer, BOS added as its config says) or
    a sequence of token ids; or pass `messages` to use the chat template instead.
    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; `seed` fixes the
    sampled tokens. Generation ends at EOS (unless ignore_eos), at a stop string (which is not
    part of the text), or after max_new_tokens. Invalid arguments raise ValueError here,
    before anything runs.
    keep_special_tokens: special tokens kept in the text (e.g. tool-call markers, for a parser
    of them); the other special tokens are left out.
    on_submit: called with the engine's request once it is submitted (in the iterating thread):
    another thread may `cancel()` it, which ends this stream at the engine's next step.
    """
    req = _prepare(model, prompt, messages, max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos)
    return _run(model, req, keep_special_tokens, on_submit)


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


def _run(model: Model, req: _Request, keep: Sequence[str] = (), on_submit: Callable[[Any], None] | None = None
         ) -> Iterator[StreamResponse]:
    t0 = time.perf_counter() - req.prepare_s
    n, max_new = len(req.prompt_ids), req.max_new_tokens
    detok = model.tokenizer.detokenizer(keep=keep) if model.tokenizer is not None else None
    stopper = StopMatcher(req.stops)
    t_submit = time.perf_counter()
    handle = model.engine.submit(req.prompt_ids, max_new, req.params, eos_token_ids=sorted(req.eos))
    timings, t_first = Timings(prompt_tokens=n, prefill_strategy=handle.prefill_strategy or ""), 0.0
    try:
        if on_submit is not None:
            on_submit(handle)
        for ev in handle.events():
            if ev.token is None:  # the engine's closing event: every token was handled below
                return
            step, tok = ev.index + 1, ev.token  # `tok` is generated token number `step`
            if step == 1:
                t_first = ev.time
                timings = replace(timings, ttft_s=t_first - t0, prefill_tok_s=n / max(t_first - t_submit, 1e-9),
                                  cached_tokens=handle.cached_tokens)
            is_eos = tok in req.eos
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
            rate = (step - 1) / (time.perf_counter() - t_first) if step > 1 else 0.0
            timings = replace(timings, decode_tok_s=rate, generated_tokens=step)
            yield StreamResponse(tok, text, finish, timings)
            if finish:
                return
    finally:
        handle.cancel()  # frees the slot at once when the caller stops early or a stop string hit
