"""Crash: SIGKILL the server with N billed requests in flight, restart it on the same database.

Passes when, after the restart, the ledger balances to the micro-USD (counters = journal =
reservations = usage records), no reservation is open, every killed request is released at no
charge (and recorded as failed), the requests that completed before the crash are charged exactly
what their usage records say, nothing is charged twice, and a second restart changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import httpx

from stress.common import Ledger, Server, auth, key_account, ledger_problems, stream_completion

ENV = {"GPT2SERVE_RATE_LIMIT_RPM": "0", "GPT2SERVE_RATE_LIMIT_TPM": "0"}


@contextlib.contextmanager
def postgres_database(admin_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"):
    """A fresh database on the loopback PostgreSQL (trust auth), dropped afterwards; yields its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = "gpt2serve_stress_" + uuid.uuid4().hex[:10]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _cost_micros(url: str, key: str, gid: str) -> int:
    r = httpx.get(url + "/v1/generation", params={"id": gid}, headers=auth(key), timeout=30)
    r.raise_for_status()
    return int(r.json()["data"]["total_cost_micros"])


async def _completed(server: Server, key: str, n: int) -> list[str]:
    """n short streamed requests run to the end before the crash; their generation ids."""
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    async with httpx.AsyncClient(timeout=120) as http:
        rs = await asyncio.gather(*(stream_completion(http, server.url, {
            "model": model, "prompt": "Before the crash", "max_tokens": 8 + i % 8, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}, auth(key)) for i in range(n)))
    bad = [r for r in rs if r.status != 200 or not r.done]
    if bad:
        raise RuntimeError(f"requests before the crash failed: {[(r.status, r.error) for r in bad[:3]]}")
    return [r.generation_id for r in rs]


async def _in_flight_then_kill(server: Server, key: str, account: int, n: int, led: Ledger,
                               timeout: float = 120.0) -> dict:
    """Start n long streams, wait until all n hold a reservation, then SIGKILL the server."""
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": "In flight", "max_tokens": 900, "ignore_eos": True, "stream": True}
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30), limits=limits) as http:
        tasks = [asyncio.ensure_future(stream_completion(http, server.url, body | {"seed": i}, auth(key)))
                 for i in range(n)]
        deadline = time.monotonic() + timeout
        held = 0
        while time.monotonic() < deadline:
            held = led.one("SELECT COUNT(*) FROM reservations WHERE account_id = :a AND status = 'open'", a=account)[0]
            if held >= n:
                break
            await asyncio.sleep(0.05)
        health = server.health()
        code = server.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finished = sum(1 for r in results if not isinstance(r, BaseException) and r.done)
    return {"open_reservations_at_kill": int(held), "running_at_kill": health.get("running"),
            "waiting_at_kill": health.get("waiting"), "exit_code": code, "clients_finished": finished,
            "clients_cut_off": n - finished}


def crash(workdir: Path, database_url: str | None = None, *, requests: int = 100, completed_first: int = 20,
          model: str = "random:gpt2-tiny", label: str = "sqlite") -> dict:
    workdir = Path(workdir)
    server = Server(workdir, model=model, database_url=database_url, env=ENV, name=f"crash-{label}")
    server.start()
    problems: list[str] = []
    try:
        key = server.create_key(100.0)
        account = key_account(server, key)
        led = Ledger(server.database_url)
        done_ids = asyncio.run(_completed(server, key, completed_first))
        expected_usage = sum(_cost_micros(server.url, key, g) for g in done_ids)
        kill = asyncio.run(_in_flight_then_kill(server, key, account, requests, led))
        before = led.audit(account)
        if kill["open_reservations_at_kill"] < requests:
            problems.append(f"only {kill['open_reservations_at_kill']} of {requests} requests held a reservation "
                            "when the server was killed")

        server.start()  # same database, same instance name (the host's): crash recovery runs
        after = led.audit(account)
        released = led.one("SELECT COUNT(*) FROM reservations WHERE account_id = :a AND status = 'released'",
                           a=account)[0]
        killed_records = led.one(
            "SELECT COUNT(*), COALESCE(SUM(cost_micros),0) FROM generations g JOIN reservations r ON r.id = g.id "
            "WHERE r.account_id = :a AND r.status = 'released' AND g.failed", a=account)
        problems += ledger_problems(after)
        if after["open_reservations"] or after["reserved_micros"]:
            problems.append(f"after restart: {after['open_reservations']} open reservations, "
                            f"{after['reserved_micros']} micro-USD reserved")
        if after["usage_micros"] != expected_usage:
            problems.append(f"usage {after['usage_micros']} micro-USD != {expected_usage} charged by the "
                            f"{completed_first} requests completed before the crash")
        if after["credits_micros"] != before["credits_micros"]:
            problems.append("credits changed across the crash")
        if released != before["open_reservations"]:
            problems.append(f"{released} reservations released, {before['open_reservations']} were open")
        if killed_records[0] != released or killed_records[1] != 0:
            problems.append(f"killed requests: {killed_records[0]} failed usage records costing {killed_records[1]}")
        credits = httpx.get(server.url + "/v1/credits", headers=auth(key), timeout=30).json()["data"]
        if credits["reserved_micros"] != 0 or credits["total_usage_micros"] != expected_usage:
            problems.append(f"/v1/credits after restart: {credits}")

        # the restarted server bills normally, and a second restart releases nothing more
        extra = asyncio.run(_completed(server, key, 1))
        expected_usage += _cost_micros(server.url, key, extra[0])
        server.stop()
        server.start()
        again = led.audit(account)
        problems += ledger_problems(again)
        if again["usage_micros"] != expected_usage or again["open_reservations"]:
            problems.append(f"second restart: usage {again['usage_micros']} (expected {expected_usage}), "
                            f"{again['open_reservations']} open")
        led.close()
        alive = server.alive()
    finally:
        server.stop()
    return {"backend": label, "requests_in_flight": requests, "completed_before": completed_first, **kill,
            "reserved_micros_at_kill": before["reserved_micros"], "released_on_restart": int(released),
            "usage_micros_expected": expected_usage, "usage_micros_after": again["usage_micros"],
            "balance_micros": again["balance_micros"], "journal_micros": again["journal_micros"],
            "open_reservations_after": again["open_reservations"],
            "double_charged": again["double_charged_generations"], "server_alive_after_restart": alive,
            "failures": problems}
