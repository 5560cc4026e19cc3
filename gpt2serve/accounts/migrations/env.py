"""Alembic environment: online migrations over the engine handed in by migrations.upgrade()."""

from __future__ import annotations

from alembic import context

from gpt2serve.accounts.migrations import VERSION_TABLE
from gpt2serve.accounts.models import Base

cfg = context.config
engine = cfg.attributes["engine"]

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        # SQLite can't ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=engine.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
