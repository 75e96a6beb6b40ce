"""The one map from thinvisor's errors to HTTP: status from the error, a JSON body.

Every error body is ``{"error": code, "message": text}``; an unexpected exception is
logged with a request id and answered 500 with that id only, never a traceback.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from thinvisor.errors import ThinvisorError
from thinvisor.host.tasks import error_code

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    error: str
    message: str
    request_id: str | None = None


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body = ErrorBody(error=code, message=message, **extra).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status)


# The error answers every route may give, for the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in [
        (400, "bad input"),
        (401, "not authenticated"),
        (403, "the user's role does not allow it"),
        (404, "no such object"),
        (409, "not in this state, or already exists"),
        (413, "too large"),
        (422, "a stored configuration cannot be read"),
        (429, "too many failed logins"),
        (500, "unexpected error (see the agent log for the request id)"),
        (502, "QEMU or qemu-img failed"),
    ]
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    429: "too_many_requests",
}


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON"
    return f"{'.'.join(loc) or 'body'}: {msg}"


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into an error body."""

    @app.exception_handler(ThinvisorError)
    async def thinvisor_error(request: Request, exc: ThinvisorError) -> JSONResponse:
        return error_response(exc.http_status, error_code(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_argument", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, code, str(exc.detail))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex[:12]
        log.error(
            "request %s %s %s failed", request_id, request.method, request.url.path, exc_info=exc
        )
        return error_response(
            500, "internal", f"internal error (request {request_id})", request_id=request_id
        )
