"""Disconnect storm: clients that leave mid-stream, before the first byte, or while a non-streaming
request is queued or running. Afterwards the server must hold nothing (0 running, 0 waiting, every
KV block free again) and have billed each request for exactly what it generated.

Billing is checked three ways, over a dedicated account:
  * each usage record costs prompt x price + completion x price, to the micro-USD (0 when it
    generated nothing: billing.py's rule);
  * a streamed request that was cut off is billed for at least the tokens the client received
    (it cannot have generated fewer) and fewer than max_tokens (it was stopped);
  * the completion tokens billed over the storm equal the tokens the server counted as generated
    (gpt2serve_generation_tokens_total in /metrics), and the account's usage equals the records.
"""

from __future__ import annotations

import asyncio
import random
import time
from decimal import Decimal

import httpx

from stress.common import Ledger, Server, auth, key_account, ledger_problems, stream_completion

MAX_TOKENS = 900


def prices_micros(server: Server) -> tuple[int, int]:
    p = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["pricing"]
    return int(Decimal(p["prompt"]) * 1_000_000), int(Decimal(p["completion"]) * 1_000_000)


def kv_free(server: Server) -> float | None:
    return server.metrics().get("gpt2serve_kv_blocks_free")


def generated_tokens(server: Server) -> float:
    return server.metrics().get("gpt2serve_generation_tokens_total", 0.0)


async def run_storm(server: Server, key: str, *, clients: int = 1000, concurrency: int = 64, seed: int = 0) -> dict:
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    headers = auth(key)
    account = key_account(server, key)
    led = Ledger(server.database_url)
    before_ids = {r[0] for r in led.q("SELECT id FROM generations WHERE account_id = :a", a=account)}
    idle0 = server.wait_idle(60)
    kv0, gen0 = kv_free(server), generated_tokens(server)
    sem = asyncio.Semaphore(concurrency)
    seen: dict[str, dict] = {}  # generation id -> what the client saw
    modes = {"mid_stream": 0, "before_first_byte": 0, "non_streaming": 0}
    errors: list[str] = []

    async def one(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        mode = rng.choices(list(modes), weights=(5, 3, 2))[0]
        modes[mode] += 1
        body = {"model": model, "prompt": rng.choice(["Once upon a time", "Hello", "The"]), "max_tokens": MAX_TOKENS,
                "temperature": 1.0, "ignore_eos": True, "seed": i}
        async with sem:
            try:
                if mode == "mid_stream":
                    r = await stream_completion(http, server.url, body | {"stream": True, "logprobs": 1}, headers,
                                                stop_after_chunks=rng.randint(1, 8))
                    if r.status != 200:
                        errors.append(f"mid_stream {i}: {r.status} {r.error}")
                    elif r.generation_id:
                        seen[r.generation_id] = {"mode": mode, "received": r.tokens}
                else:
                    stream = mode == "before_first_byte"
                    coro = (stream_completion(http, server.url, body | {"stream": True}, headers) if stream
                            else http.post(server.url + "/v1/completions", json=body, headers=headers))
                    task = asyncio.ensure_future(coro)
                    await asyncio.sleep(rng.uniform(0, 0.03) if stream else rng.uniform(0.05, 0.4))
                    task.cancel()  # the client gives up: httpx drops the connection
                    res = (await asyncio.gather(task, return_exceptions=True))[0]
                    if not isinstance(res, asyncio.CancelledError):
                        status = getattr(res, "status", getattr(res, "status_code", None))
                        if status != 200:
                            errors.append(f"{mode} {i}: finished before the cancel with {status}")
            except httpx.HTTPError as e:
                errors.append(f"{mode} {i}: {type(e).__name__}: {e}")

    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await asyncio.gather(*(one(i, http) for i in range(clients)))
    storm_s = time.monotonic() - t0

    # the server settles cancelled requests after the client left: wait until it is idle and the
    # open reservations of this account are gone
    idle = server.wait_idle(120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and led.one(
            "SELECT COUNT(*) FROM reservations WHERE account_id = :a AND status = 'open'", a=account)[0]:
        await asyncio.sleep(0.2)
    settle_s = time.monotonic() - t0 - storm_s
    kv1, gen1 = kv_free(server), generated_tokens(server)

    pp, pc = prices_micros(server)
    rows = [r for r in led.q("SELECT id, prompt_tokens, completion_tokens, cost_micros, cancelled, streamed, failed "
                             "FROM generations WHERE account_id = :a", a=account) if r[0] not in before_ids]
    audit = led.audit(account)
    led.close()
    problems = list(errors[:20])
    if idle.get("running") != 0 or idle.get("waiting") != 0:
        problems.append(f"not idle after the storm: {idle}")
    if kv0 is None or kv1 != kv0:
        problems.append(f"KV blocks free {kv0} before, {kv1} after")
    # billing.py's rule: a request that generated nothing costs nothing (not even its prompt)
    wrong_cost = [r for r in rows if r[3] != (r[1] * pp + r[2] * pc if r[2] else 0)]
    if wrong_cost:
        problems.append(f"{len(wrong_cost)} records whose cost is not prompt x {pp} + completion x {pc}: {wrong_cost[:3]}")
    by_id = {r[0]: r for r in rows}
    missing = [g for g in seen if g not in by_id]
    if missing:
        problems.append(f"{len(missing)} generations the client saw have no usage record: {missing[:3]}")
    under = [(g, s["received"], by_id[g][2]) for g, s in seen.items() if g in by_id and by_id[g][2] < s["received"]]
    if under:
        problems.append(f"{len(under)} billed for fewer tokens than the client received: {under[:3]}")
    over = [r for r in rows if r[2] >= MAX_TOKENS]
    if over:
        problems.append(f"{len(over)} cut-off requests billed for max_tokens or more: {over[:3]}")
    not_cancelled = [r for r in rows if not r[4] and not r[6]]
    if not_cancelled:
        problems.append(f"{len(not_cancelled)} records not marked cancelled: {not_cancelled[:3]}")
    billed_tokens = sum(r[2] for r in rows)
    if billed_tokens != gen1 - gen0:
        problems.append(f"billed {billed_tokens} completion tokens, the server counted {gen1 - gen0} generated")
    billed = sum(r[3] for r in rows)
    problems += ledger_problems(audit)
    if audit["open_reservations"]:
        problems.append(f"{audit['open_reservations']} reservations still open")
    if not server.alive():
        problems.append("the server died")
    return {
        "clients": clients, "concurrency": concurrency, "modes": modes, "storm_s": round(storm_s, 1),
        "settled_after_s": round(settle_s, 2), "running_after": idle.get("running"), "waiting_after": idle.get("waiting"),
        "kv_blocks_free_before": kv0, "kv_blocks_free_after": kv1, "usage_records": len(rows),
        "generation_ids_seen": len(seen), "tokens_received_mid_stream": sum(s["received"] for s in seen.values()),
        "completion_tokens_billed": billed_tokens, "completion_tokens_generated": gen1 - gen0,
        "billed_micros": billed, "account_usage_micros": audit["usage_micros"],
        "open_reservations": audit["open_reservations"], "idle_before": idle0, "failures": problems,
    }


def storm(server: Server, key: str, **kw) -> dict:
    return asyncio.run(run_storm(server, key, **kw))
