"""SIGKILL with 100 billed requests in flight, restart: the ledger balances to the micro-USD, nothing
stays reserved, nothing is charged twice; on SQLite and on PostgreSQL (stress/crash.py)."""

from __future__ import annotations

import pytest

from stress import crash

from .conftest import show


def assert_recovered(res: dict) -> None:
    """After SIGKILL with 100 reservations open and a restart: every hold released, the books exact."""
    assert res["exit_code"] == -9 and res["open_reservations_at_kill"] == 100
    assert res["released_on_restart"] == 100
    assert res["usage_micros_after"] == res["usage_micros_expected"]
    assert res["balance_micros"] == res["journal_micros"]
    assert res["open_reservations_after"] == 0 and res["double_charged"] == 0
    assert not res["failures"], "\n".join(res["failures"])


def test_sigkill_with_100_requests_in_flight_sqlite(tmp_path):
    res = crash.crash(tmp_path, None, requests=100, completed_first=10)
    show("crash sqlite", res)
    assert_recovered(res)


@pytest.mark.postgres
def test_sigkill_with_100_requests_in_flight_postgres(tmp_path):
    with crash.postgres_database() as url:
        res = crash.crash(tmp_path, url, requests=100, completed_first=10, label="postgres")
    show("crash postgres", res)
    assert_recovered(res)
