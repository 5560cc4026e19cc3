"""A small FastAPI app wired the way the real one is: ctx (settings, store, billing), require_key,
the account router, an APIError handler, and a fake /v1/completions that bills like the real route
(tokens = whitespace words; the body may say how many tokens to "generate")."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from gpt2serve.accounts.billing import Billing
from gpt2serve.accounts.pricing import Pricing
from gpt2serve.accounts.store import AccountStore, KeyRecord
from gpt2serve.api.account_routes import router
from gpt2serve.api.auth import require_key
from gpt2serve.api.errors import APIError
from gpt2serve.api.settings import Settings


def build_app(store: AccountStore, gate: asyncio.Event | None = None, **settings) -> FastAPI:
    s = Settings(**{"rate_limit_rpm": 0, "rate_limit_tpm": 0, **settings})
    app = FastAPI()
    billing = Billing(store, Pricing(s.price_prompt_micros, s.price_completion_micros), s.rate_limit_rpm,
                      s.rate_limit_tpm)
    app.state.ctx = SimpleNamespace(settings=s, store=store, billing=billing)
    app.include_router(router)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.post("/v1/completions")
    async def completions(request: Request, key: KeyRecord | None = Depends(require_key)):
        body = await request.json()
        prompt_tokens = len(body["prompt"].split())
        max_tokens = int(body.get("max_tokens", 16))
        generated = int(body.get("generate", max_tokens))
        gid = "gen-" + uuid.uuid4().hex
        t0 = time.monotonic()
        res = await billing.reserve(key, prompt_tokens=prompt_tokens, max_completion_tokens=max_tokens,
                                    model="gpt2", generation_id=gid)
        if gate is not None:
            await gate.wait()
        cost = await billing.settle(res, prompt_tokens=prompt_tokens, completion_tokens=generated,
                                    finish_reason="length", streamed=False, cancelled=False, failed=False,
                                    latency_s=time.monotonic() - t0)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                 "total_tokens": prompt_tokens + generated, "cost": cost / 1e6}
        out = {"id": gid, "object": "text_completion", "created": int(time.time()), "model": "gpt2",
               "choices": [{"index": 0, "text": " x" * generated, "finish_reason": "length", "logprobs": None}],
               "usage": usage}
        return JSONResponse(out, headers={"X-Generation-Id": gid, **res.headers})

    return app
