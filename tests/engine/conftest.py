"""A tiny random GPT-2 (our loader's `random:gpt2-tiny`) and the same weights in transformers."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny():
    from gpt2serve.model.loader import load_model

    return load_model("random:gpt2-tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_tiny(tiny):
    import transformers

    c = tiny.config
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size, n_positions=c.n_positions)
    ).eval()
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") or k.endswith("masked_bias") for k in missing), (missing, unexpected)
    return hf


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(T, V) log-softmax of transformers' logits over one sequence."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
