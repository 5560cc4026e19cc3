"""With auth on: keys are required, every completion is reserved and settled, usage.cost is the
charge and X-Generation-Id finds the usage record."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from gpt2serve.api.app import create_app

from .conftest import LiveServer, make_settings


@pytest.fixture(scope="module")
def auth_server(tiny_model_dir, tmp_path_factory):
    st = make_settings(tmp_path_factory.mktemp("auth"), tiny_model_dir, auth=True)
    with LiveServer(create_app(st)) as s:
        yield s


def test_key_required(auth_server):
    c = OpenAI(base_url=auth_server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.completions.create(model=auth_server.ctx.model_name, prompt="x", max_tokens=1)
    r = httpx.post(auth_server.url + "/v1/completions", json={"model": auth_server.ctx.model_name, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_completion_is_billed(auth_server):
    store = auth_server.ctx.store
    account = store.create_account(credit_micros=1_000_000)
    key, _ = store.create_key(account)
    c = OpenAI(base_url=auth_server.url + "/v1", api_key=key, max_retries=0)
    raw = c.completions.with_raw_response.create(model=auth_server.ctx.model_name, prompt="Hello there", max_tokens=5,
                                                 temperature=0, extra_body={"ignore_eos": True})
    r = raw.parse()
    cost_micros = r.usage.prompt_tokens * 1 + r.usage.completion_tokens * 2
    assert r.usage.model_extra["cost"] == pytest.approx(cost_micros / 1e6)
    record = store.get_generation(raw.headers["x-generation-id"])
    assert record.cost_micros == cost_micros and record.completion_tokens == 5 and not record.streamed
    info = store.get_account(account)
    assert info.available_micros == 1_000_000 - cost_micros  # the hold for max_tokens was released
    # a stream is billed too, and its usage chunk reports the charge
    chunks = list(c.chat.completions.create(model=auth_server.ctx.model_name, messages=[{"role": "user", "content": "x"}],
                                            max_tokens=3, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    usage = chunks[-1].usage
    assert usage.model_extra["cost"] == pytest.approx((usage.prompt_tokens + 2 * usage.completion_tokens) / 1e6)
    assert store.get_generation(chunks[0].id).streamed


def test_insufficient_credit_is_402(auth_server):
    store = auth_server.ctx.store
    account = store.create_account(credit_micros=10)
    key, _ = store.create_key(account)
    r = httpx.post(auth_server.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": auth_server.ctx.model_name, "prompt": "x", "max_tokens": 100})
    assert r.status_code == 402 and r.json()["error"]["type"] == "insufficient_quota"
