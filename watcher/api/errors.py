"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
status codes the official SDK maps to its exception classes.

Bad input is always a 4xx: the SDK retries 5xx, so a 500 for a bad request would be sent
three times before the user saw it.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger()

INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
    """An answer other than success; raised anywhere, turned into a response in one place."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        kind: str = INVALID_REQUEST,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    # The same answer for an id that never existed and one that belongs to another key, so
    # that a 404 never confirms that someone else's object exists.
    return ApiError(404, f"No {kind} found with id '{object_id}'.", param=param, code="not_found")


def error_body(
    message: str, kind: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    headers = dict(error.headers)
    if error.status == 409:
        # A conflict here (cancelling a finished batch) does not go away by itself; the SDK
        # retries 409 unless told not to.
        headers.setdefault("x-should-retry", "false")
    return JSONResponse(
        error_body(error.message, error.kind, error.param, error.code),
        status_code=error.status,
        headers=headers,
    )


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    details = error.errors()
    if not details:
        return "The request is not valid.", None
    first = details[0]
    where = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(where) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if first.get("type") == "missing":
        if param is None:
            return "The request needs a JSON object as its body.", None
        return f"Missing required parameter: '{param}'.", param
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    return (f"Invalid value for '{param}': {message}." if param else f"{message}."), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return error_response(ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
            return error_response(ApiError(404, message, code="unknown_url"))
        if error.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
            return error_response(ApiError(405, message, code="method_not_allowed"))
        return error_response(ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("api_request_failed", path=request.url.path, error=str(error))
        message = f"The server could not complete the request ({type(error).__name__})."
        return error_response(ApiError(500, message, kind="server_error"))
