"""Checkpoint loading: the folders users have, Hub ids via the cache, random:<id>, and damage."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from gpt2serve.model.gpt2 import GPT2LMHeadModel
from gpt2serve.model.loader import CheckpointError, ModelNotAvailable, load_model
from gpt2serve.model.tokenizer import Tokenizer
from .helpers import forward_logits, randomize

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)


def hf_model(**cfg) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, attn_implementation="eager"))
    return randomize(m).eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.fixture(scope="module")
def tiny_hf():
    return hf_model(**TINY)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50257, (37,), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_dir(tmp_path, tiny_hf):
    folder = tmp_path / "tiny"
    tiny_hf.save_pretrained(folder)
    return folder


def assert_same_logits(loaded, hf, ids, tol=1e-4):
    diff = (forward_logits(loaded.model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= tol, diff


# -- folders that load ---------------------------------------------------------------------------


def test_save_pretrained_safetensors(tiny_dir, tiny_hf, ids):
    assert (tiny_dir / "model.safetensors").is_file()
    lm = load_model(str(tiny_dir))
    assert lm.name == "tiny" and lm.random_weights is False and lm.source == str(tiny_dir)
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert lm.num_parameters == sum(p.numel() for n, p in tiny_hf.named_parameters() if n != "lm_head.weight")
    assert lm.config.n_layer == 2 and lm.config.n_embd == 64 and lm.config.n_positions == 128
    assert not lm.model.training
    assert lm.tokenizer.source.endswith("assets/gpt2")  # the folder has no tokenizer files
    assert_same_logits(lm, tiny_hf, ids)


def test_pytorch_model_bin(tmp_path, tiny_hf, ids):
    # transformers 5 writes safetensors even with safe_serialization=False, so write the .bin as
    # older versions did: torch.save of the whole state dict, tied lm_head.weight and mask buffers included
    folder = tmp_path / "bin"
    tiny_hf.config.save_pretrained(folder)
    sd = dict(tiny_hf.state_dict())
    for i in range(TINY["n_layer"]):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128, dtype=torch.bool))[None, None]
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert "lm_head.weight" in sd
    torch.save(sd, folder / "pytorch_model.bin")
    lm = load_model(str(folder))
    assert_same_logits(lm, tiny_hf, ids)


def test_hub_style_keys_without_prefix(tmp_path, tiny_hf, ids):
    # the Hub's openai-community/gpt2 files: "h.0.attn.c_attn.weight", "wte.weight", mask buffers kept
    folder = tmp_path / "hubstyle"
    tiny_hf.config.save_pretrained(folder)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in tiny_hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(TINY["n_layer"]):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128))[None, None]
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert not any(k.startswith("transformer.") for k in sd)
    save_file(sd, folder / "model.safetensors")
    lm = load_model(str(folder))
    assert_same_logits(lm, tiny_hf, ids)


def test_sharded_safetensors(tmp_path, tiny_hf, ids):
    folder = tmp_path / "sharded"
    tiny_hf.save_pretrained(folder, max_shard_size="1MB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert_same_logits(load_model(str(folder)), tiny_hf, ids)


def test_folder_tokenizer_files_are_used(tiny_dir, shared_data):
    shutil.copy(shared_data / "gpt2-tokenizer" / "tokenizer.json", tiny_dir)
    lm = load_model(str(tiny_dir))
    assert lm.tokenizer.source == str(tiny_dir)
    assert lm.tokenizer.encode("Hello world") == [15496, 995]


def test_dtypes_and_devices(tiny_dir, tiny_hf, ids):
    bf = load_model(str(tiny_dir), dtype="bfloat16")
    assert bf.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf.model.parameters())
    auto = load_model(str(tiny_dir), dtype="auto", device="auto")
    expected = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert auto.dtype == expected and auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    q = load_model(str(tiny_dir), dtype="int8")  # the engine quantises; weights arrive in float32
    assert q.dtype == "int8" and all(p.dtype == torch.float32 for p in q.model.parameters())
    assert_same_logits(q, tiny_hf, ids)
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tiny_dir), dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="float16 is for CUDA"):
            load_model(str(tiny_dir), dtype="float16")
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(str(tiny_dir), device="cuda")
    with pytest.raises(ValueError, match="device"):
        load_model(str(tiny_dir), device="tpu")


# -- random:<id> -------------------------------------------------------------------------------


def test_random_tiny():
    a = load_model("random:gpt2-tiny")
    assert a.name == "gpt2-tiny" and a.random_weights is True and a.source == "random:gpt2-tiny"
    assert a.tokenizer is Tokenizer.default() and a.config.vocab_size == 50257
    assert not a.model.training
    b = load_model("random:gpt2-tiny")
    ids = torch.arange(10)
    assert torch.equal(forward_logits(a.model, ids), forward_logits(b.model, ids))  # same seed, same weights
    ref = GPT2LMHeadModel(a.config).init_random(0)  # the lead's init, unchanged by the loader's allocation
    assert all(torch.equal(p, q) for p, q in zip(ref.state_dict().values(), a.model.state_dict().values()))
    assert load_model("random:gpt2-tiny", seed=1).model.transformer.wte.weight.ne(a.model.transformer.wte.weight).any()


def test_random_gpt2_is_the_real_shape():
    lm = load_model("random:openai-community/gpt2", dtype="bfloat16")
    assert lm.name == "gpt2" and lm.random_weights
    assert lm.num_parameters == 124_439_808  # GPT-2 124M, lm_head tied
    assert lm.dtype == torch.bfloat16


def test_random_unknown_family():
    with pytest.raises(CheckpointError, match="unknown model family 'gpt3'.*random:gpt2"):
        load_model("random:gpt3")


# -- Hub ids -------------------------------------------------------------------------------------


def _fake_hub_cache(cache, repo: str, src) -> None:
    """The layout huggingface_hub leaves after a download: models--owner--name/{refs/main, snapshots/<sha>/}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    shutil.copytree(src, root / "snapshots" / sha)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_id_from_cache(tmp_path, tiny_dir, tiny_hf, ids, offline):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "openai-community/gpt2", tiny_dir)
    for spec in ("gpt2", "openai-community/gpt2"):
        lm = load_model(spec, cache_dir=cache)
        assert lm.name == "gpt2" and not lm.random_weights
        assert "models--openai-community--gpt2" in lm.source
        assert_same_logits(lm, tiny_hf, ids)
    _fake_hub_cache(cache, "someone/my-gpt2", tiny_dir)
    assert load_model("someone/my-gpt2", cache_dir=cache).name == "someone/my-gpt2"


