"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the right status.

Raise `APIError` anywhere under a route (or in a dependency); the app's handler renders it.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unauthorized(message: str = "Incorrect API key provided.", code: str = "invalid_api_key") -> APIError:
    return APIError(401, message, "authentication_error", None, code, {"WWW-Authenticate": "Bearer"})


def payment_required(message: str) -> APIError:
    return APIError(402, message, "insufficient_quota", None, "insufficient_quota")


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, "not_found_error", param, code)


def rate_limited(message: str, retry_after: float, headers: dict[str, str] | None = None, type: str = "rate_limit_exceeded") -> APIError:
    h = {"Retry-After": str(max(1, int(retry_after + 0.999)))}
    h.update(headers or {})
    return APIError(429, message, type, None, type, h)
