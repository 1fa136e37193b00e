"""OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`, for every error the
server returns: its own (`APIError`), FastAPI's validation errors (as 400, not 422), Starlette's
HTTP errors (404 for an unknown path, 405, a body that does not parse) and, last, anything
unexpected (500, logged with its traceback)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("jaxmoe.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          503: "server_error"}


class APIError(Exception):
    """An error answered as OpenAI's error JSON with this status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for an invalid parameter."""
    return APIError(400, message, param=param, code=code)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _loc(loc: tuple | list) -> str:
    """A field's dotted path, without "body" and pydantic's union member tags ("str", "list[int]")."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(p for p in parts if p not in _UNION_TAGS and "[" not in p and "-" not in p)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic's error list: the first few errors, by location."""
    if not errors:
        return "invalid request body", None
    if errors[0].get("type") == "json_invalid":
        return f"the request body is not valid JSON: {errors[0].get('ctx', {}).get('error', 'parse error')}", None
    shown = []
    for e in errors[:3]:
        where = _loc(e.get("loc", ()))
        msg = str(e.get("msg", "invalid value"))
        shown.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - 3} more errors)" if len(errors) > 3 else ""
    first = _loc(errors[0].get("loc", ()))
    return "; ".join(shown) + more, (first or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        code = "not_found" if exc.status_code == 404 else None
        err = APIError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)
