"""Errors of the HTTP API: the gRPC status a failure maps to, as OpenAI-shaped JSON.

The gateway's errors are typed (``specdec.core.errors``), each naming a gRPC status;
the HTTP API answers with that status's HTTP equivalent (the mapping of Google's
API design guide, which grpc-gateway uses too) and OpenAI's error body,
``{"error": {"message", "type", "param", "code"}}``, so OpenAI clients raise their
usual exceptions (``openai.BadRequestError``, ``AuthenticationError``, ``NotFoundError``,
``RateLimitError``...). ``code`` is the gRPC status name, lower case.
"""

from __future__ import annotations

import logging
from typing import Any

from specdec.core.errors import SpecdecError

log = logging.getLogger(__name__)

# gRPC status name -> HTTP status.
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

# HTTP status -> OpenAI's error type.
_ERROR_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class HttpError(Exception):
    """An error the HTTP layer itself finds (no route, a body too large, bad JSON)."""

    def __init__(self, status: int, message: str, *, code: str = "", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def error_body(status: int, message: str, code: str = "", param: str | None = None) -> Any:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPE.get(status, "server_error" if status >= 500 else "error"),
            "param": param,
            "code": code or None,
        }
    }


def http_error(exc: BaseException) -> tuple[int, Any]:
    """(HTTP status, OpenAI error body) of an exception raised while serving a request."""
    if isinstance(exc, HttpError):
        return exc.status, error_body(exc.status, str(exc), exc.code, exc.param)
    if isinstance(exc, SpecdecError):
        status = HTTP_STATUS.get(exc.status, 500)
        return status, error_body(status, str(exc), exc.status.lower())
    log.exception("unexpected error in an HTTP request", exc_info=exc)
    return 500, error_body(500, f"internal error: {type(exc).__name__}: {exc}", "internal")
