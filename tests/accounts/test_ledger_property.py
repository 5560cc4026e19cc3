"""Property: any sequence of reserve / settle / release keeps the ledger consistent and >= 0."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2serve.accounts.store import AccountStore, InsufficientCredit

from .helpers import new_key

SETTLE = dict(finish_reason="stop", streamed=False, cancelled=False, failed=False, latency_s=0.0)
ops = st.lists(st.tuples(st.sampled_from(["reserve", "settle", "restart", "credit"]),
                         st.integers(0, 500), st.integers(0, 600)), max_size=25)
ids = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, initial=st.integers(0, 2_000))
def test_any_sequence_keeps_the_books(sqlite_url, ops, initial):
    store = AccountStore(sqlite_url, instance=f"prop-{next(ids)}")  # examples share the file
    store.migrate()
    _, key = new_key(store, initial)
    open_: dict[str, int] = {}
    credits, charged = initial, 0
    try:
        for op, a, b in ops:
            if op == "reserve":
                gid = f"p{next(ids)}"
                avail = credits - charged - sum(open_.values())
                try:
                    store.reserve(key_id=key.key_id, generation_id=gid, amount_micros=a, model="m")
                    assert a <= avail
                    open_[gid] = a
                except InsufficientCredit:
                    assert a > avail
            elif op == "settle" and open_:
                gid, held = open_.popitem()
                got = store.settle(gid, b, prompt_tokens=1, completion_tokens=1, **SETTLE)
                assert got == min(b, held)
                charged += got
            elif op == "restart":
                assert store.release_open_reservations() == len(open_)
                open_.clear()
            elif op == "credit" and a:
                store.add_credit(key.account_id, a)
                credits += a
            audit = store.audit(key.account_id)
            assert audit["balance_micros"] == audit["journal_micros"] == credits - charged
            assert audit["reserved_micros"] == sum(open_.values())
            assert store.get_account(key.account_id).available_micros >= 0
    finally:
        store.dispose()
