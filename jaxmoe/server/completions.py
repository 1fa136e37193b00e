"""A generation's responses back into OpenAI's shapes: one JSON answer, or server-sent events
(`data: {...}\\n\\n` chunks, ending with `data: [DONE]`).

finish_reason is `generate`'s, in OpenAI's words: "eos" and "stop" (a stop string) -> "stop",
"length" -> "length"; "tool_calls" when the answer carries tool calls. Usage counts the
prompt's tokens and every generated one (a final EOS included).

A client that goes away cancels its generation: for a stream, the response's cancellation
(Starlette stops the body on a disconnect) and a watcher on the ASGI `receive` channel both
cancel it; for a plain answer the watcher does. A generation cancelled by a shutdown ends
with an error (503 / an error event), a failed one with a 500 / an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxmoe.generate import StreamResponse
from jaxmoe.server.bridge import GenerationStream
from jaxmoe.server.errors import APIError, error_body
from jaxmoe.server.jobs import CHAT, Job
from jaxmoe.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    PromptTokensDetails,
    ToolCallDelta,
    ToolCallFunction,
    ToolCallOut,
    Usage,
    chunk_json,
)
from jaxmoe.server.state import ServerState
from jaxmoe.server.tool_calls import ToolCall, ToolCallParser

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Output:
    """One generation's text, tool calls and end, built response by response. With a tool-call
    parser (requests with tools) the model's tool-call markup becomes calls and never reaches
    the content."""

    def __init__(self, job: Job, parser: ToolCallParser | None = None):
        self.job = job
        self.parser = parser
        self.content: list[str] = []
        self.calls: list[ToolCall] = []
        self.last: StreamResponse | None = None

    def add(self, r: StreamResponse) -> tuple[str, list[ToolCall]]:
        """The content and the new tool calls this response completes."""
        self.last = r
        text, calls = (r.text, []) if self.parser is None else self.parser.feed(r.text)
        calls = list(calls)
        if r.finish_reason is not None and self.parser is not None:
            rest, more = self.parser.finish()
            text, calls = text + rest, calls + list(more)
        self.content.append(text)
        self.calls += calls
        return text, calls

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finish_reason is not None

    @property
    def finish_reason(self) -> str:
        if self.calls:
            return "tool_calls"
        return FINISH.get(self.last.finish_reason, "stop") if self.finished else "cancelled"

    def usage(self) -> Usage:
        n_prompt = len(self.job.prompt_ids)
        n_gen = self.last.timings.generated_tokens if self.last is not None else 0
        cached = self.last.timings.cached_tokens if self.last is not None else 0
        return Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def record(self, state: ServerState, reason: str | None = None) -> None:
        state.metrics.generation(self.job.endpoint, reason or self.finish_reason, len(self.job.prompt_ids),
                                 self.last.timings if self.last is not None else None)


def _tool_calls(calls: list[ToolCall], first_index: int = 0, delta: bool = False) -> list[Any]:
    if delta:
        return [ToolCallDelta(index=first_index + i, id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments))
                for i, c in enumerate(calls)]
    return [ToolCallOut(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments)) for c in calls]


async def _watch_disconnect(request: Request, stream: GenerationStream) -> None:
    """Cancel `stream` when the client goes away (the body has been read: `receive` now only
    says http.disconnect, when it comes)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not stream.done.is_set():
            stream.cancel("disconnected")


def _ids(job: Job) -> tuple[str, int]:
    prefix = "chatcmpl" if job.endpoint == CHAT else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


async def respond(state: ServerState, request: Request, job: Job) -> Any:
    """Run `job` (admitted by `state.start`) and answer it, streamed or not."""
    stream = state.start(job)
    out = Output(job, ToolCallParser() if job.tools else None)
    watcher = asyncio.create_task(_watch_disconnect(request, stream))
    if job.stream:
        events = _chat_events if job.endpoint == CHAT else _completion_events
        return StreamingResponse(_sse(state, stream, out, watcher, events), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        async for r in stream.responses():
            out.add(r)
    except Exception as e:
        out.record(state, "error")
        raise APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error") from e
    except BaseException:  # the request's task was cancelled (shutdown timeout)
        stream.cancel("shutdown")
        out.record(state, "cancelled")
        raise
    finally:
        watcher.cancel()
    out.record(state)
    if not out.finished:
        if stream.cancel_reason == "disconnected":  # nobody reads the answer
            return JSONResponse(error_body("the client disconnected", "invalid_request_error"), status_code=499)
        raise APIError(503, "the request was cancelled: the server is shutting down", code="shutdown")
    rid, created = _ids(job)
    base = {"id": rid, "created": created, "model": state.served_model_name, "system_fingerprint": state.fingerprint}
    text = "".join(out.content)
    if job.endpoint == CHAT:
        message = AssistantMessage(content=text if (text or not out.calls) else None,
                                   tool_calls=_tool_calls(out.calls) if out.calls else None)
        body = ChatCompletion(**base, choices=[ChatChoice(message=message, finish_reason=out.finish_reason)],
                              usage=out.usage())
    else:
        body = Completion(**base, choices=[CompletionChoice(text=text, finish_reason=out.finish_reason)], usage=out.usage())
    return JSONResponse(body.model_dump(mode="json"))


# ---- streaming ------------------------------------------------------------------------------------
async def _sse(state: ServerState, stream: GenerationStream, out: Output, watcher: asyncio.Task, events: Any
               ) -> AsyncIterator[str]:
    rid, created = _ids(out.job)
    base = {"id": rid, "created": created, "model": state.served_model_name, "system_fingerprint": state.fingerprint}
    reason = None
    try:
        async for event in events(base, stream, out):
            yield event
        if not out.finished:
            reason = "cancelled"
            message = "the request was cancelled" + (": the server is shutting down" if stream.cancel_reason == "shutdown"
                                                     else "")
            yield f"data: {_json(error_body(message, 'server_error', None, 'cancelled'))}\n\n"
        elif out.job.include_usage:
            chunk_type = ChatCompletionChunk if out.job.endpoint == CHAT else Completion
            yield chunk_json(chunk_type(**base, choices=[], usage=out.usage()))
        yield "data: [DONE]\n\n"
    except Exception as e:  # the generation failed: the status line is sent, so say it in the stream
        reason = "error"
        yield f"data: {_json(error_body(f'generation failed: {type(e).__name__}: {e}', 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also on a disconnect or a shutdown cancelling the response
        watcher.cancel()
        if not stream.done.is_set():
            stream.cancel("disconnected")
        if not out.finished:
            reason = reason or "cancelled"
        out.record(state, reason)


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


async def _chat_events(base: dict[str, Any], stream: GenerationStream, out: Output) -> AsyncIterator[str]:
    def chunk(delta: ChatDelta, finish: str | None = None) -> str:
        return chunk_json(ChatCompletionChunk(**base, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]))

    yield chunk(ChatDelta(role="assistant", content=""))
    async for r in stream.responses():
        n_before = len(out.calls)
        text, calls = out.add(r)
        if text:
            yield chunk(ChatDelta(content=text))
        if calls:
            yield chunk(ChatDelta(tool_calls=_tool_calls(calls, n_before, delta=True)))
        if r.finish_reason is not None:
            yield chunk(ChatDelta(), out.finish_reason)


async def _completion_events(base: dict[str, Any], stream: GenerationStream, out: Output) -> AsyncIterator[str]:
    async for r in stream.responses():
        text, _ = out.add(r)
        finish = out.finish_reason if r.finish_reason is not None else None
        if text or finish:
            yield chunk_json(Completion(**base, choices=[CompletionChoice(text=text, finish_reason=finish)]))
