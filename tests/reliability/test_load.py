"""Load: 16 streaming clients for 20 s; 0 failed, memory, fds and threads flat (stress/load.py)."""

from __future__ import annotations

from stress import load

from .conftest import show


def test_streaming_clients_under_load(server, key):
    res = load.load(server, key, clients=16, duration=20.0, sample_interval=0.5)
    show("load", res)
    assert res["requests"] >= 16
    assert res["failed"] == 0
    assert res["ttft_s"]["p99"] is not None  # reported
    assert res["health_not_200"] == 0
    assert res["rss_growth_after_warmup"] < 0.05
    assert not res["failures"], "\n".join(res["failures"])
