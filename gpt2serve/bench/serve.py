"""Serve benchmark: a closed-loop load generator against a running server's streaming /v1/completions.

At each concurrency C, C clients each send `requests_per_client` requests back to back (prompts of
`prompt_len` random token ids, `max_tokens` new tokens, greedy, EOS ignored, include_usage).

Arrivals (`arrivals`):
- "staggered" (default): steady state at C streams. Before its measured requests each client sends
  one lead-in request of i/C * max_tokens tokens (client i of C), so the measured requests arrive
  spread over one request's duration, as a server with C users sees them, instead of in waves of C
  at once. Lead-ins are not measured; aggregate tok/s counts the tokens streamed while all C
  clients were busy (from the last lead-in's end to the first client's last end).
- "burst": all C clients start at once and everything is measured (tokens / wall time): the
  worst case for TTFT, since C prompts queue for the same steps.

Per request it records:
- TTFT: request sent -> first chunk with text;
- ITL: gaps between successive text chunks (a chunk may carry more than one token when the server
  holds back a partial UTF-8 character, so TPOT is reported too);
- TPOT: (last chunk - first chunk) / (completion tokens - 1);
- end-to-end latency; completion tokens from the usage chunk.
Aggregate tok/s is as `arrivals` says. Before the levels, an
idle-server TTFT baseline: sequential requests with max_tokens=1 on an otherwise idle server.

The client is aiohttp (as vLLM's benchmark_serving): on a 2-core machine the load generator shares
the cores with the server it measures, and httpx's line iterator cost ~0.16 cores at 32 streams
(~1,300 events/s), aiohttp's C parser about a third of that. The report carries the generator's
own CPU (client_cpu_cores) either way.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import aiohttp

from gpt2serve.bench.stats import peak_rss_bytes, rss_bytes, summarize


@dataclass
class ServeConfig:
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None  # None: the first id of GET /v1/models
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    requests_per_client: int = 2
    prompt_len: int = 32
    max_tokens: int = 128
    idle_requests: int = 5
    warmup: bool = True
    arrivals: str = "staggered"  # "staggered" | "burst" (module docstring)
    server_pid: int | None = None
    seed: int = 0
    timeout: float = 600.0
    vocab_size: int = 50257


@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None
    end_of_text: float = 0.0  # time of the last text chunk
    chunk_times: list[float] = field(default_factory=list)  # arrival time of each text chunk

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.tokens < 2:
            return None
        return (self.end_of_text - self.start - self.ttft) / (self.tokens - 1)


def _headers(cfg: ServeConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


async def one_request(client: aiohttp.ClientSession, cfg: ServeConfig, model: str, prompt: list[int],
                      max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, end=start)
    last = None
    chunks = 0
    try:
        async with client.post(cfg.url.rstrip("/") + "/v1/completions", json=body, headers=_headers(cfg)) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.read()).decode(errors='replace')[:300]}"
                res.end = time.perf_counter()
                return res
            async for line in r.content:  # one line at a time
                if not line.startswith(b"data: "):
                    continue  # blank separators and ": keep-alive" comments
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])[:300]
                    break
                now = time.perf_counter()
                if any(c.get("text") for c in obj.get("choices") or []):
                    chunks += 1
                    res.chunk_times.append(now)
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                if obj.get("usage"):
                    res.tokens = int(obj["usage"].get("completion_tokens", 0))
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.end = time.perf_counter()
    res.end_of_text = last if last is not None else res.end
    if not res.tokens:
        res.tokens = chunks  # a server without include_usage: one token per chunk, at least
    res.ok = res.error is None
    return res


def _prompts(cfg: ServeConfig, n: int, salt: int) -> list[list[int]]:
    rng = random.Random(cfg.seed * 1_000_003 + salt)
    high = min(cfg.vocab_size, 50256)
    return [[rng.randrange(high) for _ in range(cfg.prompt_len)] for _ in range(n)]


def tokens_in_window(results: list[RequestResult], t0: float, t1: float) -> float:
    """Completion tokens streamed in [t0, t1]: each request's tokens spread over its text chunks (a
    chunk carries one token, or a few where the server held back a partial UTF-8 character)."""
    n = 0.0
    for r in results:
        if r.ok and r.chunk_times:
            inside = sum(t0 <= t <= t1 for t in r.chunk_times)
            n += r.tokens * inside / len(r.chunk_times)
    return n


def summarize_level(results: list[RequestResult], wall: float, concurrency: int,
                    window: tuple[float, float, float] | None = None) -> dict:
    """results: the measured requests. window: (t0, t1, tokens streamed in it by every request,
    lead-ins included) when the level was staggered; tok/s is then tokens / (t1 - t0), else
    the measured requests' tokens / wall."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    if window is not None and window[1] > window[0]:
        tok_s = window[2] / (window[1] - window[0])
    else:
        tok_s = tokens / wall if wall > 0 else 0.0
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:3],
        "wall_seconds": wall, "completion_tokens": tokens, "tok_s": tok_s,
        "tok_s_wall": tokens / wall if wall > 0 else 0.0,
        "steady_window_s": window[1] - window[0] if window is not None else None,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_ms": summarize(1000 * r.ttft for r in ok if r.ttft is not None),
        "itl_ms": summarize(1000 * g for r in ok for g in r.itl),
        "tpot_ms": summarize(1000 * r.tpot for r in ok if r.tpot is not None),
        "e2e_ms": summarize(1000 * r.e2e for r in ok),
    }


