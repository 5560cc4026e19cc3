"""The ledger's tables (SQLAlchemy 2 declarative). Money is integer micro-USD everywhere.

An account's money is three counters, never a float and never a stored balance:
    available = credits_micros - usage_micros - reserved_micros
`credits_micros` only grows (sign-up credit, `gpt2serve keys credit`), `usage_micros` grows at each
settle, `reserved_micros` is the sum of the account's open reservations. `ledger_entries` is the
append-only journal behind the first two (sum(amount) == credits - usage), so the counters can be
audited. Schema changes go through an Alembic revision in migrations/versions, never create_all.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so later migrations can drop/alter them on both SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    # Naive UTC: SQLite has no time zones, so both backends store and compare the same values.
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    credits_micros: Mapped[int] = mapped_column(BigInteger, default=0)  # all credit ever added
    usage_micros: Mapped[int] = mapped_column(BigInteger, default=0)  # all settled charges
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0)  # sum of open reservations
    signup_address: Mapped[str | None] = mapped_column(String(64))  # client address of POST /v1/signup
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (Index("ix_accounts_signup_address_created_at", "signup_address", "created_at"),)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    # "sk-" + the first 8 characters of the secret: shown in listings, used to find candidate rows
    # without putting the secret (or its hash) in a WHERE clause.
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the whole key
    label: Mapped[str | None] = mapped_column(String(200))
    limit_micros: Mapped[int | None] = mapped_column(BigInteger)  # per-key spending cap; None = account's credit
    usage_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


class LedgerEntry(Base):
    """Append-only journal: +credit, -usage. One usage entry per generation at most (unique)."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    kind: Mapped[str] = mapped_column(String(16))  # "credit" | "usage"
    amount_micros: Mapped[int] = mapped_column(BigInteger)  # signed
    # NULL for credits; the unique constraint is the database's own guard against double charging.
    generation_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    note: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Reservation(Base):
    """Worst-case cost held while a generation runs: open -> settled | released."""

    __tablename__ = "reservations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the generation id
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    charged_micros: Mapped[int | None] = mapped_column(BigInteger)  # set when settled
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)
    model: Mapped[str] = mapped_column(String(200))
    instance: Mapped[str] = mapped_column(String(200))  # server that holds it (crash recovery scope)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime)


class Generation(Base):
    """One usage record per completion request (GET /v1/generation)."""

    __tablename__ = "generations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"), index=True)  # None: --no-auth
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_s: Mapped[float | None] = mapped_column(Float)  # a duration, not money
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    streamed: Mapped[bool] = mapped_column(Boolean, default=False)
    cancelled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
