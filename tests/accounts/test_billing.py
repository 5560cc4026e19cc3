"""Billing facade: what is charged, 402 and 429 as OpenAI errors; the sliding-window limiter."""

from __future__ import annotations

import pytest

from gpt2serve.accounts.billing import Billing
from gpt2serve.accounts.pricing import Pricing, micros_from_usd, usd
from gpt2serve.accounts.ratelimit import RateLimitExceeded, SlidingWindowLimiter
from gpt2serve.api.errors import APIError

from .helpers import new_key

DONE = dict(finish_reason="stop", streamed=False, cancelled=False, failed=False, latency_s=0.1)


def test_pricing_shape_and_exact_money():
    p = Pricing(prompt_micros_per_token=1, completion_micros_per_token=2)
    assert p.cost(1000, 500) == 2000
    shape = p.openrouter()
    assert shape["prompt"] == "0.000001" and shape["completion"] == "0.000002" and shape["request"] == "0"
    assert usd(0) == "0" and usd(2_500_000) == "2.5" and usd(123) == "0.000123"
    assert micros_from_usd("$1.000001") == 1_000_001 and micros_from_usd("5") == 5_000_000
    with pytest.raises(ValueError):
        micros_from_usd("0.0000001")
    with pytest.raises(ValueError):
        Pricing(1.5, 2)  # floats are refused: costs must be exact


async def test_reserve_settle_charges_real_tokens(store):
    _, key = new_key(store, 1_000_000)
    billing = Billing(store, Pricing(1, 2), rpm=0, tpm=0)
    res = await billing.reserve(key, prompt_tokens=100, max_completion_tokens=200, model="gpt2", generation_id="b1")
    assert res.amount_micros == 100 + 400
    assert store.get_account(key.account_id).reserved_micros == 500
    cost = await billing.settle(res, prompt_tokens=100, completion_tokens=50, **DONE)
    assert cost == billing.cost(100, 50) == 200
    assert await billing.settle(res, prompt_tokens=100, completion_tokens=50, **DONE) == 200  # idempotent
    acct = store.get_account(key.account_id)
    assert (acct.usage_micros, acct.reserved_micros) == (200, 0)


@pytest.mark.parametrize("completion_tokens,failed,cancelled,expected", [
    (0, False, False, 0),  # empty completion: free
    (30, True, False, 0),  # failed: free, whatever was generated
    (7, False, True, 10 + 14),  # cancelled stream: prompt + tokens generated before the cancel
])
async def test_what_is_charged(store, completion_tokens, failed, cancelled, expected):
    _, key = new_key(store, 1_000_000)
    billing = Billing(store, Pricing(1, 2), rpm=0, tpm=0)
    res = await billing.reserve(key, prompt_tokens=10, max_completion_tokens=100, model="gpt2", generation_id="w")
    cost = await billing.settle(res, prompt_tokens=10, completion_tokens=completion_tokens, finish_reason=None,
                                streamed=True, cancelled=cancelled, failed=failed, latency_s=0.5)
    assert cost == expected
    g = store.get_generation("w")
    assert (g.cost_micros, g.cancelled, g.failed, g.streamed) == (expected, cancelled, failed, True)
    assert store.get_account(key.account_id).usage_micros == expected


async def test_out_of_credit_is_402_with_a_clear_message(store):
    _, key = new_key(store, 150)
    billing = Billing(store, Pricing(1, 2), rpm=0, tpm=0)
    with pytest.raises(APIError) as e:
        await billing.reserve(key, prompt_tokens=10, max_completion_tokens=100, model="gpt2", generation_id="x")
    err = e.value
    assert err.status_code == 402 and err.body()["error"]["code"] == "insufficient_quota"
    assert "$0.00021" in err.message and "$0.00015" in err.message and "max_tokens" in err.message


async def test_rate_limits_are_429_with_headers(store):
    _, key = new_key(store, 1_000_000)
    billing = Billing(store, Pricing(1, 2), rpm=2, tpm=1_000)
    first = await billing.reserve(key, prompt_tokens=10, max_completion_tokens=10, model="gpt2", generation_id="r1")
    assert first.headers["X-RateLimit-Limit-Requests"] == "2"
    assert first.headers["X-RateLimit-Remaining-Requests"] == "1"
    assert first.headers["X-RateLimit-Remaining-Tokens"] == str(1_000 - 20)
    await billing.reserve(key, prompt_tokens=10, max_completion_tokens=10, model="gpt2", generation_id="r2")
    with pytest.raises(APIError) as e:
        await billing.reserve(key, prompt_tokens=10, max_completion_tokens=10, model="gpt2", generation_id="r3")
    err = e.value
    assert err.status_code == 429 and err.type == "rate_limit_exceeded"
    assert 1 <= int(err.headers["Retry-After"]) <= 60
    assert err.headers["X-RateLimit-Remaining-Requests"] == "0"
    assert store.get_generation("r3") is None and store.get_account(key.account_id).reserved_micros == 2 * 30


def test_sliding_window_requests_and_tokens():
    now = [0.0]
    lim = SlidingWindowLimiter(rpm=3, tpm=100, clock=lambda: now[0])
    g1, _ = lim.acquire("k", 60)
    now[0] = 10
    with pytest.raises(RateLimitExceeded) as e:  # 60 + 50 > 100
        lim.acquire("k", 50)
    assert e.value.retry_after_s == pytest.approx(50)  # when g1 leaves the window
    lim.adjust(g1, 20)  # g1 really used 20 tokens
    g2, h = lim.acquire("k", 50)
    assert h["X-RateLimit-Remaining-Tokens"] == "30" and h["X-RateLimit-Remaining-Requests"] == "1"
    lim.acquire("k", 1)
    with pytest.raises(RateLimitExceeded) as e:  # 3 requests in the last minute
        lim.acquire("k", 1)
    assert e.value.retry_after_s == pytest.approx(50)
    lim.acquire("other", 100)  # per key
    now[0] = 60.5  # g1 left the window
    lim.acquire("k", 1)
    with pytest.raises(RateLimitExceeded) as e:
        lim.acquire("k", 101)  # can never fit
    assert "Lower max_tokens" in e.value.message
    lim.cancel(g2)
    assert lim.acquire("k", 40)[1]["X-RateLimit-Remaining-Tokens"] == "58"  # 100 - (1 + 1 + 40)
