"""AccountStore: accounts, keys, the credit ledger and usage records, on SQLite or PostgreSQL.

Same code on both; the database URL picks the backend:
    AccountStore("sqlite:///gpt2serve.db")                         # a file, zero set-up (default)
    AccountStore("postgresql+psycopg://user@host/db")              # one ledger shared by replicas

Every method is synchronous and short (one transaction); async callers run them in a thread
(see billing.py). Money moves only inside write transactions that first lock the rows they touch,
always in the order account -> key -> reservation (so two transactions never wait on each other
in a cycle):
  * PostgreSQL: `SELECT ... FOR UPDATE` on the account and key rows.
  * SQLite: every write transaction starts with `BEGIN IMMEDIATE`, which takes the database's
    single write lock up front (SQLite ignores FOR UPDATE); other writers wait (busy timeout).
On top of the lock, the UPDATE that reserves money is conditional
(`... WHERE credits - usage - reserved >= :amount`) and its row count is checked, so even a
missing lock could not overdraw an account.
"""

from __future__ import annotations

import logging
import socket
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterator

from sqlalchemy import Connection, create_engine, event, func, insert, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool

from gpt2serve.accounts import keys as keylib
from gpt2serve.accounts.models import Account, ApiKey, Generation, LedgerEntry, Reservation, utcnow

log = logging.getLogger(__name__)

accounts = Account.__table__
api_keys = ApiKey.__table__
ledger = LedgerEntry.__table__
reservations = Reservation.__table__
generations = Generation.__table__


# ---------------------------------------------------------------------------------------------
# records handed to callers (plain frozen dataclasses: no sessions, no lazy loading)


@dataclass(frozen=True)
class KeyRecord:
    """An authenticated key, as `api/auth.py`'s dependency returns it."""

    key_id: int
    account_id: int
    prefix: str
    label: str | None
    limit_micros: int | None
    usage_micros: int
    reserved_micros: int
    revoked: bool
    account_available_micros: int  # credits - usage - reserved of the account, at lookup time

    @property
    def limit_remaining_micros(self) -> int | None:
        return None if self.limit_micros is None else self.limit_micros - self.usage_micros

    @property
    def spendable_micros(self) -> int:
        """What a new reservation may take: the account's credit, capped by the key's limit."""
        if self.limit_micros is None:
            return self.account_available_micros
        return min(self.account_available_micros, self.limit_micros - self.usage_micros - self.reserved_micros)


@dataclass(frozen=True)
class KeyInfo:
    key_id: int
    account_id: int
    prefix: str
    label: str | None
    limit_micros: int | None
    usage_micros: int
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class AccountInfo:
    account_id: int
    name: str | None
    credits_micros: int
    usage_micros: int
    reserved_micros: int

    @property
    def available_micros(self) -> int:
        return self.credits_micros - self.usage_micros - self.reserved_micros


@dataclass(frozen=True)
class GenerationRecord:
    id: str
    account_id: int | None
    key_id: int | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    latency_s: float | None
    finish_reason: str | None
    streamed: bool
    cancelled: bool
    failed: bool
    created_at: datetime


# ---------------------------------------------------------------------------------------------
# domain errors (billing.py maps them to HTTP statuses)


class AccountsError(Exception):
    pass


class NotFound(AccountsError):
    pass


class KeyRevoked(AccountsError):
    pass


class InsufficientCredit(AccountsError):
    """needed > available; scope is "account" (credit) or "key" (the key's spending limit)."""

    def __init__(self, scope: str, needed_micros: int, available_micros: int):
        super().__init__(f"{scope}: needs {needed_micros} micro-USD, {available_micros} available")
        self.scope = scope
        self.needed_micros = needed_micros
        self.available_micros = available_micros


