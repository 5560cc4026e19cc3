"""Authentication: `Authorization: Bearer sk-...` -> the key's record, or an OpenAI-shaped error.

    @router.post("/v1/completions")
    async def completions(request: Request, key: KeyRecord | None = Depends(require_key)): ...

Uses `request.app.state.ctx.settings.auth` (off: every route is open and `require_key` returns
None) and `request.app.state.ctx.store` (an AccountStore). The key itself is never logged or echoed
in an error message.
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import Request

from gpt2serve.accounts.pricing import usd
from gpt2serve.accounts.store import KeyRecord
from gpt2serve.api.errors import payment_required, unauthorized

MISSING = "You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'."


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authenticate(request: Request, *, check_credit: bool = True) -> KeyRecord:
    """The key record for the request's bearer key, whatever `settings.auth` says.

    401 (authentication_error, invalid_api_key) when the key is missing, unknown or revoked; with
    check_credit, 402 (insufficient_quota) when the account or the key's limit has nothing left."""
    token = bearer_token(request)
    if token is None:
        raise unauthorized(MISSING)
    store = request.app.state.ctx.store
    record = await anyio.to_thread.run_sync(store.authenticate, token)
    if record is None:
        raise unauthorized("Incorrect API key provided. Create one with POST /v1/signup or `gpt2serve keys create`.")
    if record.revoked:
        raise unauthorized("This API key has been revoked.")
    if check_credit:
        if record.account_available_micros <= 0:
            raise payment_required(
                f"Your account is out of credit (${usd(max(0, record.account_available_micros))} left). Add credit "
                "to continue.")
        left = record.limit_remaining_micros
        if left is not None and left - record.reserved_micros <= 0:
            raise payment_required(f"This API key has reached its spending limit of ${usd(record.limit_micros or 0)}.")
    request.state.key = record
    return record


async def require_key(request: Request) -> KeyRecord | None:
    """FastAPI dependency for billed routes: None when auth is off, else a usable key (401 / 402)."""
    if not request.app.state.ctx.settings.auth:
        return None
    return await authenticate(request, check_credit=True)
