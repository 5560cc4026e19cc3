"""Accounts and billing: API keys (hashed), a credit ledger in integer micro-USD (reserve before a
generation, settle after), usage records, per-key rate limits. SQLAlchemy + Alembic; no FastAPI.

    store = AccountStore(settings.database_url); store.migrate(); store.release_open_reservations()
    billing = Billing(store, Pricing(settings.price_prompt_micros, settings.price_completion_micros),
                      settings.rate_limit_rpm, settings.rate_limit_tpm)
"""

from gpt2serve.accounts.billing import Billing, Reservation
from gpt2serve.accounts.pricing import Pricing, micros_from_usd, usd
from gpt2serve.accounts.store import (
    AccountInfo,
    AccountStore,
    GenerationRecord,
    InsufficientCredit,
    KeyInfo,
    KeyRecord,
    KeyRevoked,
    NotFound,
    SignupLimited,
)

__all__ = [
    "AccountInfo", "AccountStore", "Billing", "GenerationRecord", "InsufficientCredit", "KeyInfo", "KeyRecord",
    "KeyRevoked", "NotFound", "Pricing", "Reservation", "SignupLimited", "micros_from_usd", "usd",
]
