"""Per-key requests/min and tokens/min: an in-process sliding-window log.

Why in-process (not the database): these are soft, per-minute limits that protect this server's
engine; checking them costs no I/O on the hot path and adds no write to the ledger per request.
The hard money limit (credit) is enforced in the database, so nothing here can let an account
overspend. Trade-off: with N replicas each enforces its own window (N x the limit in aggregate)
and a restart forgets the last minute; a shared store (Redis) would be the next step.

Tokens are counted at admission as prompt + max_tokens (the worst case, like the credit
reservation) and corrected to the real count when the request settles.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable


@dataclass(eq=False)
class Grant:
    key: Hashable
    t: float
    tokens: int


class RateLimitExceeded(Exception):
    def __init__(self, message: str, retry_after_s: float, headers: dict[str, str]):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers


@dataclass
class _Window:
    log: deque = field(default_factory=deque)  # Grants in admission order (so in time order)
    tokens: int = 0  # sum of log[i].tokens


def _fmt_s(seconds: float) -> str:
    return f"{max(0.0, seconds):.3f}".rstrip("0").rstrip(".") + "s"


class SlidingWindowLimiter:
    def __init__(self, rpm: int, tpm: int, *, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        """rpm / tpm <= 0 means unlimited."""
        self.rpm, self.tpm, self.window_s, self.clock = rpm, tpm, window_s, clock
        self._windows: dict[Hashable, _Window] = {}
        self._lock = threading.Lock()

    def _prune(self, w: _Window, now: float) -> None:
        while w.log and w.log[0].t <= now - self.window_s:
            w.tokens -= w.log.popleft().tokens

    def _headers(self, w: _Window, now: float, extra_tokens: int = 0, extra_requests: int = 0) -> dict[str, str]:
        reset = (w.log[0].t + self.window_s - now) if w.log else 0.0
        h: dict[str, str] = {}
        if self.rpm > 0:
            h["X-RateLimit-Limit-Requests"] = str(self.rpm)
            h["X-RateLimit-Remaining-Requests"] = str(max(0, self.rpm - len(w.log) - extra_requests))
            h["X-RateLimit-Reset-Requests"] = _fmt_s(reset)
        if self.tpm > 0:
            h["X-RateLimit-Limit-Tokens"] = str(self.tpm)
            h["X-RateLimit-Remaining-Tokens"] = str(max(0, self.tpm - w.tokens - extra_tokens))
            h["X-RateLimit-Reset-Tokens"] = _fmt_s(reset)
        return h

    def acquire(self, key: Hashable, tokens: int) -> tuple[Grant, dict[str, str]]:
        """Admit one request of `tokens` (worst case) or raise RateLimitExceeded.
        Returns the grant (to adjust/cancel later) and X-RateLimit-* headers after admission."""
        with self._lock:
            now = self.clock()
            w = self._windows.setdefault(key, _Window())
            self._prune(w, now)
            if self.tpm > 0 and tokens > self.tpm:  # can never fit: say so before anything retryable
                raise RateLimitExceeded(
                    f"This request may use {tokens} tokens (prompt + max_tokens), more than this key's "
                    f"limit of {self.tpm} tokens per minute. Lower max_tokens.", self.window_s, self._headers(w, now))
            if self.rpm > 0 and len(w.log) >= self.rpm:
                retry = w.log[len(w.log) - self.rpm].t + self.window_s - now
                raise RateLimitExceeded(
                    f"Rate limit reached: {self.rpm} requests per minute for this key. Retry in {retry:.1f}s.",
                    retry, self._headers(w, now))
            if self.tpm > 0 and w.tokens + tokens > self.tpm:
                # The earliest time enough old tokens leave the window for this request to fit.
                freed, retry = 0, self.window_s
                for g in w.log:
                    freed += g.tokens
                    if w.tokens - freed + tokens <= self.tpm:
                        retry = g.t + self.window_s - now
                        break
                msg = (f"Rate limit reached: {self.tpm} tokens per minute for this key "
                       f"({w.tokens} used in the last minute, this request may use {tokens}). "
                       f"Retry in {retry:.1f}s.")
                raise RateLimitExceeded(msg, retry, self._headers(w, now))
            grant = Grant(key, now, tokens)
            w.log.append(grant)
            w.tokens += tokens
            return grant, self._headers(w, now)

    def adjust(self, grant: Grant, tokens: int) -> None:
        """Replace a grant's worst-case token count by the real one (if still in the window)."""
        with self._lock:
            w = self._windows.get(grant.key)
            if w is not None and any(g is grant for g in w.log):
                w.tokens += tokens - grant.tokens
            grant.tokens = tokens

    def cancel(self, grant: Grant) -> None:
        """Forget a grant (the request was refused for another reason and did not run)."""
        with self._lock:
            w = self._windows.get(grant.key)
            if w is None:
                return
            for i, g in enumerate(w.log):
                if g is grant:
                    del w.log[i]
                    w.tokens -= g.tokens
                    break
            if not w.log:
                del self._windows[grant.key]