def test_hub_id_offline_and_not_cached(tmp_path, offline):
    with pytest.raises(ModelNotAvailable, match=r"'gpt2-medium'.*offline.*local folder.*random:gpt2-medium"):
        load_model("gpt2-medium", cache_dir=tmp_path)
    assert issubclass(ModelNotAvailable, CheckpointError) and issubclass(CheckpointError, ValueError)


def test_missing_local_path(tiny_dir):
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_model("./no/such/folder")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a folder"):
        load_model(str(tiny_dir / "model.safetensors"))


# -- damaged checkpoints: the error names the file and the key ---------------------------------------


def _rewrite(folder, edit) -> None:
    path = folder / "model.safetensors"
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


def test_truncated_safetensors(tiny_dir):
    path = tiny_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_model(str(tiny_dir))


def test_truncated_bin(tmp_path, tiny_hf):
    folder = tmp_path / "bin"
    tiny_hf.config.save_pretrained(folder)
    torch.save(tiny_hf.state_dict(), folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) - 4096])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*truncated or corrupt"):
        load_model(str(folder))


def test_missing_key(tiny_dir):
    _rewrite(tiny_dir, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing key\(s\) 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        load_model(str(tiny_dir))


def test_c_attn_bias_is_not_a_mask_buffer(tiny_dir):
    # dropping *.attn.bias buffers must not swallow the real c_attn.bias
    _rewrite(tiny_dir, lambda sd: sd.pop("transformer.h.0.attn.c_attn.bias"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) 'transformer\.h\.0\.attn\.c_attn\.bias'"):
        load_model(str(tiny_dir))


def test_unexpected_key(tiny_dir):
    _rewrite(tiny_dir, lambda sd: sd.update({"transformer.h.0.attn.q_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected key\(s\) 'transformer\.h\.0\.attn\.q_proj\.weight'"):
        load_model(str(tiny_dir))


def test_wrong_shape(tiny_dir):
    _rewrite(tiny_dir, lambda sd: sd.update({"transformer.h.1.attn.c_proj.weight": torch.zeros(64, 63)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key 'transformer\.h\.1\.attn\.c_proj\.weight' has shape \(64, 63\), expected \(64, 64\)"):
        load_model(str(tiny_dir))


def test_transposed_conv1d_weight_is_a_shape_error(tiny_dir):
    # a checkpoint exported as nn.Linear (out, in) would be silently wrong if square; c_fc is not
    _rewrite(tiny_dir, lambda sd: sd.update({"transformer.h.0.mlp.c_fc.weight": sd["transformer.h.0.mlp.c_fc.weight"].T.contiguous()}))
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.mlp\.c_fc\.weight' has shape \(256, 64\), expected \(64, 256\)"):
        load_model(str(tiny_dir))


def test_untied_lm_head(tiny_dir):
    _rewrite(tiny_dir, lambda sd: sd.update({"lm_head.weight": torch.zeros_like(sd["transformer.wte.weight"])}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key 'lm_head\.weight' is not tied"):
        load_model(str(tiny_dir))


def test_tied_lm_head_copy_is_accepted(tiny_dir, tiny_hf, ids):
    _rewrite(tiny_dir, lambda sd: sd.update({"lm_head.weight": sd["transformer.wte.weight"].clone()}))
    assert_same_logits(load_model(str(tiny_dir)), tiny_hf, ids)


def test_duplicate_key_with_and_without_prefix(tiny_dir):
    _rewrite(tiny_dir, lambda sd: sd.update({"ln_f.weight": sd["transformer.ln_f.weight"].clone()}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: keys '(transformer\.)?ln_f\.weight' and '(transformer\.)?ln_f\.weight' .* given twice"):
        load_model(str(tiny_dir))


def test_nan_weights(tiny_dir):
    def poison(sd):
        sd["transformer.h.0.ln_1.weight"][3] = float("nan")
    _rewrite(tiny_dir, poison)
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.ln_1\.weight' holds NaN"):
        load_model(str(tiny_dir))


def _edit_config(folder, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_config_disagrees_with_weights(tiny_dir):
    _edit_config(tiny_dir, n_layer=3)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing key\(s\) 'transformer\.h\.2\..*config\.json \(n_layer=3"):
        load_model(str(tiny_dir))


def test_config_n_positions_mismatch(tiny_dir):
    _edit_config(tiny_dir, n_positions=1024, n_ctx=1024)
    with pytest.raises(CheckpointError, match=r"'transformer\.wpe\.weight' has shape \(128, 64\), expected \(1024, 64\)"):
        load_model(str(tiny_dir))


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda f: (f / "config.json").write_text("{ not json"), r"config\.json: cannot read the model config"),
        (lambda f: _edit_config(f, n_head=5), r"config\.json: n_embd \(64\) is not divisible by n_head \(5\)"),
        (lambda f: _edit_config(f, model_type="llama"), r"config\.json: model_type is 'llama'"),
        (lambda f: _edit_config(f, n_layer=-1), r"config\.json: n_layer must be a positive integer"),
        (lambda f: _edit_config(f, vocab_size=1000), r"config\.json: vocab_size 1000 is smaller than the tokenizer's 50257"),
        (lambda f: _edit_config(f, tie_word_embeddings=False), r"config\.json: tie_word_embeddings is false"),
        (lambda f: (f / "config.json").unlink(), r"config\.json: missing"),
        (lambda f: (f / "model.safetensors").unlink(), r"no weights found"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 100), r"model\.safetensors: cannot read the weights"),
    ],
    ids=["json", "heads", "model_type", "n_layer", "vocab", "untied", "no_config", "no_weights", "garbage"],
)
def test_bad_folder(tiny_dir, write, message):
    write(tiny_dir)
    with pytest.raises(CheckpointError, match=message):
        load_model(str(tiny_dir))


def test_model_built_by_loader_has_no_meta_tensors(tiny_dir):
    lm = load_model(str(tiny_dir))
    assert isinstance(lm.model, GPT2LMHeadModel)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in lm.model.parameters())
    # the loader builds on the meta device and assigns the checkpoint's tensors: a buffer would stay empty
    assert all(not t.is_meta for t in list(lm.model.parameters()) + list(lm.model.buffers()))
