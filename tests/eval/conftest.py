"""A tiny random GPT-2 saved with transformers (loaded by our code from its folder), and the data
root: the real test files (../shared/data/eval) plus small synthetic files for the sets not here."""

from __future__ import annotations

from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval"
N_POSITIONS = 128  # small context so a few hundred tokens already need several sliding windows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("tiny-gpt2-eval")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=N_POSITIONS)).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    import torch
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "lambada" / "lambada_test.jsonl").is_file():
        pytest.fail(f"the shared evaluation data is missing: {REAL_DATA}")
    return REAL_DATA
