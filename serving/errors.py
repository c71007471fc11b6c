"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from adapters.errors import (
    AdapterError,
    AdapterTooLarge,
    Conflict,
    InvalidAdapter,
    NotFound,
    QuotaExceeded,
)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or HTTPStatus(status).phrase.lower().replace(" ", "_")
        self.param = param
        self.headers = headers or {}


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, code, param), status_code=status, headers=headers
    )


def model_not_found(model: str) -> APIError:
    # The same answer whether the adapter does not exist or belongs to another tenant.
    return APIError(404, f"The model `{model}` does not exist.", "model_not_found", "model")


_ADAPTER_STATUS: dict[type[AdapterError], int] = {
    InvalidAdapter: 400,
    AdapterTooLarge: 413,
    QuotaExceeded: 403,
    NotFound: 404,
    Conflict: 409,
}


def adapter_error_status(exc: AdapterError) -> int:
    for cls in type(exc).__mro__:
        if cls in _ADAPTER_STATUS:
            return _ADAPTER_STATUS[cls]
    return 400


def install_error_handlers(app: FastAPI) -> None:
    """vLLM's handlers (validation, engine errors, fallbacks) plus ours on top."""
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

    init_exception_handler(app)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(AdapterError)
    async def _adapter_error(_: Request, exc: AdapterError) -> JSONResponse:
        return error_response(adapter_error_status(exc), str(exc), exc.code)
