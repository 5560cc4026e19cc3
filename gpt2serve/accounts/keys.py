"""API keys: `sk-` + 48 hex characters (192 random bits), stored only as sha256 + a short prefix.

A plain sha256 is enough (no bcrypt/scrypt): the secret is 192 random bits, not a guessable
password, so there is nothing for a slow hash to protect against. The plaintext exists only in
the return value of `new_key()`; nothing here logs it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_RE = re.compile(r"^sk-[0-9a-f]{48}$")
PREFIX_LEN = len("sk-") + 8


def new_key() -> str:
    return "sk-" + secrets.token_hex(24)


def looks_like_key(text: str) -> bool:
    return bool(KEY_RE.match(text))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def prefix_of(key: str) -> str:
    return key[:PREFIX_LEN]


def same_hash(a: str, b: str) -> bool:
    # Constant-time: the time taken does not reveal how many leading characters match.
    return hmac.compare_digest(a.encode(), b.encode())
