"""`gpt2serve keys create|list|revoke|credit` against a real database."""

from __future__ import annotations

from gpt2serve.accounts.cli import main
from gpt2serve.accounts.store import AccountStore


def test_keys_cli_round_trip(db_url, capsys, monkeypatch):
    monkeypatch.setenv("GPT2SERVE_DATABASE_URL", db_url)  # the default --database-url
    assert main(["create", "--credit", "5", "--label", "ci"]) == 0
    key = capsys.readouterr().out.strip()
    assert main(["create", "--account", "1", "--limit", "0.5"]) == 0
    second = capsys.readouterr().out.strip()

    store = AccountStore(db_url)
    try:
        rec = store.authenticate(key)
        assert rec.account_id == 1 and rec.label == "ci" and rec.account_available_micros == 5_000_000
        assert store.authenticate(second).limit_micros == 500_000

        assert main(["--database-url", db_url, "list"]) == 0
        listing = capsys.readouterr().out
        assert key[:11] in listing and key[11:] not in listing and "$0.5" in listing

        assert main(["revoke", key[:11]]) == 0
        assert store.authenticate(key).revoked
        assert main(["credit", "1", "2.25"]) == 0
        assert "available $7.25" in capsys.readouterr().out
        assert store.get_account(1).credits_micros == 7_250_000

        assert main(["revoke", "sk-00000000"]) == 1  # unknown: an error message, not a traceback
        assert "no match" in capsys.readouterr().err
        assert main(["list", "--active"]) == 0
        assert key[:11] not in capsys.readouterr().out
    finally:
        store.dispose()
