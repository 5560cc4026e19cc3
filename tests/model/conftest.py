"""Shared helpers for the model tests: the shared data folder and a one-prompt forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2serve.model.gpt2 import AttentionMetadata, KVCache

REPO_ROOT = Path(__file__).resolve().parents[2]
# the team's data sits next to the repo (../shared/data), also from a CI clone
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "eval").is_dir() or not (SHARED_DATA / "gpt2-tokenizer").is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (expected ../shared/data next to the repo root "
                    f"{REPO_ROOT}, with eval/ and gpt2-tokenizer/)")
    return SHARED_DATA


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) of one prompt `ids` (T,), prefilled from position 0 in a fresh cache."""
    T = ids.shape[0]
    p = next(model.parameters())
    block_size = 16
    cache = KVCache(model.config, (T + block_size - 1) // block_size, block_size, p.dtype, p.device)
    meta = AttentionMetadata(0, torch.arange(T, device=p.device), None, None, [(0, T, None, None)])
    hidden = model(ids.to(p.device), torch.arange(T, device=p.device), cache, meta)
    return model.logits(hidden)
