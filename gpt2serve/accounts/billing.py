"""The billing facade the HTTP serving layer calls around every completion.

    billing = Billing(store, Pricing(1, 2), rpm=600, tpm=1_000_000)

    key = await require_key(request)                      # api/auth.py; None with --no-auth
    res = await billing.reserve(key, prompt_tokens=len(ids), max_completion_tokens=max_tokens,
                                model=model_name, generation_id=gen_id)   # 402 / 429 as APIError
    response.headers.update(res.headers)                  # X-RateLimit-*
    try:
        ... generate ...
    finally:   # always, also when the stream is cancelled or the engine fails
        cost = await billing.settle(res, prompt_tokens=..., completion_tokens=n_generated,
                                    finish_reason=..., streamed=..., cancelled=..., failed=...,
                                    latency_s=...)
        # usage.cost = cost / 1e6 (USD)

What is charged: reserve() holds the worst case, cost(prompt, max_completion_tokens), before any
work; settle() charges cost(prompt, completion tokens actually generated) and releases the rest, in
one database transaction. A failed request, or one that generated no tokens, costs nothing; a
cancelled stream pays for the prompt and the tokens generated before it stopped. settle() is
idempotent (a second call charges nothing more). The database work runs in a worker thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import anyio.to_thread

from gpt2serve.accounts.pricing import Pricing, usd
from gpt2serve.accounts.ratelimit import Grant, RateLimitExceeded, SlidingWindowLimiter
from gpt2serve.accounts.store import AccountStore, InsufficientCredit, KeyRecord, KeyRevoked
from gpt2serve.api.errors import APIError, payment_required, rate_limited, unauthorized

log = logging.getLogger(__name__)


@dataclass
class Reservation:
    """What reserve() holds for one generation; hand it back to settle()."""

    generation_id: str
    key: KeyRecord | None  # None: auth is off, nothing is charged (a usage record is still written)
    model: str
    prompt_tokens: int
    max_completion_tokens: int
    amount_micros: int  # worst-case cost held on the account
    headers: dict[str, str] = field(default_factory=dict)  # X-RateLimit-* to add to the response
    started: float = field(default_factory=time.monotonic)
    grant: Grant | None = None
    cost_micros: int | None = None  # set by settle()


class Billing:
    def __init__(self, store: AccountStore, pricing: Pricing, rpm: int, tpm: int):
        """rpm / tpm: per-key requests and tokens per minute (<= 0: unlimited)."""
        self.store = store
        self.pricing = pricing
        self.limiter = SlidingWindowLimiter(rpm, tpm)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Micro-USD for this many tokens at the configured prices (an exact int)."""
        return self.pricing.cost(prompt_tokens, completion_tokens)

    async def reserve(self, key: KeyRecord | None, *, prompt_tokens: int, max_completion_tokens: int, model: str,
                      generation_id: str) -> Reservation:
        """Admit a request: check the key's rate limits, then hold its worst-case cost.

        Raises APIError 429 (rate_limit_exceeded, with Retry-After and X-RateLimit-* headers),
        402 (insufficient_quota: the account's credit or the key's spending limit can't cover
        prompt + max_tokens), 401 (the key was revoked since it was authenticated)."""
        worst = self.cost(prompt_tokens, max_completion_tokens)
        res = Reservation(generation_id, key, model, prompt_tokens, max_completion_tokens, worst)
        if key is None:
            res.amount_micros = 0
            return res
        try:
            res.grant, res.headers = self.limiter.acquire(key.key_id, prompt_tokens + max_completion_tokens)
        except RateLimitExceeded as e:
            raise rate_limited(e.message, e.retry_after_s, e.headers) from None
        try:
            await anyio.to_thread.run_sync(lambda: self.store.reserve(
                key_id=key.key_id, generation_id=generation_id, amount_micros=worst, model=model))
        except InsufficientCredit as e:
            self.limiter.cancel(res.grant)  # a refused request does not count against the rate limit
            raise self._payment_error(e, prompt_tokens, max_completion_tokens) from None
        except KeyRevoked:
            self.limiter.cancel(res.grant)
            raise unauthorized("This API key has been revoked.") from None
        except BaseException:
            self.limiter.cancel(res.grant)
            raise
        return res

    def _payment_error(self, e: InsufficientCredit, prompt_tokens: int, max_completion_tokens: int) -> APIError:
        what = "this key's spending limit" if e.scope == "key" else "your credit"
        return payment_required(
            f"Insufficient credit: this request may cost up to ${usd(e.needed_micros)} "
            f"({prompt_tokens} prompt tokens + max_tokens {max_completion_tokens}), but {what} has "
            f"${usd(max(0, e.available_micros))} left. Lower max_tokens or add credit."
        )

    async def settle(self, reservation: Reservation, *, prompt_tokens: int, completion_tokens: int,
                     finish_reason: str | None, streamed: bool, cancelled: bool, failed: bool,
                     latency_s: float) -> int:
        """Charge what the generation really cost, release the rest, write the usage record.

        Returns the cost in micro-USD (0 for a failed or empty completion). Call it exactly once
        per successful reserve(), in a `finally`; calling it again returns the same cost."""
        if reservation.cost_micros is not None:
            return reservation.cost_micros
        billable = not failed and completion_tokens > 0
        cost = self.cost(prompt_tokens, completion_tokens) if billable else 0
        if reservation.grant is not None:
            self.limiter.adjust(reservation.grant, prompt_tokens + completion_tokens)
        kwargs = dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, finish_reason=finish_reason,
                      streamed=streamed, cancelled=cancelled, failed=failed, latency_s=latency_s)
        if reservation.key is None:
            await anyio.to_thread.run_sync(lambda: self.store.record_generation(
                reservation.generation_id, model=reservation.model, cost_micros=cost, **kwargs))
            charged = cost  # reported in usage.cost, charged to no one
        else:
            # Shielded: a client disconnect cancels the request's task, but the ledger must still
            # settle (otherwise the hold stays until the next restart).
            with anyio.CancelScope(shield=True):
                charged = await anyio.to_thread.run_sync(lambda: self.store.settle(
                    reservation.generation_id, cost, **kwargs))
        reservation.cost_micros = charged
        return charged
