"""Account routes (OpenRouter-shaped): sign-up, the calling key, credits, one generation's usage.

    POST /v1/signup          -> {"key": "sk-...", "data": {...}}   the key is shown this once
    GET  /v1/key             -> {"data": {label, limit, usage, limit_remaining, rate_limit, ...}}
    GET  /v1/credits         -> {"data": {total_credits, total_usage}}
    GET  /v1/generation?id=  -> {"data": {id, model, tokens_prompt, tokens_completion, total_cost, ...}}

Money in responses is USD as JSON numbers (OpenRouter's shape) plus the exact integer `*_micros`.
These routes need a key even when `settings.auth` is off (they are about an account), but not
credit: an account that has run out can still look at its balance.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Body, Depends, Query, Request

from gpt2serve.accounts.pricing import usd
from gpt2serve.accounts.store import GenerationRecord, KeyRecord, SignupLimited
from gpt2serve.api.auth import authenticate, bearer_token
from gpt2serve.api.errors import APIError, not_found, rate_limited

router = APIRouter(tags=["accounts"])


def _usd(micros: int | None) -> float | None:
    # Display only: the ledger is integer micro-USD; this is OpenRouter's numeric USD field.
    return None if micros is None else float(usd(micros))


async def _account_key(request: Request) -> KeyRecord:
    return await authenticate(request, check_credit=False)


def _client_address(request: Request) -> str:
    # Behind a proxy, run uvicorn with --proxy-headers --forwarded-allow-ips so this is the
    # client's address rather than the proxy's.
    return request.client.host if request.client else "unknown"


@router.post("/v1/signup")
async def signup(request: Request, body: dict[str, Any] | None = Body(default=None)) -> dict[str, Any]:
    ctx = request.app.state.ctx
    settings = ctx.settings
    if not settings.signup_enabled:
        raise APIError(403, "Sign-up is disabled on this server; ask the operator for a key.",
                       "permission_error", None, "signup_disabled")
    label = (body or {}).get("label")
    if label is not None and (not isinstance(label, str) or len(label) > 200):
        raise APIError(400, "label must be a string of at most 200 characters.", param="label")
    try:
        account_id, plaintext, info = await anyio.to_thread.run_sync(lambda: ctx.store.signup(
            address=_client_address(request), credit_micros=settings.starter_credit_micros,
            per_hour=settings.signup_rate_per_hour, label=label))
    except SignupLimited as e:
        raise rate_limited(f"Too many sign-ups from your address ({settings.signup_rate_per_hour} per hour). "
                           f"Retry in {e.retry_after_s:.0f}s.", e.retry_after_s) from None
    return {
        "key": plaintext,
        "data": {
            "account_id": account_id,
            "key_prefix": info.prefix,
            "label": info.label,
            "credit": _usd(settings.starter_credit_micros),
            "credit_micros": settings.starter_credit_micros,
        },
        "message": "Store this key now: it is shown only once.",
    }


@router.get("/v1/key")
async def current_key(request: Request, key: KeyRecord = Depends(_account_key)) -> dict[str, Any]:
    settings = request.app.state.ctx.settings
    remaining = key.limit_remaining_micros
    return {"data": {
        "label": key.label,
        "key_prefix": key.prefix,
        "limit": _usd(key.limit_micros),
        "limit_micros": key.limit_micros,
        "usage": _usd(key.usage_micros),
        "usage_micros": key.usage_micros,
        "limit_remaining": _usd(remaining),
        "limit_remaining_micros": remaining,
        "is_free_tier": False,
        "rate_limit": {"requests": settings.rate_limit_rpm, "tokens": settings.rate_limit_tpm, "interval": "60s"},
    }}


@router.get("/v1/credits")
async def credits(request: Request, key: KeyRecord = Depends(_account_key)) -> dict[str, Any]:
    acct = await anyio.to_thread.run_sync(request.app.state.ctx.store.get_account, key.account_id)
    return {"data": {
        "total_credits": _usd(acct.credits_micros),
        "total_usage": _usd(acct.usage_micros),
        "total_credits_micros": acct.credits_micros,
        "total_usage_micros": acct.usage_micros,
        "reserved_micros": acct.reserved_micros,
    }}


def _generation_body(g: GenerationRecord) -> dict[str, Any]:
    return {"data": {
        "id": g.id,
        "model": g.model,
        "created_at": g.created_at.isoformat() + "Z",
        "tokens_prompt": g.prompt_tokens,
        "tokens_completion": g.completion_tokens,
        "native_tokens_prompt": g.prompt_tokens,
        "native_tokens_completion": g.completion_tokens,
        "total_cost": _usd(g.cost_micros),
        "total_cost_micros": g.cost_micros,
        "latency": g.latency_s,
        "finish_reason": g.finish_reason,
        "streamed": g.streamed,
        "cancelled": g.cancelled,
        "failed": g.failed,
    }}


@router.get("/v1/generation")
async def generation(request: Request, id: str = Query(..., min_length=1, max_length=64)) -> dict[str, Any]:
    ctx = request.app.state.ctx
    # With auth off and no key, only generations made without a key are visible.
    key = None
    if ctx.settings.auth or bearer_token(request) is not None:
        key = await _account_key(request)
    g = await anyio.to_thread.run_sync(ctx.store.get_generation, id)
    owner = key.account_id if key is not None else None
    if g is None or g.account_id != owner:
        # Same answer for "absent" and "someone else's": ids are not an oracle.
        raise not_found(f"Generation {id!r} not found.", param="id")
    return _generation_body(g)
