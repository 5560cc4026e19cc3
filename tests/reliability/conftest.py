"""Fixtures: `gpt2serve serve` as a subprocess on 127.0.0.1 (random:gpt2-tiny), driven by the
stress suite's phases (stress/) with small numbers, so CI runs the same checks as the long script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the stress suite is a folder of scripts, not an installed package

from stress.common import Server  # noqa: E402

UNLIMITED = {"GPT2SERVE_RATE_LIMIT_RPM": "0", "GPT2SERVE_RATE_LIMIT_TPM": "0"}


def show(name: str, result: dict) -> None:
    """The phase's figures in the test output (pytest -s, or on failure)."""
    print(f"\n{name}: " + json.dumps({k: v for k, v in result.items() if k not in ("results", "per_operation")},
                                     default=str)[:3000])


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One server with auth on and rate limits off, shared by the bad-input, load and disconnect tests."""
    with Server(tmp_path_factory.mktemp("reliability"), env=UNLIMITED) as s:
        yield s


@pytest.fixture(scope="session")
def key(server) -> str:
    return server.create_key(1000.0)
