"""Small builders shared by the accounts tests."""

from __future__ import annotations

from gpt2serve.accounts.store import AccountStore


def new_key(store: AccountStore, credit_micros: int, **kw):
    """A fresh account with `credit_micros` and one key: (plaintext, KeyRecord)."""
    account_id = store.create_account(credit_micros=credit_micros)
    plaintext, _ = store.create_key(account_id, **kw)
    return plaintext, store.authenticate(plaintext)
