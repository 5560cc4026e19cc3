"""Bad input: no 5xx, no crash, every 4xx in OpenAI's shape naming the parameter (stress/badinput.py)."""

from __future__ import annotations

from stress import badinput

from .conftest import show


def test_hostile_requests(server, key):
    res = badinput.hostile(server, key)
    show("hostile", res)
    assert res["cases"] >= 90
    assert "500" not in res["statuses"]
    assert not res["failures"], "\n".join(res["failures"])
    assert server.alive()


def test_schemathesis_fuzz_of_every_operation(server, key):
    res = badinput.fuzz(server, key, cases=300, seed=1)
    show("fuzz", res)
    assert res["cases"] >= 300
    assert res["operations"] >= 10
    assert res["generated_200"] >= 10  # the fuzz reached the engine, not only the validators
    assert res["five_xx"] == 0 and res["bad_error_shape"] == 0, "\n".join(res["failures"])
    assert server.alive()
