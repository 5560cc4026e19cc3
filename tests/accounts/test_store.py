"""The ledger on a real SQLite file and on PostgreSQL: keys, reserve/settle, limits, concurrency."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, select

from gpt2serve.accounts import keys as keylib
from gpt2serve.accounts.migrations import config, current
from gpt2serve.accounts.models import Base
from gpt2serve.accounts.store import AccountStore, InsufficientCredit, KeyRevoked, SignupLimited

from .helpers import new_key

SETTLE = dict(finish_reason="stop", streamed=False, cancelled=False, failed=False, latency_s=0.01)


def dump_text(store: AccountStore) -> str:
    """Every value of every row of every table, as text."""
    out = []
    with store.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(select(table)).all():
                out.extend(str(v) for v in row)
    return "\n".join(out)


def test_migrate_creates_schema_and_is_idempotent(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"accounts", "api_keys", "ledger_entries", "reservations", "generations"} <= tables
    assert current(store.engine) == "0001"
    store.migrate()  # a second start-up upgrades nothing and fails nothing
    assert current(store.engine) == "0001"
    command.downgrade(config(store.engine), "base")  # the migration is reversible
    assert "accounts" not in inspect(store.engine).get_table_names()
    store.migrate()
    assert current(store.engine) == "0001"


def test_keys_are_stored_hashed_and_never_logged(store, db_url, caplog):
    caplog.set_level(logging.DEBUG)
    plaintext, rec = new_key(store, 1000, label="ci")
    assert plaintext.startswith("sk-") and keylib.looks_like_key(plaintext)
    secret = plaintext[len(rec.prefix):]  # the part that is not shown in listings
    dump = dump_text(store)
    assert keylib.hash_key(plaintext) in dump  # what is stored...
    assert secret not in dump and plaintext not in dump  # ...and what is not
    if db_url.startswith("sqlite"):
        store.dispose()  # checkpoint the WAL, then read the raw bytes of the file(s)
        path = Path(db_url.removeprefix("sqlite:///"))
        raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert keylib.hash_key(plaintext).encode() in raw and secret.encode() not in raw
    assert store.authenticate(plaintext).key_id == rec.key_id
    store.revoke_key(rec.prefix)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert rec.prefix in logged  # the prefix identifies the key in logs
    assert secret not in logged and secret not in caplog.text


def test_authenticate_rejects_wrong_keys_and_flags_revoked(store):
    plaintext, rec = new_key(store, 1000)
    assert store.authenticate("sk-nothex") is None
    assert store.authenticate("") is None
    # Same prefix, different secret: found by prefix, refused by the hash comparison.
    forged = plaintext[:-4] + ("0000" if not plaintext.endswith("0000") else "1111")
    assert store.authenticate(forged) is None
    assert not rec.revoked
    store.revoke_key(rec.key_id)
    again = store.authenticate(plaintext)
    assert again is not None and again.revoked
    with pytest.raises(KeyRevoked):
        store.reserve(key_id=rec.key_id, generation_id="g-revoked", amount_micros=1, model="gpt2")


def test_reserve_settle_release_arithmetic(store):
    _, rec = new_key(store, 1_000)
    store.reserve(key_id=rec.key_id, generation_id="g1", amount_micros=600, model="gpt2")
    assert store.get_account(rec.account_id).available_micros == 400
    with pytest.raises(InsufficientCredit) as e:
        store.reserve(key_id=rec.key_id, generation_id="g2", amount_micros=401, model="gpt2")
    assert (e.value.scope, e.value.needed_micros, e.value.available_micros) == ("account", 401, 400)
    assert store.settle("g1", 250, prompt_tokens=50, completion_tokens=100, **SETTLE) == 250
    # Settling twice charges nothing more.
    assert store.settle("g1", 250, prompt_tokens=50, completion_tokens=100, **SETTLE) == 250
    acct = store.get_account(rec.account_id)
    assert (acct.credits_micros, acct.usage_micros, acct.reserved_micros) == (1_000, 250, 0)
    # A cost above the reservation is capped at the reservation: never overdraw.
    store.reserve(key_id=rec.key_id, generation_id="g3", amount_micros=100, model="gpt2")
    assert store.settle("g3", 10_000, prompt_tokens=1, completion_tokens=1, **SETTLE) == 100
    audit = store.audit(rec.account_id)
    assert audit["balance_micros"] == audit["journal_micros"] == 650
    assert audit["reserved_micros"] == audit["open_reservations_micros"] == 0
    g = store.get_generation("g1")
    assert (g.prompt_tokens, g.completion_tokens, g.cost_micros, g.finish_reason) == (50, 100, 250, "stop")
    assert store.get_key(rec.key_id).usage_micros == 350


def test_key_spending_limit(store):
    account_id = store.create_account(credit_micros=10_000)
    _, info = store.create_key(account_id, label="capped", limit_micros=300)
    store.reserve(key_id=info.key_id, generation_id="k1", amount_micros=200, model="gpt2")
    with pytest.raises(InsufficientCredit) as e:
        store.reserve(key_id=info.key_id, generation_id="k2", amount_micros=200, model="gpt2")
    assert e.value.scope == "key" and e.value.available_micros == 100
    store.settle("k1", 150, prompt_tokens=1, completion_tokens=1, **SETTLE)
    store.reserve(key_id=info.key_id, generation_id="k3", amount_micros=150, model="gpt2")  # 300 - 150 left
    store.update_key(info.key_id, clear_limit=True, label="uncapped")
    store.reserve(key_id=info.key_id, generation_id="k4", amount_micros=5_000, model="gpt2")
    assert store.get_key(info.key_id).label == "uncapped"


def test_signup_is_limited_per_address(store):
    for _ in range(3):
        account_id, plaintext, info = store.signup(address="10.0.0.1", credit_micros=1_000_000, per_hour=3)
        assert store.authenticate(plaintext).account_id == account_id
        assert store.get_account(account_id).available_micros == 1_000_000
    with pytest.raises(SignupLimited) as e:
        store.signup(address="10.0.0.1", credit_micros=1_000_000, per_hour=3)
    assert 3500 < e.value.retry_after_s <= 3600
    store.signup(address="10.0.0.2", credit_micros=1_000_000, per_hour=3)  # other addresses are unaffected


def test_amounts_are_integers(store):
    with pytest.raises(TypeError):
        store.create_account(credit_micros=1.5)
    with pytest.raises(ValueError):
        store.add_credit(store.create_account(), -5)


def test_50_concurrent_reservations_exactly_10_succeed(store):
    """50 threads, each on its own connection, race for a balance that covers exactly 10."""
    worst = 1_234  # micro-USD held per request
    initial = 10 * worst
    _, rec = new_key(store, initial)
    barrier = threading.Barrier(50)

    def attempt(i: int) -> bool:
        barrier.wait()  # release all 50 at once
        try:
            store.reserve(key_id=rec.key_id, generation_id=f"race-{i}", amount_micros=worst, model="gpt2")
            return True
        except InsufficientCredit:
            return False

    with ThreadPoolExecutor(50) as pool:
        won = [i for i, ok in enumerate(pool.map(attempt, range(50))) if ok]
    assert len(won) == 10
    assert store.get_account(rec.account_id).available_micros == 0

    costs = {i: 100 + 7 * i for i in won}  # each settles at its own real cost, below the hold

    def settle(i: int) -> int:
        return store.settle(f"race-{i}", costs[i], prompt_tokens=10, completion_tokens=i, **SETTLE)

    with ThreadPoolExecutor(10) as pool:
        charged = list(pool.map(settle, won))
    assert charged == [costs[i] for i in won]
    acct = store.get_account(rec.account_id)
    assert acct.reserved_micros == 0
    assert acct.credits_micros - acct.usage_micros == initial - sum(costs.values())
    audit = store.audit(rec.account_id)
    assert audit["journal_micros"] == initial - sum(costs.values())
    assert audit["open_reservations"] == 0
