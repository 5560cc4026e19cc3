"""Checkpoints as users pass them to `--model`: a local folder, a Hub id, or `random:<id>`.

    load_model("path/to/folder")          # Hugging Face layout: config.json + model.safetensors
    load_model("gpt2")                    # the Hub (cache first), also "openai-community/gpt2", "owner/name"
    load_model("random:gpt2")             # random weights of the real 124M shape, the real tokenizer

Loading is assertive (STYLE: principle 3): the checkpoint must hold exactly the model's tensors,
shape for shape. The model keeps the checkpoint's Conv1D (in, out) layout, so nothing is
transposed; keys may carry the `transformer.` prefix or not; the causal-mask buffers
(`h.N.attn.bias`, `h.N.attn.masked_bias`) are dropped; `lm_head.weight` is dropped when it is a copy
of `wte` (tied). Anything else -- a missing, extra or mis-shaped tensor, an unreadable file, a bad
config -- raises `CheckpointError` naming the file and the key. There is no partial load.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2serve.model.gpt2 import FAMILY, GPT2Config, GPT2LMHeadModel
from gpt2serve.model.tokenizer import Tokenizer, TokenizerError


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the key."""


class ModelNotAvailable(CheckpointError):
    """A Hub id that is neither in the local cache nor downloadable (offline, unknown repo, ...)."""


@dataclass
class LoadedModel:
    model: GPT2LMHeadModel
    config: GPT2Config
    tokenizer: Tokenizer
    name: str  # the id users see, e.g. "gpt2" (see random_weights)
    random_weights: bool  # True for random:<id>: the model has the shape of `name`, not its weights
    source: str  # the folder the weights came from, or "random:<id>"
    dtype: torch.dtype | str  # the parameters' dtype; the string "int8" when the engine is to quantise
    device: torch.device
    num_parameters: int


# Short Hub ids -> their canonical repos (the Hub redirects the old names, but the cache is keyed
# by the name used to download, so both are looked up).
HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# What a model folder needs from the Hub; weights in a second step so a repo holding both
# model.safetensors and pytorch_model.bin downloads only one.
_HUB_META = ["config.json", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
_HUB_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
_HUB_BIN = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]

_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # not c_attn.bias, a real parameter


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r} is not a device (cpu, cuda, cuda:N, auto)") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(dev)!r} is not supported (cpu, cuda, cuda:N, auto)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype | str:
    """-> a torch float dtype, or "int8" (weights load as float32; the engine quantises)."""
    if isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype == "int8":
        return "int8"
    elif dtype == "auto":
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16 on CUDA, int8, auto)")
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dt} is not supported (float32, bfloat16, float16 on CUDA)")
    if dt == torch.float16 and device.type != "cuda":
        raise ValueError("float16 is for CUDA; on CPU use float32 or bfloat16")
    return dt


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu", *,
               seed: int = 0, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load `spec` (folder | Hub id | random:<id>) onto `device` in `dtype`, in eval mode."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    param_dtype = torch.float32 if dt == "int8" else dt

    if spec.startswith("random:"):
        name = spec[len("random:"):]
        family = name.split("/")[-1]  # random:openai-community/gpt2 -> gpt2
        if family not in FAMILY:
            raise CheckpointError(f"{spec!r}: unknown model family {name!r}; known: {', '.join('random:' + k for k in FAMILY)}")
        config = GPT2Config(**FAMILY[family])
        # allocate once, in place, in the target dtype: no default init to overwrite, no fp32 copy
        with torch.device("meta"):
            model = GPT2LMHeadModel(config).to(dtype=param_dtype)
        model = model.to_empty(device=dev).init_random(seed).eval()
        return LoadedModel(model, config, Tokenizer.default(), family, True, spec, dt, dev, model.num_parameters())

    folder = Path(spec).expanduser()
    if folder.exists():
        name = folder.resolve().name
    elif _looks_like_path(spec):
        raise CheckpointError(f"{spec}: no such model folder")
    else:
        folder = _from_hub(spec, cache_dir)
        # "openai-community/gpt2" is shown as "gpt2"; other repos keep their full id
        name = {repo: short for short, repo in HUB_ALIASES.items()}.get(spec, spec)
    return _load_folder(folder, name, dt, param_dtype, dev)


def _looks_like_path(spec: str) -> bool:
    """A spec that can only be a filesystem path (a Hub id is `name` or `owner/name`)."""
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/")


# -- folders -----------------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: model.safetensors, else pytorch_model.bin (either may be sharded)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{folder / index}: cannot read the shard index: {e!r}") from e
            for s in shards:
                if not (folder / s).is_file():
                    raise CheckpointError(f"{folder / index}: shard {s} is missing from {folder}")
            return [folder / s for s in shards]
    raise CheckpointError(f"{folder}: no weights found (need model.safetensors or pytorch_model.bin)")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, zipfile and unpickler all have their own error types
        raise CheckpointError(f"{path}: cannot read the weights (truncated or corrupt file?): {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: not a state dict of named tensors")
    return sd


