"""The SSE wire format itself (what the SDKs parse): data lines, [DONE], keep-alive comments."""

from __future__ import annotations

import asyncio
import json

import httpx

from gpt2serve.api.app import create_app, default_engine

from .conftest import LiveServer, make_settings


def sse_lines(r: httpx.Response) -> list[str]:
    assert r.headers["content-type"].startswith("text/event-stream")
    body = r.text
    assert body.endswith("data: [DONE]\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") or e.startswith(": ") for e in events)
    return events


def test_completion_sse_format(server):
    body = {"model": server.ctx.model_name, "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True,
            "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    events = sse_lines(r)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    assert all(c["object"] == "text_completion" and c["id"] == r.headers["x-generation-id"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_sse_format(server):
    body = {"model": server.ctx.model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "stream": True, "n": 2, "stream_options": {"include_usage": True}, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    chunks = [json.loads(e[6:]) for e in sse_lines(r)[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(c["choices"][0]["index"] for c in finals) == [0, 1]
    assert all(c["choices"][0]["delta"] == {} for c in finals)  # the closing chunk carries no content
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


class SlowStart:
    """The real engine, but every request's first output comes `delay` seconds late."""

    def __init__(self, engine, delay: float):
        self.engine, self.delay = engine, delay

    async def generate(self, ids, params, request_id):
        await asyncio.sleep(self.delay)
        async for out in self.engine.generate(ids, params, request_id):
            yield out

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_keepalive_comments_while_waiting(tiny_model_dir, tmp_path):
    app = create_app(make_settings(tmp_path, tiny_model_dir, keepalive_seconds=0.1),
                     make_engine=lambda loaded, st: SlowStart(default_engine(loaded, st), 2.0))
    with LiveServer(app) as s:
        body = {"model": s.ctx.model_name, "prompt": "Hi", "max_tokens": 2, "stream": True}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        events = sse_lines(r)
        assert ": keep-alive" in events
        assert events.index(": keep-alive") < min(i for i, e in enumerate(events) if e.startswith("data: {"))
