"""Helpers for the model tests (imported relatively, so any pytest invocation finds them)."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2serve.model.gpt2 import AttentionMetadata, KVCache

REPO_ROOT = Path(__file__).resolve().parents[2]
# the team's data sits next to the repo (../shared/data), also from a CI clone
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data_or_fail() -> Path:
    import pytest

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


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, biases and LayerNorms included (HF's init zeroes the biases, which
    would hide a bias loaded into the wrong place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ".ln_" in name and name.endswith("weight") else 0.05 * noise)
    return model
