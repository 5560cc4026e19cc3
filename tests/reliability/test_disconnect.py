"""Disconnect storm: 150 clients leave mid-stream, before the first byte or while queued; the server
ends idle with every KV block free and bills each for what it generated (stress/disconnect.py)."""

from __future__ import annotations

from stress import disconnect

from .conftest import show


def test_disconnect_storm(server):
    key = server.create_key(100.0)  # a fresh account: its usage is the storm's alone
    res = disconnect.storm(server, key, clients=150, concurrency=32, seed=3)
    show("disconnect", res)
    assert all(n > 0 for n in res["modes"].values()), res["modes"]
    assert res["running_after"] == 0 and res["waiting_after"] == 0
    assert res["kv_blocks_free_after"] == res["kv_blocks_free_before"]
    assert res["open_reservations"] == 0
    assert res["completion_tokens_billed"] == res["completion_tokens_generated"]
    assert res["billed_micros"] == res["account_usage_micros"]
    assert not res["failures"], "\n".join(res["failures"])
