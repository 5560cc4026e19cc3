"""Limits under full load: oversized prompts, max_tokens beyond the context and oversized bodies get
400/413, /health stays up; the queue cap gets 429 (stress/limits.py)."""

from __future__ import annotations

import pytest

from stress import limits
from stress.common import Server

from .conftest import UNLIMITED, show


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("limits"), env=UNLIMITED, name="limits",
                args=["--max-num-seqs", "2", "--max-queue", "4"]) as s:
        res = limits.limits(s, s.create_key(100.0), max_num_seqs=2, max_queue=4, extra=8)
        show("limits", res)
        yield res


def test_refusals_and_health_under_full_load(full):
    assert [c["status"] for c in full["refusals"]] == [400, 400, 400, 413, 400]
    assert full["health_not_200"] == 0
    assert not full["failures"], "\n".join(full["failures"])


def test_queue_beyond_its_cap_gets_429(full):
    # 2 running + 4 waiting fill the engine: each of the 8 more gets 429 overloaded with Retry-After
    assert full["overloaded_429"] >= 8, full["health_when_full"]
    assert full["health_when_full"]["waiting"] <= 4
