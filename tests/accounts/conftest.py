"""Fixtures: a fresh ledger on a real SQLite file, and on the PostgreSQL server on loopback.

PostgreSQL tests get their own database (created here, dropped after), so they never see each
other's rows. If the server is unreachable they fail: `.ci/run` is meant to provide it.
Override the admin URL with GPT2SERVE_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from gpt2serve.accounts.store import AccountStore

ADMIN_URLS = [
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql+psycopg://root@127.0.0.1:5432/test",
]


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    candidates = [os.environ["GPT2SERVE_TEST_POSTGRES_URL"]] if os.environ.get("GPT2SERVE_TEST_POSTGRES_URL") else ADMIN_URLS
    errors = []
    for url in candidates:
        eng = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
            return url
        except Exception as e:  # try the next role
            errors.append(f"{url}: {e}")
        finally:
            eng.dispose()
    pytest.fail("PostgreSQL on 127.0.0.1:5432 is unreachable (run scripts/test-services.sh):\n" + "\n".join(errors))


@pytest.fixture
def pg_url(pg_admin_url: str):
    name = "gpt2serve_test_" + uuid.uuid4().hex[:12]
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    # template0: nobody may connect to it, so concurrent test runs (other engineers, CI) never
    # hit "source database template1 is being accessed by other users".
    for attempt in range(5):
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
            break
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    try:
        yield make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def store(db_url: str):
    s = AccountStore(db_url, instance="test-instance")
    s.migrate()
    yield s
    s.dispose()