class SignupLimited(AccountsError):
    def __init__(self, retry_after_s: float):
        super().__init__(f"too many sign-ups from this address; retry in {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


# ---------------------------------------------------------------------------------------------


def _key_info(row) -> KeyInfo:
    return KeyInfo(row.id, row.account_id, row.prefix, row.label, row.limit_micros, row.usage_micros,
                   row.created_at, row.last_used_at, row.revoked_at)


class AccountStore:
    def __init__(self, database_url: str = "sqlite:///gpt2serve.db", *, instance: str | None = None, echo: bool = False):
        """`instance` names this server in the reservations it opens; `release_open_reservations()`
        releases only this instance's (so replicas sharing a PostgreSQL ledger don't release each
        other's live requests). Give each replica a stable name (default: the host name)."""
        self.url = make_url(database_url)
        self.instance = instance or socket.gethostname()
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.is_postgres = self.url.get_backend_name() == "postgresql"
        kwargs: dict = {"echo": echo, "future": True}
        if self.is_sqlite:
            # timeout: how long a writer waits for SQLite's write lock before "database is locked".
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 60}
            if self.url.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            self._setup_sqlite(self.engine)

    @staticmethod
    def _setup_sqlite(engine: Engine) -> None:
        # SQLAlchemy's documented recipe: turn off pysqlite's own BEGIN handling and emit BEGIN
        # ourselves, so write transactions can say BEGIN IMMEDIATE.
        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN " + conn.get_execution_options().get("sqlite_begin", "DEFERRED"))

    def dispose(self) -> None:
        self.engine.dispose()

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    def _lock_account(self, conn: Connection, account_id: int):
        row = conn.execute(select(accounts).where(accounts.c.id == account_id).with_for_update()).first()
        if row is None:
            raise NotFound(f"account {account_id} not found")
        return row

    def _lock_key(self, conn: Connection, key_id: int):
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id).with_for_update()).first()
        if row is None:
            raise NotFound(f"key {key_id} not found")
        return row

    # -- schema ---------------------------------------------------------------------------------

    def migrate(self, revision: str = "head") -> None:
        """Upgrade the schema with the Alembic migrations shipped in this package (idempotent)."""
        from gpt2serve.accounts.migrations import upgrade

        upgrade(self.engine, revision)

    # -- accounts and keys ----------------------------------------------------------------------

    def create_account(self, *, credit_micros: int = 0, name: str | None = None, note: str = "initial credit") -> int:
        with self._write() as conn:
            return self._insert_account(conn, credit_micros=credit_micros, name=name, address=None, note=note)

    def _insert_account(self, conn: Connection, *, credit_micros: int, name: str | None, address: str | None, note: str) -> int:
        _check_amount(credit_micros, allow_zero=True)
        now = utcnow()
        account_id = conn.execute(
            insert(accounts).values(name=name, credits_micros=credit_micros, usage_micros=0, reserved_micros=0,
                                    signup_address=address, created_at=now).returning(accounts.c.id)
        ).scalar_one()
        if credit_micros:
            conn.execute(insert(ledger).values(account_id=account_id, kind="credit", amount_micros=credit_micros,
                                               note=note, created_at=now))
        return account_id

    def create_key(self, account_id: int, *, label: str | None = None, limit_micros: int | None = None) -> tuple[str, KeyInfo]:
        """Returns (plaintext, info). The plaintext is never stored: show it once."""
        with self._write() as conn:
            self._lock_account(conn, account_id)
            return self._insert_key(conn, account_id, label=label, limit_micros=limit_micros)

    def _insert_key(self, conn: Connection, account_id: int, *, label: str | None, limit_micros: int | None) -> tuple[str, KeyInfo]:
        if limit_micros is not None:
            _check_amount(limit_micros, allow_zero=True)
        plaintext = keylib.new_key()
        row = conn.execute(
            insert(api_keys).values(account_id=account_id, prefix=keylib.prefix_of(plaintext),
                                    key_hash=keylib.hash_key(plaintext), label=label, limit_micros=limit_micros,
                                    usage_micros=0, reserved_micros=0, created_at=utcnow()).returning(api_keys)
        ).one()
        log.info("created key %s for account %d", row.prefix, account_id)
        return plaintext, _key_info(row)

    def signup(self, *, address: str, credit_micros: int, per_hour: int, label: str | None = None,
               name: str | None = None) -> tuple[int, str, KeyInfo]:
        """Create an account with starter credit and its first key; at most `per_hour` per address.

        The count is in the database (not in memory), so restarts and replicas share it. Raises
        SignupLimited. Returns (account_id, plaintext key, key info)."""
        now = utcnow()
        since = now - timedelta(hours=1)
        with self._write() as conn:
            if self.is_postgres:
                # Serialise sign-ups from one address (SQLite's BEGIN IMMEDIATE already does).
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(address.encode())})
            count, oldest = conn.execute(
                select(func.count(), func.min(accounts.c.created_at))
                .where(accounts.c.signup_address == address, accounts.c.created_at > since)
            ).one()
            if per_hour >= 0 and count >= per_hour:
                retry = (oldest + timedelta(hours=1) - now).total_seconds() if oldest else 3600.0
                raise SignupLimited(max(1.0, retry))
            account_id = self._insert_account(conn, credit_micros=credit_micros, name=name, address=address,
                                              note="starter credit")
            plaintext, info = self._insert_key(conn, account_id, label=label, limit_micros=None)
        return account_id, plaintext, info

    def authenticate(self, plaintext: str) -> KeyRecord | None:
        """The key record for a presented key, or None if it matches no key. Revoked keys are
        returned with revoked=True (so the caller can say so). The lookup uses only the
        non-secret prefix; the hash comparison is constant-time."""
        if not keylib.looks_like_key(plaintext):
            return None
        digest = keylib.hash_key(plaintext)
        with self._read() as conn:
            rows = conn.execute(
                select(api_keys, accounts.c.credits_micros, accounts.c.usage_micros.label("acct_usage"),
                       accounts.c.reserved_micros.label("acct_reserved"))
                .join(accounts, accounts.c.id == api_keys.c.account_id)
                .where(api_keys.c.prefix == keylib.prefix_of(plaintext))
            ).all()
        match = None
        for row in rows:  # compare against every candidate: no early exit to time
            if keylib.same_hash(row.key_hash, digest):
                match = row
        if match is None:
            return None
        return KeyRecord(
            key_id=match.id, account_id=match.account_id, prefix=match.prefix, label=match.label,
            limit_micros=match.limit_micros, usage_micros=match.usage_micros, reserved_micros=match.reserved_micros,
            revoked=match.revoked_at is not None,
            account_available_micros=match.credits_micros - match.acct_usage - match.acct_reserved,
        )

    def _find_key_id(self, conn: Connection, key: int | str) -> int:
        """A key by id or by its prefix (what `keys list` shows)."""
        if isinstance(key, int) or str(key).isdigit():
            stmt = select(api_keys.c.id).where(api_keys.c.id == int(key))
        else:
            stmt = select(api_keys.c.id).where(api_keys.c.prefix == str(key))
        ids = conn.execute(stmt).scalars().all()
        if len(ids) != 1:
            raise NotFound(f"key {key!r}: {'no match' if not ids else 'ambiguous prefix'}")
        return ids[0]

    def revoke_key(self, key: int | str) -> KeyInfo:
        with self._write() as conn:
            key_id = self._find_key_id(conn, key)
            conn.execute(update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                         .values(revoked_at=utcnow()))
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
        log.info("revoked key %s", row.prefix)
        return _key_info(row)

    def update_key(self, key: int | str, *, label: str | None = None, limit_micros: int | None = None,
                   clear_limit: bool = False) -> KeyInfo:
        values: dict = {}
        if label is not None:
            values["label"] = label
        if limit_micros is not None:
            _check_amount(limit_micros, allow_zero=True)
            values["limit_micros"] = limit_micros
        if clear_limit:
            values["limit_micros"] = None
        with self._write() as conn:
            key_id = self._find_key_id(conn, key)
            if values:
                conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(**values))
            return _key_info(conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one())

    def list_keys(self, account_id: int | None = None, *, include_revoked: bool = True) -> list[KeyInfo]:
        stmt = select(api_keys).order_by(api_keys.c.id)
        if account_id is not None:
            stmt = stmt.where(api_keys.c.account_id == account_id)
        if not include_revoked:
            stmt = stmt.where(api_keys.c.revoked_at.is_(None))
        with self._read() as conn:
            return [_key_info(r) for r in conn.execute(stmt).all()]

    def get_key(self, key_id: int) -> KeyInfo:
        with self._read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            raise NotFound(f"key {key_id} not found")
        return _key_info(row)

    def add_credit(self, account_id: int, micros: int, *, note: str = "credit") -> AccountInfo:
        _check_amount(micros)
        with self._write() as conn:
            self._lock_account(conn, account_id)
            conn.execute(update(accounts).where(accounts.c.id == account_id)
                         .values(credits_micros=accounts.c.credits_micros + micros))
            conn.execute(insert(ledger).values(account_id=account_id, kind="credit", amount_micros=micros, note=note,
                                               created_at=utcnow()))
        return self.get_account(account_id)

    def get_account(self, account_id: int) -> AccountInfo:
        with self._read() as conn:
            row = conn.execute(select(accounts).where(accounts.c.id == account_id)).first()
        if row is None:
            raise NotFound(f"account {account_id} not found")
        return AccountInfo(row.id, row.name, row.credits_micros, row.usage_micros, row.reserved_micros)

    # -- the ledger: reserve -> settle | release ------------------------------------------------

    def reserve(self, *, key_id: int, generation_id: str, amount_micros: int, model: str) -> None:
        """Hold `amount_micros` (the worst-case cost) of the key's account for one generation.

        Raises KeyRevoked, InsufficientCredit("account" | "key", ...). One transaction."""
        _check_amount(amount_micros, allow_zero=True)
        with self._write() as conn:
            account_id = conn.execute(select(api_keys.c.account_id).where(api_keys.c.id == key_id)).scalar_one_or_none()
            if account_id is None:
                raise NotFound(f"key {key_id} not found")
            acct = self._lock_account(conn, account_id)
            key = self._lock_key(conn, key_id)
            if key.revoked_at is not None:
                raise KeyRevoked(key.prefix)
            available = acct.credits_micros - acct.usage_micros - acct.reserved_micros
            if amount_micros > available:
                raise InsufficientCredit("account", amount_micros, available)
            if key.limit_micros is not None:
                key_left = key.limit_micros - key.usage_micros - key.reserved_micros
                if amount_micros > key_left:
                    raise InsufficientCredit("key", amount_micros, key_left)
            # Conditional, so the database itself refuses an overdraft even if the lock above
            # were missing; the row count says whether it applied.
            res = conn.execute(
                update(accounts)
                .where(accounts.c.id == account_id,
                       accounts.c.credits_micros - accounts.c.usage_micros - accounts.c.reserved_micros >= amount_micros)
                .values(reserved_micros=accounts.c.reserved_micros + amount_micros)
            )
            if res.rowcount != 1:
                raise InsufficientCredit("account", amount_micros, available)
            conn.execute(update(api_keys).where(api_keys.c.id == key_id)
                         .values(reserved_micros=api_keys.c.reserved_micros + amount_micros))
            conn.execute(insert(reservations).values(
                id=generation_id, account_id=account_id, key_id=key_id, amount_micros=amount_micros, status="open",
                model=model, instance=self.instance, created_at=utcnow()))

    def settle(self, generation_id: str, cost_micros: int, *, prompt_tokens: int, completion_tokens: int,
               finish_reason: str | None, streamed: bool, cancelled: bool, failed: bool,
               latency_s: float | None) -> int:
        """Charge the real cost, release the rest of the reservation and write the usage record,
        in one transaction. Returns the micro-USD charged (never more than was reserved).

        Idempotent: settling a reservation that is already closed (settled, or released by crash
        recovery) charges nothing more and returns what was charged then."""
        _check_amount(cost_micros, allow_zero=True)
        with self._write() as conn:
            r = conn.execute(select(reservations).where(reservations.c.id == generation_id)).first()
            if r is None:
                raise NotFound(f"reservation {generation_id} not found")
            self._lock_account(conn, r.account_id)
            self._lock_key(conn, r.key_id)
            charge = min(cost_micros, r.amount_micros)
            if charge < cost_micros:
                log.warning("generation %s cost %d > reserved %d; charging the reservation", generation_id,
                            cost_micros, r.amount_micros)
            closed = conn.execute(
                update(reservations).where(reservations.c.id == generation_id, reservations.c.status == "open")
                .values(status="settled", charged_micros=charge, closed_at=utcnow())
            ).rowcount
            if closed != 1:  # closed before (a second settle, or released at start-up): no second charge
                again = conn.execute(select(reservations.c.charged_micros).where(reservations.c.id == generation_id))
                return again.scalar_one() or 0
            now = utcnow()
            conn.execute(update(accounts).where(accounts.c.id == r.account_id).values(
                reserved_micros=accounts.c.reserved_micros - r.amount_micros,
                usage_micros=accounts.c.usage_micros + charge))
            conn.execute(update(api_keys).where(api_keys.c.id == r.key_id).values(
                reserved_micros=api_keys.c.reserved_micros - r.amount_micros,
                usage_micros=api_keys.c.usage_micros + charge, last_used_at=now))
            if charge:
                conn.execute(insert(ledger).values(account_id=r.account_id, key_id=r.key_id, kind="usage",
                                                   amount_micros=-charge, generation_id=generation_id, created_at=now))
            conn.execute(insert(generations).values(
                id=generation_id, account_id=r.account_id, key_id=r.key_id, model=r.model,
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_micros=charge,
                latency_s=latency_s, finish_reason=finish_reason, streamed=streamed, cancelled=cancelled,
                failed=failed, created_at=now))
        return charge

    def release_open_reservations(self, *, all_instances: bool = False) -> int:
        """Crash recovery, called at server start: release every reservation this instance left
        open (all instances' with all_instances=True), charging nothing. Each is closed in its own
        transaction, guarded by status='open', so running it twice (or concurrently with a late
        settle) never releases or charges anything twice. Returns how many were released."""
        stmt = select(reservations.c.id).where(reservations.c.status == "open")
        if not all_instances:
            stmt = stmt.where(reservations.c.instance == self.instance)
        with self._read() as conn:
            ids = conn.execute(stmt).scalars().all()
        released = 0
        for gid in ids:
            with self._write() as conn:
                r = conn.execute(select(reservations).where(reservations.c.id == gid)).one()
                self._lock_account(conn, r.account_id)
                self._lock_key(conn, r.key_id)
                n = conn.execute(update(reservations).where(reservations.c.id == gid, reservations.c.status == "open")
                                 .values(status="released", charged_micros=0, closed_at=utcnow())).rowcount
                if n != 1:
                    continue
                conn.execute(update(accounts).where(accounts.c.id == r.account_id)
                             .values(reserved_micros=accounts.c.reserved_micros - r.amount_micros))
                conn.execute(update(api_keys).where(api_keys.c.id == r.key_id)
                             .values(reserved_micros=api_keys.c.reserved_micros - r.amount_micros))
                # The usage record says the request died with the server and cost nothing.
                exists = conn.execute(select(generations.c.id).where(generations.c.id == gid)).first()
                if exists is None:
                    conn.execute(insert(generations).values(
                        id=gid, account_id=r.account_id, key_id=r.key_id, model=r.model, prompt_tokens=0,
                        completion_tokens=0, cost_micros=0, latency_s=None, finish_reason=None, streamed=False,
                        cancelled=False, failed=True, created_at=utcnow()))
                released += 1
        if released:
            log.warning("released %d reservation(s) left open by a previous run of %s", released, self.instance)
        return released

    # -- usage records --------------------------------------------------------------------------

    def record_generation(self, generation_id: str, *, model: str, prompt_tokens: int, completion_tokens: int,
                          cost_micros: int, finish_reason: str | None, streamed: bool, cancelled: bool, failed: bool,
                          latency_s: float | None) -> None:
        """A usage record with no account (the server runs with --no-auth): nothing is charged."""
        with self._write() as conn:
            conn.execute(insert(generations).values(
                id=generation_id, account_id=None, key_id=None, model=model, prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens, cost_micros=cost_micros, latency_s=latency_s,
                finish_reason=finish_reason, streamed=streamed, cancelled=cancelled, failed=failed,
                created_at=utcnow()))

    def get_generation(self, generation_id: str) -> GenerationRecord | None:
        with self._read() as conn:
            row = conn.execute(select(generations).where(generations.c.id == generation_id)).first()
        if row is None:
            return None
        return GenerationRecord(row.id, row.account_id, row.key_id, row.model, row.prompt_tokens,
                                row.completion_tokens, row.cost_micros, row.latency_s, row.finish_reason,
                                bool(row.streamed), bool(row.cancelled), bool(row.failed), row.created_at)

    def audit(self, account_id: int) -> dict[str, int]:
        """Counters vs journal, for tests and operators: the two must agree."""
        with self._read() as conn:
            acct = conn.execute(select(accounts).where(accounts.c.id == account_id)).one()
            journal = conn.execute(select(func.coalesce(func.sum(ledger.c.amount_micros), 0))
                                   .where(ledger.c.account_id == account_id)).scalar_one()
            open_sum = conn.execute(select(func.coalesce(func.sum(reservations.c.amount_micros), 0))
                                    .where(reservations.c.account_id == account_id,
                                           reservations.c.status == "open")).scalar_one()
            open_n = conn.execute(select(func.count()).where(reservations.c.account_id == account_id,
                                                             reservations.c.status == "open")).scalar_one()
            charged = conn.execute(select(func.coalesce(func.sum(reservations.c.charged_micros), 0))
                                   .where(reservations.c.account_id == account_id)).scalar_one()
        return {
            "balance_micros": acct.credits_micros - acct.usage_micros,
            "journal_micros": int(journal),
            "reserved_micros": acct.reserved_micros,
            "open_reservations_micros": int(open_sum),
            "open_reservations": int(open_n),
            "usage_micros": acct.usage_micros,
            "charged_micros": int(charged),
        }


def _check_amount(micros: int, *, allow_zero: bool = False) -> None:
    if not isinstance(micros, int) or isinstance(micros, bool):
        raise TypeError(f"amounts are integer micro-USD, got {type(micros).__name__}")
    if micros < 0 or (micros == 0 and not allow_zero):
        raise ValueError(f"amount must be {'>= 0' if allow_zero else '> 0'} micro-USD, got {micros}")
