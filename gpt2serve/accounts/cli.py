"""`gpt2serve keys create|list|revoke|credit`: operator commands on the accounts database.

    gpt2serve keys create --credit 5 --label ci          # new account with $5, prints its key once
    gpt2serve keys create --account 3 --limit 0.50       # another key on account 3, capped at $0.50
    gpt2serve keys list [--account 3]
    gpt2serve keys revoke sk-1a2b3c4d                     # by prefix (as listed) or key id
    gpt2serve keys credit 3 10                            # add $10 to account 3

Amounts are USD decimals, converted exactly to integer micro-USD. The database schema is migrated
first, so these work on a fresh database. --database-url defaults to $GPT2SERVE_DATABASE_URL or
sqlite:///gpt2serve.db.
"""

from __future__ import annotations

import argparse
import os
import sys

from gpt2serve.accounts.pricing import micros_from_usd, usd
from gpt2serve.accounts.store import AccountsError, AccountStore, KeyInfo


def _usd_arg(text: str) -> int:
    try:
        micros = micros_from_usd(text)
    except Exception as e:  # decimal.InvalidOperation or ValueError
        raise argparse.ArgumentTypeError(f"not a USD amount: {text!r} ({e})") from None
    if micros < 0:
        raise argparse.ArgumentTypeError("amounts must be >= 0")
    return micros


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2serve keys", description="Manage API keys, accounts and credit.")
    p.add_argument("--database-url", default=os.environ.get("GPT2SERVE_DATABASE_URL", "sqlite:///gpt2serve.db"),
                   help="SQLAlchemy URL (default: $GPT2SERVE_DATABASE_URL or sqlite:///gpt2serve.db)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create a key (and an account, unless --account); prints the key once")
    c.add_argument("--account", type=int, help="add the key to this existing account")
    c.add_argument("--credit", type=_usd_arg, default=0, help="USD credit of the new account (default 0)")
    c.add_argument("--label")
    c.add_argument("--limit", type=_usd_arg, help="the key's own spending limit in USD")
    c.add_argument("--name", help="name of the new account")
    ls = sub.add_parser("list", help="list keys (prefix, account, label, limit, usage, state)")
    ls.add_argument("--account", type=int)
    ls.add_argument("--active", action="store_true", help="hide revoked keys")
    r = sub.add_parser("revoke", help="revoke a key by its prefix (sk-xxxxxxxx) or id")
    r.add_argument("key")
    cr = sub.add_parser("credit", help="add USD credit to an account")
    cr.add_argument("account", type=int)
    cr.add_argument("amount", type=_usd_arg)
    cr.add_argument("--note", default="operator credit")
    return p


def _row(k: KeyInfo) -> str:
    limit = "-" if k.limit_micros is None else "$" + usd(k.limit_micros)
    state = "revoked" if k.revoked_at else "active"
    return f"{k.key_id:>5}  {k.prefix:<12} {k.account_id:>7}  {state:<8} {limit:>10} {'$' + usd(k.usage_micros):>12}  {k.label or ''}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    store = AccountStore(args.database_url)
    try:
        store.migrate()
        if args.cmd == "create":
            if args.account is None:
                account_id = store.create_account(credit_micros=args.credit, name=args.name)
            else:
                if args.credit:
                    store.add_credit(args.account, args.credit, note="operator credit")
                account_id = args.account
            plaintext, info = store.create_key(account_id, label=args.label, limit_micros=args.limit)
            acct = store.get_account(account_id)
            print(plaintext)
            print(f"account {account_id}  key {info.prefix} (id {info.key_id})  credit ${usd(acct.available_micros)}"
                  "  -- store the key now: it is not shown again", file=sys.stderr)
        elif args.cmd == "list":
            print(f"{'id':>5}  {'prefix':<12} {'account':>7}  {'state':<8} {'limit':>10} {'usage':>12}  label")
            for k in store.list_keys(args.account, include_revoked=not args.active):
                print(_row(k))
        elif args.cmd == "revoke":
            info = store.revoke_key(args.key)
            print(f"revoked {info.prefix} (id {info.key_id}, account {info.account_id})")
        elif args.cmd == "credit":
            acct = store.add_credit(args.account, args.amount, note=args.note)
            print(f"account {acct.account_id}: credits ${usd(acct.credits_micros)}, usage ${usd(acct.usage_micros)}, "
                  f"available ${usd(acct.available_micros)}")
    except AccountsError as e:
        print(f"gpt2serve keys: {e}", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
