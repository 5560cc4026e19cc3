"""Bad input gets OpenAI's error shape, the right status, and names the parameter; never a 500."""

from __future__ import annotations

import httpx
import openai
import pytest

from gpt2serve.api.app import create_app

from .conftest import LiveServer, make_settings


def post(server, path: str, body=None, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30, **kw)


def check_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


COMPLETION_CASES = [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"logprobs": 6}, "logprobs"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "n": 1, "stream": True}, "best_of"),
    ({"suffix": "tail"}, "suffix"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"seed": 2**70}, "seed"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ({"stop_token_ids": [99999999]}, "stop_token_ids"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [50257]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [[1, 2], "mixed"]}, "prompt"),
    ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("extra,param", COMPLETION_CASES, ids=[repr(c[0])[:40] for c in COMPLETION_CASES])
def test_completion_param_errors(server, extra, param):
    body = {"model": server.ctx.model_name, "prompt": "hi", "max_tokens": 2} | extra
    err = check_error(post(server, "/v1/completions", body), 400, param)
    assert err["type"] == "invalid_request_error"


CHAT_CASES = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_completion_tokens": -2}, "max_completion_tokens"),
]


@pytest.mark.parametrize("extra,param", CHAT_CASES, ids=[repr(c[0])[:40] for c in CHAT_CASES])
def test_chat_param_errors(server, extra, param):
    body = {"model": server.ctx.model_name, "messages": [{"role": "user", "content": "hi"}]} | extra
    check_error(post(server, "/v1/chat/completions", body), 400, param)


def test_missing_fields_and_bad_json(server):
    err = check_error(post(server, "/v1/completions", {"prompt": "x"}), 400, "model")
    assert "model" in err["message"]
    check_error(post(server, "/v1/completions", {"model": server.ctx.model_name}), 400, "prompt")
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    check_error(r, 400, None)
    check_error(post(server, "/v1/completions", [1, 2, 3]), 400, None)
    r = httpx.post(server.url + "/v1/completions", content=b"", headers={"content-type": "application/json"})
    check_error(r, 400, None)


def test_context_length_exceeded(server):
    m = server.ctx.model_name
    err = check_error(post(server, "/v1/completions", {"model": m, "prompt": "hi there", "max_tokens": 1023}),
                      400, "max_tokens", "context_length_exceeded")
    assert "1024" in err["message"] and "1025" in err["message"]  # limit and requested total
    long_chat = [{"role": "user", "content": "word " * 1100}]
    check_error(post(server, "/v1/chat/completions", {"model": m, "messages": long_chat}), 400, "messages",
                "context_length_exceeded")


def test_unknown_model_route_method(server):
    err = check_error(post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model", "model_not_found")
    assert err["type"] == "not_found_error"
    check_error(httpx.get(server.url + "/v1/models/gpt-4"), 404, "model", "model_not_found")
    check_error(httpx.get(server.url + "/v1/nope"), 404, None)
    check_error(httpx.get(server.url + "/v1/completions"), 405, None)


def test_body_too_large(server):
    limit = server.ctx.settings.max_body_bytes
    big = b'{"prompt": "' + b"a" * (limit + 10) + b'"}'
    check_error(httpx.post(server.url + "/v1/completions", content=big, headers={"content-type": "application/json"}),
                413, None)

    def chunks():  # no Content-Length: the size is counted as the body streams in
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536

    check_error(httpx.post(server.url + "/v1/completions", content=chunks()), 413, None)


def test_openai_client_raises_typed_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.ctx.model_name, prompt="x", suffix="y")
    assert e.value.body["param"] == "suffix"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def test_overloaded_is_429_with_retry_after(tiny_model_dir, tmp_path):
    """max_queue=0: every request finds the queue full."""
    app = create_app(make_settings(tmp_path, tiny_model_dir, max_queue=0))
    with LiveServer(app) as s:
        body = {"model": s.ctx.model_name, "prompt": "hi", "max_tokens": 2}
        for stream in (False, True):
            r = post(s, "/v1/completions", body | {"stream": stream})
            err = check_error(r, 429, None, "overloaded")
            assert err["type"] == "overloaded" and int(r.headers["retry-after"]) >= 1


def test_health_503_while_loading(tmp_path):
    import threading

    release = threading.Event()

    def slow_load(settings):
        release.wait(60)
        raise RuntimeError("no model here")

    app = create_app(make_settings(tmp_path, "unused"), load=slow_load)
    with LiveServer(app, wait_ready=False) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        err = check_error(post(s, "/v1/completions", {"model": "unused", "prompt": "x"}), 503, None, "model_loading")
        assert err["type"] == "service_unavailable"
        release.set()
        for _ in range(200):
            r = httpx.get(s.url + "/health")
            if r.json()["status"] != "loading":
                break
            threading.Event().wait(0.05)
        assert r.status_code == 503 and r.json()["status"] == "failed" and "no model here" in r.json()["error"]


def test_queue_limit_counts_requests_already_waiting(tiny_model_dir, tmp_path):
    """1 slot, max_queue=2: with one request running and two waiting, the next one gets 429."""
    import asyncio

    app = create_app(make_settings(tmp_path, tiny_model_dir, max_num_seqs=1, max_num_batched_tokens=64, max_queue=2))
    with LiveServer(app) as s:
        body = {"model": s.ctx.model_name, "prompt": "hi", "max_tokens": 1000, "ignore_eos": True}

        async def until(cond, what: str) -> None:
            for _ in range(3000):  # 30 s: a bound, so that a wrong state fails instead of hanging
                if cond(s.ctx.engine.stats()):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"engine never reached {what}: {s.ctx.engine.stats()}")

        async def main() -> int:
            async with httpx.AsyncClient(timeout=120) as c:
                # one at a time, so each is in the scheduler before the next arrives
                held = [asyncio.create_task(c.post(s.url + "/v1/completions", json=body))]
                await until(lambda st: st["running"] == 1, "1 running")
                for k in (1, 2):
                    held.append(asyncio.create_task(c.post(s.url + "/v1/completions", json=body)))
                    await until(lambda st: st["waiting"] == k, f"{k} waiting")
                r = await c.post(s.url + "/v1/completions", json=body | {"max_tokens": 1})
                for t in held:
                    t.cancel()
                await asyncio.gather(*held, return_exceptions=True)
                return r.status_code

        assert asyncio.run(main()) == 429
