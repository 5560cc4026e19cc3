"""Limits: with every engine slot busy and the queue filled past its cap, oversized prompts,
max_tokens beyond the context, oversized bodies and queue overflow are refused with 400/413/429
at once, and /health keeps answering.

Run it against a server with a small engine (`--max-num-seqs 2 --max-queue 4`) so "full" is
reached with a few requests.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from stress.common import Server, auth, error_problem, percentile

QUICK_S = 2.0  # a refusal slower than this under full load counts as a failure (stress script only)


async def run_limits(server: Server, key: str | None, *, max_num_seqs: int, max_queue: int, extra: int = 16,
                     probes: int = 20) -> dict:
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    h = auth(key)
    fill = max_num_seqs + max_queue + extra
    long_body = {"model": model, "prompt": "Full", "max_tokens": 900, "ignore_eos": True}
    problems: list[str] = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=fill + 16)) as http:
        # fill the slots and the queue one request at a time: each is either refused or seen by the
        # engine (running + waiting in /health) before the next is sent, so the cap is tested against
        # requests already queued, not only against a burst still in flight
        tasks = []
        for i in range(fill):
            t = asyncio.ensure_future(http.post(server.url + "/v1/completions", json=long_body | {"seed": i},
                                                headers=h))
            tasks.append(t)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not t.done():
                hl = (await http.get(server.url + "/health")).json()
                admitted = sum(1 for x in tasks if not x.done())
                if hl.get("running", 0) + hl.get("waiting", 0) >= admitted:
                    break
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        refused = [t.result() for t in tasks if t.done() and not t.exception()]
        overloaded = [r for r in refused if r.status_code == 429]
        health_full = (await http.get(server.url + "/health")).json()
        for r in overloaded:
            p = error_problem(r)
            if p:
                problems.append(f"429: {p}")
            if "retry-after" not in r.headers:
                problems.append("429 without Retry-After")
        if len(overloaded) < extra:
            problems.append(f"queue cap: {fill} long requests for {max_num_seqs} slots + a queue of {max_queue}; "
                            f"{len(overloaded)} got 429 (expected >= {extra}); /health says {health_full}")

        checks = [
            ("oversized prompt (3,000 tokens)", {"model": model, "prompt": [11] * 3000, "max_tokens": 1}, 400,
             "max_tokens"),
            ("max_tokens beyond the context", {"model": model, "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
            ("prompt + max_tokens = 1,025", {"model": model, "prompt": [11] * 25, "max_tokens": 1000}, 400,
             "max_tokens"),
            ("3 MB body", {"model": model, "prompt": "a" * (3 * 2**20)}, 413, None),
        ]
        refusals = []
        for name, body, status, param in checks:
            t0 = time.monotonic()
            r = await http.post(server.url + "/v1/completions", json=body, headers=h)
            dt = time.monotonic() - t0
            refusals.append({"case": name, "status": r.status_code, "seconds": round(dt, 4)})
            if r.status_code != status:
                problems.append(f"{name}: {r.status_code}, expected {status}: {r.text[:150]}")
            else:
                p = error_problem(r, param)
                if p:
                    problems.append(f"{name}: {p}")
            if dt > QUICK_S:
                problems.append(f"{name}: refused after {dt:.2f}s under full load")
        chat = {"model": model, "messages": [{"role": "user", "content": " the" * 2000}]}
        t0 = time.monotonic()
        r = await http.post(server.url + "/v1/chat/completions", json=chat, headers=h)
        refusals.append({"case": "chat message of 2,000 tokens", "status": r.status_code,
                         "seconds": round(time.monotonic() - t0, 4)})
        if r.status_code != 400 or error_problem(r, "messages"):
            problems.append(f"2,000-token chat message: {r.status_code} {r.text[:150]}")

        lat, bad = [], 0
        for _ in range(probes):
            t0 = time.monotonic()
            r = await http.get(server.url + "/health")
            lat.append(time.monotonic() - t0)
            bad += r.status_code != 200
            await asyncio.sleep(0.05)
        if bad:
            problems.append(f"{bad} of {probes} /health probes under full load were not 200")
        if max(lat) > QUICK_S:
            problems.append(f"/health took {max(lat):.2f}s under full load")

        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    idle = server.wait_idle(60)
    if idle.get("running") or idle.get("waiting"):
        problems.append(f"not idle after the limits phase: {idle}")
    if not server.alive():
        problems.append("the server died")
    return {"max_num_seqs": max_num_seqs, "max_queue": max_queue, "requests_to_fill": fill,
            "overloaded_429": len(overloaded), "health_when_full": health_full, "refusals": refusals,
            "health_probes_under_load": probes, "health_not_200": bad,
            "health_latency_s": {"p50": round(percentile(lat, 50), 4), "max": round(max(lat), 4)},
            "failures": problems}


def limits(server: Server, key: str | None, **kw) -> dict:
    return asyncio.run(run_limits(server, key, **kw))