def _canonical_state_dict(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All files' tensors under the model's key names (`transformer.` prefix), buffers dropped.

    Returns (state dict, key -> file it came from). lm_head.weight is kept for the caller to check.
    """
    sd: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    given: dict[str, str] = {}  # canonical key -> the key as written in the file
    for path in files:
        for key, tensor in _read_weights(path).items():
            bare = key.removeprefix("transformer.")
            if _MASK_BUFFER.match(bare):
                continue
            canon = key if key == "lm_head.weight" else "transformer." + bare
            if canon in sd:
                raise CheckpointError(f"{path}: keys {key!r} and {given[canon]!r} ({origin[canon].name}) are the same "
                                      f"tensor {canon!r}, given twice")
            sd[canon], origin[canon], given[canon] = tensor, path, key
    return sd, origin


def _load_folder(folder: Path, name: str, dt, param_dtype: torch.dtype, dev: torch.device) -> LoadedModel:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (pass a folder in Hugging Face layout: config.json + model.safetensors)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a model folder needs config.json + model.safetensors)")
    try:
        config = GPT2Config.from_json(cfg_path)
        raw_cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if raw_cfg.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{cfg_path}: tie_word_embeddings is false; gpt2serve ties lm_head to wte")

    try:
        tokenizer = Tokenizer.from_dir(folder) if Tokenizer.has_files(folder) else Tokenizer.default()
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e
    if config.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(f"{cfg_path}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer.vocab_size} ({tokenizer.source})")

    files = _weight_files(folder)
    sd, origin = _canonical_state_dict(files)
    where = files[0] if len(files) == 1 else folder

    # the model's tensors without allocating them: names and shapes only
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    lm_head = sd.pop("lm_head.weight", None)
    wte = sd.get("transformer.wte.weight")
    if lm_head is not None and wte is not None:
        if tuple(lm_head.shape) != tuple(wte.shape) or not torch.equal(lm_head.to(wte.dtype), wte):
            raise CheckpointError(f"{origin['lm_head.weight']}: key 'lm_head.weight' is not tied to "
                                  f"'transformer.wte.weight' (shape {tuple(lm_head.shape)}); untied heads are not supported")

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing key(s) {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {_few(unexpected)}")
    if problems:
        raise CheckpointError(f"{where}: {'; '.join(problems)} -- the weights do not match {cfg_path.name} "
                              f"(n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size={config.vocab_size})")
    for k, shape in expected.items():
        t = sd[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{origin[k]}: key {k!r} has shape {tuple(t.shape)}, expected {shape} "
                                  f"from {cfg_path.name} (n_embd={config.n_embd}, n_positions={config.n_positions}, "
                                  f"vocab_size={config.vocab_size})")
        if not t.is_floating_point():
            raise CheckpointError(f"{origin[k]}: key {k!r} has dtype {t.dtype}; expected floating point weights")
        # one reduction (fast); the exact elementwise check only when the sum is not finite
        if not torch.isfinite(t.sum(dtype=torch.float32)) and not torch.isfinite(t).all():
            raise CheckpointError(f"{origin[k]}: key {k!r} holds NaN or infinite values (corrupt checkpoint?)")

    sd = {k: v.to(device=dev, dtype=param_dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.requires_grad_(False).eval()
    return LoadedModel(model, config, tokenizer, name, False, str(folder), dt, dev, model.num_parameters())


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


# -- the Hub -----------------------------------------------------------------------------------


def _has_weights(folder: Path) -> bool:
    try:
        _weight_files(folder)
        return (folder / "config.json").is_file()
    except CheckpointError:
        return False


def _from_hub(spec: str, cache_dir: str | Path | None) -> Path:
    """A Hub id -> a local snapshot folder: from the cache when there, else downloaded (progress on stderr)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = HUB_ALIASES.get(spec, spec)
    family = spec.split("/")[-1] if spec.split("/")[-1] in FAMILY else "gpt2"
    how = (f"Pass a local folder in Hugging Face layout instead (--model /path/to/folder holding config.json + "
           f"model.safetensors, e.g. one written by save_pretrained), or --model random:{family} "
           f"for random weights of the {family} shape.")
    for rid in dict.fromkeys([repo, spec]):  # canonical name first, then the name as given
        for patterns in (_HUB_META + _HUB_SAFETENSORS, _HUB_META + _HUB_BIN):
            try:
                path = Path(snapshot_download(rid, allow_patterns=patterns, local_files_only=True, cache_dir=cache_dir))
            except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
                continue
            if _has_weights(path):
                return path
    try:
        path = Path(snapshot_download(repo, allow_patterns=_HUB_META + _HUB_SAFETENSORS, cache_dir=cache_dir))
        if not _has_weights(path):
            path = Path(snapshot_download(repo, allow_patterns=_HUB_META + _HUB_BIN, cache_dir=cache_dir))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelNotAvailable(f"{spec!r}: no such (public) model on the Hugging Face Hub ({repo}): "
                                f"{type(e).__name__}. {how}") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        # LocalEntryNotFoundError is also what the hub raises when offline (HF_HUB_OFFLINE=1 or no network)
        raise ModelNotAvailable(f"{spec!r}: not in the Hugging Face cache and the Hub cannot be reached "
                                f"(offline?) to download {repo}: {type(e).__name__}. {how}") from e
    if not _has_weights(path):
        raise ModelNotAvailable(f"{spec!r}: the Hub repo {repo} has no config.json + model.safetensors or "
                                f"pytorch_model.bin. {how}")
    return path
