"""Abuse: 1,000 requests with bad keys (0 accepted), a sign-up flood (rate-limited), key-check
timing (medians of near-miss and random keys agree), no secrets in the log (stress/abuse.py)."""

from __future__ import annotations

from stress import abuse
from stress.common import Server

from .conftest import UNLIMITED, show


def test_bad_keys_signup_flood_timing_and_logs(tmp_path):
    # its own server: the sign-up count per address lives in its database
    with Server(tmp_path, env=UNLIMITED, name="abuse") as s:
        res = abuse.abuse(s, requests=1000, signups=30, timing_rounds=150, seed=2)
    show("abuse", res)
    assert res["accepted"] == 0
    assert set(res["statuses"]) <= {"401", "404"}
    assert res["signup_statuses"].get("200", 0) <= res["signup_limit_per_hour"]
    assert res["signup_statuses"].get("429", 0) >= 30 - res["signup_limit_per_hour"]
    # distributions, not a stopwatch: the medians of the wrong-key classes within x1.5 of each other
    assert all(1 / abuse.TIMING_RATIO <= r <= abuse.TIMING_RATIO for r in res["timing"]["ratios"].values()), res["timing"]
    assert res["keys_in_log"] == 0 and res["prompt_lines_in_log"] == 0
    assert not res["failures"], "\n".join(res["failures"])
