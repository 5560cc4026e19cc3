"""Crash recovery: reservations left open by a dead server are released at start-up, once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from gpt2serve.accounts.models import LedgerEntry, Reservation
from gpt2serve.accounts.store import AccountStore

from .helpers import new_key

SETTLE = dict(finish_reason="stop", streamed=False, cancelled=False, failed=False, latency_s=0.01)
REPO = Path(__file__).resolve().parents[2]


def test_new_store_releases_open_reservations_once(store, db_url):
    _, rec = new_key(store, 10_000)
    store.reserve(key_id=rec.key_id, generation_id="done", amount_micros=3_000, model="gpt2")
    store.settle("done", 1_000, prompt_tokens=1, completion_tokens=1, **SETTLE)
    store.reserve(key_id=rec.key_id, generation_id="in-flight", amount_micros=4_000, model="gpt2")
    assert store.get_account(rec.account_id).available_micros == 5_000
    store.dispose()  # the server "dies" with "in-flight" open

    restarted = AccountStore(db_url, instance="test-instance")
    other = AccountStore(db_url, instance="another-replica")
    try:
        assert other.release_open_reservations() == 0  # not its reservation: a live replica's
        assert restarted.release_open_reservations() == 1
        assert restarted.release_open_reservations() == 0  # nothing released twice
        acct = restarted.get_account(rec.account_id)
        assert (acct.credits_micros, acct.usage_micros, acct.reserved_micros) == (10_000, 1_000, 0)
        # A late settle of the released generation (e.g. a request that outlived the restart on
        # another replica) charges nothing.
        assert restarted.settle("in-flight", 2_000, prompt_tokens=1, completion_tokens=1, **SETTLE) == 0
        assert restarted.get_account(rec.account_id).usage_micros == 1_000
        g = restarted.get_generation("in-flight")
        assert g.failed and g.cost_micros == 0
        assert restarted.get_key(rec.key_id).usage_micros == 1_000
    finally:
        restarted.dispose()
        other.dispose()


def test_sigkill_with_requests_in_flight_then_recover(store, db_url):
    initial = 100_000_000
    _, rec = new_key(store, initial)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("crash_worker.py")), db_url, str(rec.key_id), "test-instance"],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    reported: dict[str, int] = {}  # generation id -> cost the worker reported as settled
    reserved: set[str] = set()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until enough requests went through, with 8 always in flight
            kind, gid, amount = line.split()
            (reserved.add(gid) if kind == "R" else reported.__setitem__(gid, int(amount)))
            if len(reported) >= 40:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(reserved) > len(reported)  # killed with reservations held

    recovered = AccountStore(db_url, instance="test-instance")
    try:
        released = recovered.release_open_reservations()
        assert released >= 1
        audit = recovered.audit(rec.account_id)
        assert audit["open_reservations"] == 0 and audit["reserved_micros"] == 0
        # Every micro charged is in exactly one settled reservation and one ledger entry.
        assert audit["usage_micros"] == audit["charged_micros"]
        assert audit["balance_micros"] == audit["journal_micros"] == initial - audit["usage_micros"]
        with recovered.engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(select(Reservation)).all()}
            charges = conn.execute(select(LedgerEntry.generation_id, func.count()).where(LedgerEntry.kind == "usage")
                                   .group_by(LedgerEntry.generation_id)).all()
        assert all(n == 1 for _, n in charges)
        assert {g for g, _ in charges} == {g for g, r in rows.items() if r.status == "settled" and r.charged_micros}
        for gid, cost in reported.items():  # what the dead server told its clients is what was charged
            assert rows[gid].status == "settled" and rows[gid].charged_micros == cost
        assert {r.status for r in rows.values()} <= {"settled", "released"}
        assert sum(r.status == "released" for r in rows.values()) == released
        assert recovered.release_open_reservations() == 0
    finally:
        recovered.dispose()
