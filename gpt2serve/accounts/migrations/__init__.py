"""Alembic migrations of the accounts schema, shipped inside the package and run programmatically.

`AccountStore.migrate()` calls `upgrade(engine)` at server start; operators can also run Alembic's
own CLI against `alembic.ini`-less configs via `python -m gpt2serve.accounts.migrations URL [REV]`.
New revision: `python -m gpt2serve.accounts.migrations URL --autogenerate "message"`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent
VERSION_TABLE = "gpt2serve_alembic_version"


def config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    # render_as_batch etc. read this in env.py; the URL is only informative (the engine is passed).
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=True))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(config(engine), revision)


def current(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


if __name__ == "__main__":  # pragma: no cover - operator tool
    url, *rest = sys.argv[1:]
    eng = create_engine(url)
    if rest and rest[0] == "--autogenerate":
        command.revision(config(eng), message=rest[1], autogenerate=True)
    else:
        upgrade(eng, rest[0] if rest else "head")
