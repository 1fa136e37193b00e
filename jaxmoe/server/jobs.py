"""From an OpenAI request to what `generate.stream_generate` takes, validated, or a clear 400.

Supported: `messages` (the checkpoint's chat template; `developer` is rendered as `system`,
text content parts are joined), `prompt` (one string or one list of token ids), `max_tokens` /
`max_completion_tokens` (default: the rest of the context), `temperature` (default 1, as
OpenAI's), `top_p`, `top_k` (extension), `seed` (default: a random one when sampling),
`stop`, `stream`, `stream_options.include_usage`, `ignore_eos` (extension), `tools` /
`tool_choice` "auto" | "none" (tools rendered by the chat template, or described in the
system prompt when the template has no place for them: `Tokenizer.apply_chat_template`; the
model's tool-call markup parsed into `tool_calls`; "none" renders no tools). Refused with a
400 that names the parameter: `n` != 1,
`logprobs` / `top_logprobs`, presence or frequency penalties, `logit_bias`, `echo`,
`suffix`, `best_of` != 1, a `response_format` other than text, `tool_choice` "required" or a
named function, several prompts in one request, a prompt that leaves no room in the context.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import jinja2

from jaxmoe.generate import Model
from jaxmoe.server.errors import APIError, invalid
from jaxmoe.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@dataclasses.dataclass(frozen=True)
class Job:
    """One validated generation request."""

    endpoint: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]  # temperature, top_k, top_p, seed, stop, ignore_eos: stream_generate's keywords
    stream: bool
    include_usage: bool
    tools: bool  # the prompt carries tool definitions: parse the model's tool calls


def check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{served}`.", param="model",
                       code="model_not_found")


def _refuse_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.n is not None and req.n != 1:
        raise invalid(f"n={req.n} is not supported: this server returns one choice per request (n must be 1)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise invalid(f"{name} is not supported (only 0)", name)
    if req.logit_bias:
        raise invalid("logit_bias is not supported", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options is only allowed with stream=true", "stream_options")


def _sampling(req: ChatCompletionRequest | CompletionRequest, vocab_size: int) -> dict[str, Any]:
    temperature = 1.0 if req.temperature is None else req.temperature
    seed = req.seed
    if seed is None:
        seed = secrets.randbelow(2**32) if temperature > 0 else 0
    top_k = 0 if req.top_k is None else req.top_k
    if top_k > vocab_size:  # keeps every token, as 0 does (and fits the step's int32 parameters)
        top_k = 0
    return {
        "temperature": temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": req.stop or None,
        "ignore_eos": req.ignore_eos,
    }


def _max_tokens(model: Model, n_prompt: int, requested: int | None, param: str, prompt_param: str) -> int:
    limit = model.context_len
    if requested is not None and requested < 1:
        raise invalid(f"{param} must be >= 1, got {requested}", param)
    if requested is None:
        if n_prompt >= limit:
            raise invalid(f"This model's maximum context length is {limit} tokens, and the prompt has {n_prompt} tokens: "
                          f"no room for a completion. Please shorten the prompt.", prompt_param, "context_length_exceeded")
        return limit - n_prompt
    if n_prompt + requested > limit:
        raise invalid(f"This model's maximum context length is {limit} tokens. However, you requested "
                      f"{n_prompt + requested} tokens ({n_prompt} in the prompt, {requested} for the completion: "
                      f"{param}). Please reduce the prompt or {param}.", param, "context_length_exceeded")
    return requested


def _encode(model: Model, param: str, **kwargs: Any) -> list[int]:
    try:
        return model.encode_prompt(**kwargs)
    except ValueError as e:  # TokenizerError included: bad messages, a template that refuses them
        raise invalid(str(e), param) from None
    except (TypeError, KeyError, jinja2.TemplateError) as e:  # a template tripping over an unusual message
        raise invalid(f"cannot render these messages with the chat template: {type(e).__name__}: {e}", param) from None


def _job(endpoint: str, model: Model, req: Any, ids: list[int], requested: int | None, param: str, prompt_param: str,
         tools: bool) -> Job:
    max_tokens = _max_tokens(model, len(ids), requested, param, prompt_param)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Job(endpoint, ids, max_tokens, _sampling(req, model.cfg.vocab_size), req.stream, include_usage, tools)


# ---- chat ---------------------------------------------------------------------------------------
def message_dict(m: ChatMessage) -> dict[str, Any]:
    """A message as the chat template reads it (content always a string)."""
    if isinstance(m.content, list):
        content = "".join(p.text for p in m.content)
    else:
        content = m.content or ""
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name is not None:
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                           for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


def chat_job(model: Model, req: ChatCompletionRequest) -> Job:
    _refuse_unsupported(req)
    if req.logprobs:
        raise invalid("logprobs are not supported by this server", "logprobs")
    if req.top_logprobs:
        raise invalid("top_logprobs is not supported by this server", "top_logprobs")
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise invalid(f"response_format {req.response_format.get('type')!r} is not supported (only text)", "response_format")
    if req.tool_choice == "required" or not (req.tool_choice is None or isinstance(req.tool_choice, str)):
        raise invalid("tool_choice 'required' or a named function is not supported: use 'auto' or 'none'", "tool_choice")
    if not req.messages:
        raise invalid("messages must be a non-empty list", "messages")
    messages = [message_dict(m) for m in req.messages]
    use_tools = bool(req.tools) and req.tool_choice != "none"
    if use_tools:
        tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
        ids = _encode(model, "tools", messages=messages, tools=tools)
    else:
        ids = _encode(model, "messages", messages=messages)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    return _job(CHAT, model, req, ids, requested, param, "messages", use_tools)


# ---- text completions ---------------------------------------------------------------------------
def completion_job(model: Model, req: CompletionRequest) -> Job:
    _refuse_unsupported(req)
    if req.logprobs:
        raise invalid("logprobs are not supported by this server", "logprobs")
    if req.echo:
        raise invalid("echo is not supported", "echo")
    if req.suffix:
        raise invalid("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != 1:
        raise invalid(f"best_of={req.best_of} is not supported (only 1)", "best_of")
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise invalid(f"a list of {len(prompt)} prompts is not supported: send one prompt per request", "prompt")
        prompt = prompt[0]
    ids = _encode(model, "prompt", prompt=prompt)
    return _job(COMPLETIONS, model, req, ids, req.max_tokens, "max_tokens", "prompt", False)