async def run_level(client, cfg: ServeConfig, model: str, concurrency: int, bar=None) -> dict:
    n = cfg.requests_per_client
    prompts = _prompts(cfg, concurrency * n, salt=concurrency)
    staggered = cfg.arrivals == "staggered" and concurrency > 1
    lead_prompts = _prompts(cfg, concurrency, salt=10_000 + concurrency) if staggered else []
    results: list[RequestResult] = []
    leads: list[RequestResult] = []
    lasts: list[float] = []  # each client's last end

    async def client_loop(i: int):
        if staggered:
            # client i's lead-in ends about i/C of a request's duration after the others' start
            lead = max(1, round(cfg.max_tokens * i / concurrency))
            leads.append(await one_request(client, cfg, model, lead_prompts[i], lead))
        for j in range(n):
            r = await one_request(client, cfg, model, prompts[i * n + j], cfg.max_tokens)
            results.append(r)
            if bar is not None:
                bar.update(1)
        lasts.append(time.perf_counter())

    rss_samples: list[int] = []

    async def sample_rss():
        while True:
            v = rss_bytes(cfg.server_pid) if cfg.server_pid else None
            if v:
                rss_samples.append(v)
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample_rss()) if cfg.server_pid else None
    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    # the load generator's own CPU: on a small machine it competes with the server it measures
    client_cpu = (time.process_time() - cpu0) / wall if wall > 0 else 0.0
    if sampler:
        sampler.cancel()
    window = None
    if staggered:
        # steady state: every client busy, from the last lead-in's end to the first client's last end
        w0, w1 = max(r.end for r in leads), min(lasts)
        window = (w0, w1, tokens_in_window(results + leads, w0, w1))
        wall = time.perf_counter() - min(r.start for r in results) if results else wall
    level = summarize_level(results, wall, concurrency, window)
    level["arrivals"] = "staggered" if staggered else "burst"
    level["client_cpu_cores"] = client_cpu
    if rss_samples:
        level["server_rss_max_bytes"] = max(rss_samples)
    return level


async def _model_id(client: aiohttp.ClientSession, cfg: ServeConfig) -> str:
    async with client.get(cfg.url.rstrip("/") + "/v1/models", headers=_headers(cfg)) as r:
        r.raise_for_status()
        return (await r.json())["data"][0]["id"]


