"""auth.py and account_routes.py through a FastAPI app: OpenAI error shapes, sign-up, /v1/key,
/v1/credits, /v1/generation, 50 concurrent requests, and the official `openai` client's exceptions."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from .fake_app import build_app
from .helpers import new_key


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(r: httpx.Response, status: int, type_: str, code: str | None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"]) == (type_, code) and err["message"]
    return err


async def test_signup_then_key_credits_generation(store, caplog):
    caplog.set_level(logging.DEBUG)
    app = build_app(store, starter_credit_micros=2_000_000, signup_rate_per_hour=2, rate_limit_rpm=100,
                    rate_limit_tpm=10_000)
    async with client(app) as c:
        r = await c.post("/v1/signup", json={"label": "laptop"})
        assert r.status_code == 200, r.text
        key = r.json()["key"]
        assert key.startswith("sk-") and r.json()["data"]["credit"] == 2.0
        assert r.json()["data"]["key_prefix"] == key[:11]

        r = await c.post("/v1/completions", json={"prompt": "a b c d", "max_tokens": 10, "generate": 6},
                         headers=bearer(key))
        assert r.status_code == 200, r.text
        gid = r.headers["X-Generation-Id"]
        assert r.json()["usage"]["cost"] == pytest.approx((4 * 1 + 6 * 2) / 1e6)
        assert r.headers["X-RateLimit-Remaining-Requests"] == "99"

        r = await c.get("/v1/key", headers=bearer(key))
        data = r.json()["data"]
        assert (data["label"], data["limit"], data["usage_micros"]) == ("laptop", None, 16)
        assert data["rate_limit"]["requests"] == 100

        r = await c.get("/v1/credits", headers=bearer(key))
        assert r.json()["data"] == {"total_credits": 2.0, "total_usage": 0.000016, "total_credits_micros": 2_000_000,
                                    "total_usage_micros": 16, "reserved_micros": 0}

        r = await c.get("/v1/generation", params={"id": gid}, headers=bearer(key))
        g = r.json()["data"]
        assert (g["id"], g["tokens_prompt"], g["tokens_completion"], g["total_cost_micros"]) == (gid, 4, 6, 16)
        assert g["finish_reason"] == "length" and g["streamed"] is False and g["latency"] >= 0

        # Another account can't see it, and can't tell it exists.
        r2 = await c.post("/v1/signup", json={})
        other = r2.json()["key"]
        r = await c.get("/v1/generation", params={"id": gid}, headers=bearer(other))
        assert_openai_error(r, 404, "not_found_error", None)
        r = await c.get("/v1/generation", params={"id": "gen-nope"}, headers=bearer(other))
        assert_openai_error(r, 404, "not_found_error", None)

        # Third sign-up from the same address within the hour: 429 with Retry-After.
        r = await c.post("/v1/signup")
        assert_openai_error(r, 429, "rate_limit_exceeded", "rate_limit_exceeded")
        assert int(r.headers["Retry-After"]) > 3500
    for secret in (key[11:], other[11:]):  # nothing logged the keys
        assert secret not in caplog.text


async def test_signup_can_be_switched_off(store):
    async with client(build_app(store, signup_enabled=False)) as c:
        r = await c.post("/v1/signup")
    assert_openai_error(r, 403, "permission_error", "signup_disabled")


async def test_401_402_429_bodies(store):
    key, rec = new_key(store, 100)
    revoked, _ = new_key(store, 1_000_000)
    store.revoke_key(revoked[:11])
    broke, _ = new_key(store, 0)
    app = build_app(store, rate_limit_rpm=2)
    async with client(app) as c:
        body = {"prompt": "one two", "max_tokens": 1}
        r = await c.post("/v1/completions", json=body)
        assert "didn't provide an API key" in assert_openai_error(r, 401, "authentication_error", "invalid_api_key")["message"]
        assert r.headers["WWW-Authenticate"] == "Bearer"
        r = await c.post("/v1/completions", json=body, headers={"Authorization": "Basic abc"})
        assert_openai_error(r, 401, "authentication_error", "invalid_api_key")
        r = await c.post("/v1/completions", json=body, headers=bearer("sk-" + "0" * 48))
        assert_openai_error(r, 401, "authentication_error", "invalid_api_key")
        r = await c.post("/v1/completions", json=body, headers=bearer(revoked))
        assert "revoked" in assert_openai_error(r, 401, "authentication_error", "invalid_api_key")["message"]
        assert revoked not in r.text

        r = await c.post("/v1/completions", json=body, headers=bearer(broke))  # nothing left at all
        assert "out of credit" in assert_openai_error(r, 402, "insufficient_quota", "insufficient_quota")["message"]
        r = await c.get("/v1/credits", headers=bearer(broke))  # but it can still look at its balance
        assert r.status_code == 200 and r.json()["data"]["total_credits"] == 0
        r = await c.post("/v1/completions", json={"prompt": "one two", "max_tokens": 100}, headers=bearer(key))
        assert "Lower max_tokens" in assert_openai_error(r, 402, "insufficient_quota", "insufficient_quota")["message"]

        for _ in range(2):
            assert (await c.post("/v1/completions", json=body, headers=bearer(key))).status_code == 200
        r = await c.post("/v1/completions", json=body, headers=bearer(key))
        assert_openai_error(r, 429, "rate_limit_exceeded", "rate_limit_exceeded")
        assert int(r.headers["Retry-After"]) >= 1
        assert r.headers["X-RateLimit-Limit-Requests"] == "2" and r.headers["X-RateLimit-Remaining-Requests"] == "0"


async def test_no_auth_serves_without_keys(store):
    async with client(build_app(store, auth=False)) as c:
        r = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["cost"] == pytest.approx(7e-6)
        gid = r.headers["X-Generation-Id"]
        r = await c.get("/v1/generation", params={"id": gid})
        assert r.status_code == 200 and r.json()["data"]["tokens_completion"] == 3
        r = await c.get("/v1/key")  # account routes still need a key
        assert_openai_error(r, 401, "authentication_error", "invalid_api_key")


async def test_50_concurrent_requests_balance_covers_10(store):
    prompt, max_tokens = "w " * 20, 40  # worst case 20 + 80 = 100 micro-USD
    key, rec = new_key(store, 10 * 100)
    gate = asyncio.Event()
    app = build_app(store, gate=gate)
    async with client(app) as c:
        tasks = [asyncio.create_task(c.post("/v1/completions", headers=bearer(key),
                                            json={"prompt": prompt, "max_tokens": max_tokens, "generate": 5 + i % 30}))
                 for i in range(50)]
        # Hold the admitted ones until every request has been admitted or refused.
        while sum(t.done() for t in tasks) < 40 or store.get_account(rec.account_id).reserved_micros < 1000:
            await asyncio.sleep(0.02)
        gate.set()
        responses = await asyncio.gather(*tasks)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 402]
    assert len(ok) == 10 and len(refused) == 40
    costs = sum(store.get_generation(r.headers["X-Generation-Id"]).cost_micros for r in ok)
    assert costs == sum(20 + 2 * r.json()["usage"]["completion_tokens"] for r in ok)
    acct = store.get_account(rec.account_id)
    assert acct.credits_micros - acct.usage_micros == 1000 - costs and acct.reserved_micros == 0


@pytest.fixture
def live_server(store):
    """The fake app under a real uvicorn on 127.0.0.1, in a thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(store, rate_limit_rpm=1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def test_openai_client_raises_matching_exceptions(store, live_server):
    key, _ = new_key(store, 1_000)
    broke, _ = new_key(store, 0)

    clients: list[openai.OpenAI] = []

    def make(api_key: str) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=live_server, api_key=api_key, max_retries=0))
        return clients[-1]

    try:
        with pytest.raises(openai.AuthenticationError) as e:
            make("sk-" + "1" * 48).completions.create(model="gpt2", prompt="hi", max_tokens=2)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"

        with pytest.raises(openai.APIStatusError) as e:
            make(broke).completions.create(model="gpt2", prompt="hi", max_tokens=2)
        assert e.value.status_code == 402 and e.value.code == "insufficient_quota"

        ok = make(key).completions.create(model="gpt2", prompt="hi there", max_tokens=3)
        assert ok.usage.completion_tokens == 3 and ok.usage.model_extra["cost"] == pytest.approx(8e-6)
        with pytest.raises(openai.RateLimitError) as e:  # rpm=1
            make(key).completions.create(model="gpt2", prompt="hi", max_tokens=2)
        assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
    finally:
        for c in clients:
            c.close()
