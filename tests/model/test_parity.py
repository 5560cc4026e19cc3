"""Golden logits: our forward equals transformers.GPT2LMHeadModel on the same random weights.

Tolerances (CPU, measured with these seeds): fp32 max |diff| is ~4e-7 (tiny) and ~6e-6 (124M),
asserted <= 1e-4. bf16 at 124M, against transformers in fp32: max |diff| 0.106 on logits of std 1.4
(max |logit| 7), about what transformers itself shows in bf16 (0.119); asserted <= 0.25, and
the argmax agrees wherever the reference's top-2 gap is > 0.5.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import save_file

from gpt2serve.model.gpt2 import FAMILY, GPT2Config, GPT2LMHeadModel
from gpt2serve.model.loader import load_model
from .helpers import forward_logits, randomize


def _hf(folder) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()


def _ref_logits(hf, ids):
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


@pytest.mark.parametrize(
    "cfg",
    [
        dict(n_layer=2, n_head=4, n_embd=64, n_positions=128),
        dict(n_layer=3, n_head=2, n_embd=48, n_positions=64, layer_norm_epsilon=1e-3, activation_function="gelu"),
    ],
    ids=["tiny", "tiny-erf-gelu-eps1e-3"],
)
def test_tiny_fp32(tmp_path, cfg):
    torch.manual_seed(0)
    hf = randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, attn_implementation="eager"))).eval()
    hf.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    for T in (1, 7, cfg["n_positions"]):  # one token, a short prompt, the whole context
        ids = torch.randint(0, 50257, (T,), generator=g)
        diff = (forward_logits(lm.model, ids) - _ref_logits(hf, ids)).abs().max().item()
        assert diff <= 1e-4, (T, diff)


@pytest.fixture(scope="module")
def gpt2_124m_dir(tmp_path_factory):
    """A 124M-shape checkpoint with every tensor random (biases and LayerNorms too), in HF layout."""
    folder = tmp_path_factory.mktemp("gpt2-124m")
    with torch.device("meta"):  # allocate without an init that randomize() would overwrite
        model = GPT2LMHeadModel(GPT2Config(**FAMILY["gpt2"]))
    model = randomize(model.to_empty(device="cpu"), seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    transformers.GPT2Config().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ids_124m():
    return torch.randint(0, 50257, (64,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ref_124m(gpt2_124m_dir, ids_124m):
    return _ref_logits(_hf(gpt2_124m_dir), ids_124m)


def test_124m_fp32(gpt2_124m_dir, ids_124m, ref_124m):
    lm = load_model(str(gpt2_124m_dir))
    assert lm.num_parameters == 124_439_808
    assert ref_124m.std() > 0.5  # logits of a useful size, not near zero
    diff = (forward_logits(lm.model, ids_124m) - ref_124m).abs().max().item()
    assert diff <= 1e-4, diff


def test_124m_bf16(gpt2_124m_dir, ids_124m, ref_124m):
    lm = load_model(str(gpt2_124m_dir), dtype="bfloat16")
    ours = forward_logits(lm.model, ids_124m)
    assert ours.dtype == torch.float32  # logits always in fp32
    diff = (ours - ref_124m).abs().max().item()
    print(f"bf16 vs fp32 reference: max |diff| {diff:.4f}")
    assert diff <= 0.25, diff
    # greedy picks agree wherever the reference's top-2 gap exceeds twice the tolerance
    top2 = ref_124m.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5
    assert clear.sum() >= 10
    assert torch.equal(ours.argmax(-1)[clear], ref_124m.argmax(-1)[clear])