async def wait_ready(url: str, timeout: float = 120.0) -> None:
    """Poll GET /health until 200 (the model has loaded); raise on timeout or a failed load."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as c:
        while time.monotonic() < deadline:
            try:
                async with c.get(url.rstrip("/") + "/health") as r:
                    if r.status == 200:
                        return
                    text = await r.text()
                    if r.content_type == "application/json" and json.loads(text).get("status") == "failed":
                        raise RuntimeError(f"server failed to load: {text[:300]}")
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


async def run_serve(cfg: ServeConfig, progress: bool = True) -> dict:
    from tqdm import tqdm

    connector = aiohttp.TCPConnector(limit=max(cfg.concurrency) + 4)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout, connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        await wait_ready(cfg.url)
        model = cfg.model or await _model_id(client, cfg)
        if cfg.arrivals not in ("staggered", "burst"):
            raise ValueError(f"arrivals must be 'staggered' or 'burst', not {cfg.arrivals!r}")
        total = cfg.idle_requests + sum(c * cfg.requests_per_client for c in cfg.concurrency)
        bar = tqdm(total=total, desc="bench serve", unit="req", disable=not progress)
        if cfg.warmup:
            # one small request per shape the levels will use: the first requests of a fresh server pay
            # for lazy initialisation and first-touch of its buffers, which is not what we measure
            bar.set_postfix_str("warm-up")
            await asyncio.gather(*(one_request(client, cfg, model, p, 2)
                                   for p in _prompts(cfg, max(cfg.concurrency), salt=-1)))
        bar.set_postfix_str("idle TTFT")
        idle = []
        for p in _prompts(cfg, cfg.idle_requests, salt=-2):
            idle.append(await one_request(client, cfg, model, p, 1))
            bar.update(1)
        levels = []
        for c in cfg.concurrency:
            bar.set_postfix_str(f"concurrency {c}")
            levels.append(await run_level(client, cfg, model, c, bar))
        bar.close()
    idle_ok = [r for r in idle if r.ok]
    report = {
        "mode": "serve", "url": cfg.url, "model": model, "prompt_len": cfg.prompt_len, "max_tokens": cfg.max_tokens,
        "requests_per_client": cfg.requests_per_client, "arrivals": cfg.arrivals,
        "idle_ttft_ms": summarize(1000 * r.ttft for r in idle_ok if r.ttft is not None),
        "idle_errors": sorted({r.error for r in idle if r.error})[:3],
        "levels": levels,
    }
    base = report["idle_ttft_ms"]["p50"]
    for lv in levels:
        p50 = lv["ttft_ms"]["p50"]
        lv["ttft_p50_over_idle"] = p50 / base if base and p50 is not None else None
    if cfg.server_pid:
        report["server_pid"] = cfg.server_pid
        report["server_peak_rss_bytes"] = peak_rss_bytes(cfg.server_pid)
    return report


def format_markdown(report: dict) -> str:
    def f(v, spec=".0f"):
        return format(v, spec) if v is not None else "-"

    idle = report["idle_ttft_ms"]
    lines = [f"# Serve: {report['model']} at {report['url']} ({report.get('date', '')}); prompt {report['prompt_len']}, "
             f"{report['max_tokens']} new tokens, greedy, EOS ignored, {report['requests_per_client']} requests per client, "
             f"{report.get('arrivals', 'burst')} arrivals",
             "", f"Idle-server TTFT: p50 {f(idle['p50'], '.1f')} ms, p99 {f(idle['p99'], '.1f')} ms", "",
             "| concurrency | tok/s | TTFT p50 ms | TTFT p99 ms | TTFT p50 / idle | ITL p50 ms | ITL p99 ms "
             "| TPOT p50 ms | e2e p50 ms | e2e p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lv in report["levels"]:
        lines.append(
            f"| {lv['concurrency']} | {lv['tok_s']:.1f} | {f(lv['ttft_ms']['p50'])} | {f(lv['ttft_ms']['p99'])} "
            f"| {f(lv['ttft_p50_over_idle'], '.2f')}x | {f(lv['itl_ms']['p50'], '.1f')} | {f(lv['itl_ms']['p99'], '.1f')} "
            f"| {f(lv['tpot_ms']['p50'], '.1f')} | {f(lv['e2e_ms']['p50'])} | {f(lv['e2e_ms']['p99'])} | {lv['errors']} |")
    cpu = [lv.get("client_cpu_cores") for lv in report["levels"]]
    if any(c is not None for c in cpu):
        lines += ["", "Load generator's own CPU (cores, same machine as the server): " + ", ".join(
            f"{lv['concurrency']} streams {c:.2f}" for lv, c in zip(report["levels"], cpu) if c is not None)]
    if report.get("server_peak_rss_bytes"):
        lines += ["", f"Server peak resident memory (VmHWM of pid {report['server_pid']} and its children): "
                      f"{report['server_peak_rss_bytes'] / 2**20:.0f} MiB"]
    errs = sorted({e for lv in report["levels"] for e in lv["error_samples"]} | set(report.get("idle_errors", [])))
    if errs:
        lines += ["", "Errors seen:"] + [f"- {e}" for e in errs]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Two panels against concurrency: aggregate tok/s; TTFT and ITL p50/p99 (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    lv = report["levels"]
    xs = [x["concurrency"] for x in lv]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(xs, [x["tok_s"] for x in lv], marker="o")
    a.set_xlabel("concurrent streams")
    a.set_ylabel("aggregate output tokens/s")
    a.set_title("throughput")
    for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL")):
        for p, style in (("p50", "-"), ("p99", "--")):
            ys = [x[key][p] for x in lv]
            if any(y is not None for y in ys):
                b.plot(xs, [y if y is not None else float("nan") for y in ys], style, marker="o", label=f"{label} {p}")
    if report["idle_ttft_ms"]["p50"] is not None:
        b.axhline(report["idle_ttft_ms"]["p50"], color="grey", lw=0.8, ls=":", label="idle TTFT p50")
    b.set_yscale("log")
    b.set_xlabel("concurrent streams")
    b.set_ylabel("ms")
    b.set_title("latency")
    b.legend(fontsize=8)
    a.set_ylim(bottom=0)
    # plain numbers on the log latency axis: 1, 2, 5, 10, 20, 50 ... ms
    b.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    b.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"gpt2serve serve: {report['model']}, prompt {report['prompt_len']}, {report['max_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
