"""Clients that go away, streaming or not, queued or running, leave nothing in the engine."""

from __future__ import annotations

import asyncio
import time

import httpx

from gpt2serve.api.app import create_app

from .conftest import LiveServer, make_settings


def wait_idle(ctx, timeout: float = 60.0) -> dict:
    """Engine stats once nothing runs or waits (the engine's loop publishes them each step)."""
    deadline = time.monotonic() + timeout
    stats = ctx.engine.stats()
    while time.monotonic() < deadline:
        stats = ctx.engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]:
            return stats
        time.sleep(0.05)
    return stats


def idle(stats: dict) -> bool:
    return stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def requests_metric(url: str, endpoint: str, outcome: str, want: float | None = None, timeout: float = 30.0) -> float:
    """The finished-requests counter (counted after billing settled); waits for `want` if given."""
    key = f'gpt2serve_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}}'
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics").text
        value = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))
        if want is None or value >= want or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_100_streaming_clients_disconnect(tiny_model_dir, tmp_path):
    # 16 slots for 100 clients: most start queued, and each leaves after its first chunk
    app = create_app(make_settings(tmp_path, tiny_model_dir, max_num_seqs=16, max_num_batched_tokens=512))
    with LiveServer(app) as s:
        body = {"model": s.ctx.model_name, "prompt": "Once upon a time", "max_tokens": 900, "temperature": 1.0,
                "ignore_eos": True, "stream": True}
        got_chunk, gen_ids = [], []

        async def one(client: httpx.AsyncClient, i: int) -> None:
            async with client.stream("POST", s.url + "/v1/completions", json=body | {"seed": i}) as r:
                assert r.status_code == 200
                gen_ids.append(r.headers["x-generation-id"])
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        got_chunk.append(i)
                        break  # leaving the block closes the connection mid-stream

        async def main() -> None:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                await asyncio.gather(*(one(client, i) for i in range(100)))

        asyncio.run(main())
        assert len(got_chunk) == 100
        stats = wait_idle(s.ctx)
        assert idle(stats), stats
        assert requests_metric(s.url, "completions", "cancelled", want=100) == 100
        # billing settled every one of them: a usage record each, marked streamed and cancelled
        records = [s.ctx.store.get_generation(g) for g in gen_ids]
        assert all(r is not None and r.cancelled and r.streamed for r in records), records[:3]
        assert all(0 < r.completion_tokens < 900 for r in records)


def test_non_streaming_client_disconnects(tiny_model_dir, tmp_path):
    app = create_app(make_settings(tmp_path, tiny_model_dir, max_num_seqs=4))
    with LiveServer(app) as s:
        body = {"model": s.ctx.model_name, "prompt": "Once upon a time", "max_tokens": 1000, "n": 4,
                "temperature": 1.0, "ignore_eos": True}

        async def main() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                # 4 slots, 4 sequences each: one request runs, two wait in the queue
                tasks = [asyncio.create_task(client.post(s.url + "/v1/completions", json=body | {"seed": i}))
                         for i in range(3)]
                for _ in range(3000):  # bounded: a wrong state fails below instead of hanging
                    if s.ctx.engine.stats()["running"] == 1 and s.ctx.engine.stats()["waiting"] == 2:
                        break
                    await asyncio.sleep(0.01)
                assert s.ctx.engine.stats()["waiting"] == 2, s.ctx.engine.stats()
                for t in tasks:
                    t.cancel()  # the client gives up: httpx closes the connections
                results = await asyncio.gather(*tasks, return_exceptions=True)
                assert all(isinstance(r, asyncio.CancelledError) for r in results), results

        asyncio.run(main())
        stats = wait_idle(s.ctx)
        assert idle(stats), stats
        assert requests_metric(s.url, "completions", "cancelled", want=3) == 3
        assert requests_metric(s.url, "completions", "ok") == 0


def test_stream_client_leaves_before_first_token(tiny_model_dir, tmp_path):
    """The client goes while the server still waits for the first output (before any byte of the
    response is sent): the request is still aborted, settled and counted."""
    from gpt2serve.api.app import default_engine

    from .test_streaming import SlowStart

    app = create_app(make_settings(tmp_path, tiny_model_dir, keepalive_seconds=30),
                     make_engine=lambda loaded, st: SlowStart(default_engine(loaded, st), 1.0))
    with LiveServer(app) as s:
        body = {"model": s.ctx.model_name, "prompt": "Hi", "max_tokens": 1000, "ignore_eos": True, "stream": True}

        async def main() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                task = asyncio.create_task(client.post(s.url + "/v1/completions", json=body))
                await asyncio.sleep(0.2)  # well inside the 1 s before the engine's first output
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        asyncio.run(main())
        assert requests_metric(s.url, "completions", "cancelled", want=1) == 1
        stats = wait_idle(s.ctx)
        assert idle(stats), stats
        assert requests_metric(s.url, "completions", "ok") == 0
