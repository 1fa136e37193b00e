"""The FastAPI app: `create_app(model, served_model_name=..., api_key=None, max_queue=32)`.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both plain and streamed),
`GET /v1/models` (and `/v1/models/{id}`), `GET /health`, `GET /metrics` (Prometheus text).
With an API key, every path but `/health` needs `Authorization: Bearer KEY` (checked in an
ASGI middleware, before the body is read: a 401 never depends on the body). The same
middleware counts every answer by endpoint and status. On shutdown (the lifespan's end,
after uvicorn's graceful wait) whatever still generates is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jaxmoe.generate import Model
from jaxmoe.server.completions import respond
from jaxmoe.server.errors import APIError, install_error_handlers
from jaxmoe.server.jobs import chat_job, check_model, completion_job
from jaxmoe.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from jaxmoe.server.state import ServerState

DEFAULT_MAX_QUEUE = 32
OPEN_PATHS = frozenset({"/health"})


class _AuthAndCount:
    """Pure ASGI middleware (streams and disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp, state: ServerState, api_key: str | None):
        self.app, self.state = app, state
        self.key = api_key.encode() if api_key else None

    def _authorized(self, scope: Scope) -> bool:
        if self.key is None or scope["path"] in OPEN_PATHS:
            return True
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode("latin-1"), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.state.metrics.http_answer(path, message["status"])
            await send(message)

        if not self._authorized(scope):
            err = APIError(401, "Incorrect or missing API key: send the header `Authorization: Bearer <key>`.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await err.response()(scope, receive, counting_send)
            return
        await self.app(scope, receive, counting_send)


def create_app(model: Model, *, served_model_name: str, api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, shutdown_cancel_timeout: float = 10.0) -> FastAPI:
    """An OpenAI-compatible app over `model`'s engine. `max_queue`: requests allowed to wait
    for a cache slot beyond the engine's slots (one more gets a 503 with Retry-After)."""
    if not served_model_name:
        raise ValueError("served_model_name must be a non-empty string")
    state = ServerState(model, served_model_name=served_model_name, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(state.cancel_all, "shutdown", shutdown_cancel_timeout)

    app = FastAPI(title="jaxmoe", summary="OpenAI-compatible API over a jaxmoe model", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(_AuthAndCount, state=state, api_key=api_key)

    def card() -> ModelCard:
        return ModelCard(id=served_model_name, created=state.created, max_model_len=model.context_len)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": state.in_flight()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=state.metrics.content_type)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> Any:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str) -> Any:
        check_model(model_id, served_model_name)
        return card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model, served_model_name)
        return await respond(state, request, chat_job(model, body))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model, served_model_name)
        return await respond(state, request, completion_job(model, body))

    return app
