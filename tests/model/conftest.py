from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import shared_data_or_fail


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_or_fail()
