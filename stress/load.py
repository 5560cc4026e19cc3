"""Load: N concurrent streaming clients for a fixed time, with /health probed throughout and the
server's resident memory, threads and open file descriptors sampled from /proc.

A request fails if it is not a 200, has an error event, or ends without `data: [DONE]`.
Memory growth compares the median RSS of the second quarter of the run (after warm-up) with the
median of the last quarter; threads and fds compare the maxima of the same two windows.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx

from stress.common import Server, auth, median, percentile, stream_completion

PROMPTS = [
    "Once upon a time", "The capital of France is", "def fibonacci(n):", "In the beginning",
    "A quick brown fox", "Breaking news:", "Dear diary, today", "The meaning of life is",
]

# Tolerances for "no growth" in the two windows compared: connection churn moves the fd count by a
# few (a client's socket closes and reopens between samples) and anyio's worker threads come and go.
FD_SLACK = 8
THREAD_SLACK = 2


async def run_load(server: Server, key: str | None, *, clients: int = 64, duration: float = 600.0,
                   max_tokens: tuple[int, int] = (16, 64), health_interval: float = 0.5,
                   sample_interval: float = 1.0, seed: int = 0) -> dict:
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    headers = auth(key)
    t_start = time.monotonic()
    t_end = t_start + duration
    results: list[dict] = []
    failures: list[str] = []
    health: list[tuple[float, int | None]] = []  # (latency s, status)
    samples: list[tuple[float, int, int, int]] = []  # (t, rss_kb, threads, fds)
    idle_before = server.proc_stats()

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 100_000 + i)
        while time.monotonic() < t_end:
            body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(*max_tokens),
                    "temperature": 1.0, "ignore_eos": True, "stream": True, "seed": rng.randrange(2**31),
                    "stream_options": {"include_usage": True}}
            try:
                r = await stream_completion(http, server.url, body, headers)
            except Exception as e:  # a transport error is a failed request
                failures.append(f"client {i}: {type(e).__name__}: {e}")
                results.append({"ok": False})
                continue
            ok = r.status == 200 and r.done and r.error is None and r.usage is not None \
                and r.usage.get("completion_tokens") == body["max_tokens"]
            if not ok:
                failures.append(f"client {i}: status {r.status} done={r.done} error={r.error} usage={r.usage}")
            results.append({"ok": ok, "ttft": r.ttft, "tokens": (r.usage or {}).get("completion_tokens", 0),
                            "t": time.monotonic() - t_start})

    async def prober() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while time.monotonic() < t_end:
                t0 = time.monotonic()
                try:
                    status = (await http.get(server.url + "/health")).status_code
                except httpx.HTTPError:
                    status = None
                health.append((time.monotonic() - t0, status))
                await asyncio.sleep(health_interval)

    async def sampler() -> None:
        while time.monotonic() < t_end:
            s = server.proc_stats()
            samples.append((time.monotonic() - t_start, s.rss_kb, s.threads, s.fds))
            await asyncio.sleep(sample_interval)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await asyncio.gather(prober(), sampler(), *(client(i, http) for i in range(clients)))
    wall = time.monotonic() - t_start
    server.wait_idle(60)
    idle_after = server.proc_stats()

    ok = [r for r in results if r["ok"]]
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    q = duration / 4
    warm = [s for s in samples if q <= s[0] < 2 * q] or samples[: max(1, len(samples) // 2)]
    last = [s for s in samples if s[0] >= 3 * q] or samples[-max(1, len(samples) // 4):]
    rss_warm, rss_end = median([s[1] for s in warm]), median([s[1] for s in last])
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else None
    threads_warm, threads_end = max(s[2] for s in warm), max(s[2] for s in last)
    fds_warm, fds_end = max(s[3] for s in warm), max(s[3] for s in last)
    h_lat = [h[0] for h in health]
    h_bad = [h for h in health if h[1] != 200]
    problems = list(failures[:20])
    if growth is not None and growth >= 0.05:
        problems.append(f"resident memory grew {growth:.1%} after warm-up ({rss_warm} -> {rss_end} kB)")
    if fds_end > fds_warm + FD_SLACK:
        problems.append(f"open fds grew: max {fds_warm} after warm-up, {fds_end} at the end")
    if threads_end > threads_warm + THREAD_SLACK:
        problems.append(f"threads grew: max {threads_warm} after warm-up, {threads_end} at the end")
    if h_bad:
        problems.append(f"{len(h_bad)} /health probes were not 200: {h_bad[:5]}")
    if not server.alive():
        problems.append("the server died")
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "duration_s": round(wall, 1), "requests": len(results), "failed": len(results) - len(ok),
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
        "ttft_s": {"p50": _r(percentile(ttfts, 50)), "p90": _r(percentile(ttfts, 90)),
                   "p99": _r(percentile(ttfts, 99)), "max": _r(max(ttfts, default=None))},
        "health_probes": len(health), "health_not_200": len(h_bad),
        "health_latency_s": {"p50": _r(percentile(h_lat, 50)), "p99": _r(percentile(h_lat, 99)),
                             "max": _r(max(h_lat, default=None))},
        "rss_kb": {"idle_before": idle_before.rss_kb, "after_warmup": rss_warm, "end": rss_end,
                   "idle_after": idle_after.rss_kb},
        "rss_growth_after_warmup": None if growth is None else round(growth, 4),
        "threads": {"idle_before": idle_before.threads, "after_warmup_max": threads_warm, "end_max": threads_end,
                    "idle_after": idle_after.threads},
        "fds": {"idle_before": idle_before.fds, "after_warmup_max": fds_warm, "end_max": fds_end,
                "idle_after": idle_after.fds},
        "samples": len(samples), "failures": problems,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def load(server: Server, key: str | None, **kw) -> dict:
    return asyncio.run(run_load(server, key, **kw))
