"""GPT-2 in PyTorch, written for serving: a paged KV cache and a forward over a flat batch of tokens.

Parameter names and shapes equal the Hugging Face checkpoint's keys (`transformer.h.0.attn.c_attn.weight`,
...), so loading is a lookup. The attention/MLP projections keep the checkpoint's Conv1D layout,
weight (in, out), and compute `x @ W + b` (addmm): on this CPU that streams weights faster at small
batches than `F.linear` on an (out, in) weight (PERF-NOTES: 18-23 GB/s against 13.5), and it makes
the Conv1D "transpose" of other loaders unnecessary.

One forward call takes N tokens from B sequences laid out back to back (prefill chunks of any length
and single decode tokens mixed), their positions, and where each token's K/V goes in the cache.
The linear layers (where the FLOPs are) run once over all N rows with no padding; only attention is
grouped: all single-token (decode) sequences in one batched SDPA over their gathered cache, each
multi-token (prefill) chunk in its own SDPA.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2serve.kernels import has_many_rows, is_avx2, panel_width

log = logging.getLogger(__name__)


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024  # context length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"  # OpenAI's tanh approximation of GELU
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "GPT2Config":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "n_positions" not in kw and "n_ctx" in d:
            kw["n_positions"] = d["n_ctx"]
        cfg = cls(**kw)
        cfg.validate(source, d)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "GPT2Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the model config: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: the model config must be a JSON object")
        return cls.from_dict(d, str(path))

    def validate(self, source: str = "config", raw: dict | None = None) -> None:
        if raw is not None and raw.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{source}: model_type is {raw.get('model_type')!r}; gpt2serve serves GPT-2 ('gpt2') checkpoints")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{source}: {name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"{source}: n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})")
        if self.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"{source}: activation_function {self.activation_function!r} is not supported (gelu_new, gelu)")
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and 0 < self.layer_norm_epsilon < 1):
            raise ValueError(f"{source}: layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon!r}")


# Family presets: the real shapes, for random:<id> and for naming.
FAMILY: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # not a real checkpoint: a tiny shape for tests and demos on slow machines
    "gpt2-tiny": dict(n_layer=2, n_head=4, n_embd=64),
}


# ---------------------------------------------------------------------------------------------
# The batch layout: what one forward step computes, built once per step by the runner and shared
# by every layer.


@dataclass
class AttentionMetadata:
    """Where N flat tokens of one step go. Decode sequences (1 new token each) come first.

    num_decode: rows [0, num_decode) are decode tokens, one per sequence.
    slot_mapping: (N,) int64, flat cache slot (block * block_size + offset) where each token's K/V is written.
    decode_gather: (B_dec, L_dec) int64 cache slots of each decode sequence's context (padded with 0).
    decode_mask: (B_dec, 1, 1, L_dec) bool, True where the key is part of the context.
    prefills: one entry per prefill chunk: (row_start, row_end, context_slots or None, mask or None).
      context_slots: (L,) int64 cache slots of the whole context incl. this chunk, when the chunk
      continues earlier tokens (chunked prefill or a shared prefix); None when the chunk starts at
      position 0, in which case attention uses the chunk's own K/V with a plain causal mask.
      mask: (T, L) bool for continuation chunks.
    decode_lens: (B_dec,) int64 length of each decode context (the kernel reads decode_gather in place).
    """

    num_decode: int
    slot_mapping: torch.Tensor
    decode_gather: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]
    decode_lens: torch.Tensor | None = None  # (B_dec,) int64 context lengths, for the paged-attention kernel


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back a large CPU tensor, not yet touched, with 2 MiB pages (madvise MADV_HUGEPAGE:
    with transparent_hugepage set to `madvise`, as here and on many distributions, only advised
    memory gets them). Returns whether the advice was taken; elsewhere, or refused, the tensor keeps
    4 KiB pages and works the same.

    Why for the KV cache: decode attention reads each sequence's slots all over a cache of a few GiB,
    a page (and a TLB miss) per slot with 4 KiB pages: batch 32, 128 new tokens, in-process, bf16
    876-948 -> 924-1019 tok/s, int8 1051-1226 -> 1146-1277 (AMX Xeon, runs in turn). The weights
    gained nothing measurable from it (prefill 512, batch 32)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    huge = 2 << 20
    start = (t.data_ptr() + huge - 1) // huge * huge
    end = (t.data_ptr() + t.numel() * t.element_size()) // huge * huge
    if end <= start:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(start, end - start, 14) == 0  # MADV_HUGEPAGE


def quantize_kv(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V rows (N, 2, H, D) -> int8 values (N, 2, H, D) and fp32 scales (N, 2, H): per head of K and
    of V, scale = max|x| / 127 and q = round(x / scale) to nearest even, as the kernels' kv_write
    stores them in an 8-bit cache (same bits)."""
    x = kv.float()
    amax = x.abs().amax(dim=-1)  # (N, 2, H)
    # a true division, as the kernel's (`127.0 / amax` is reciprocal-then-multiply in torch)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return torch.round(x * inv[..., None]).to(torch.int8), amax / 127.0


class KVCache:
    """Paged K/V storage for every layer: one tensor (n_layer, num_blocks * block_size, 2, n_head, head_dim).

    K and V of a token sit side by side (`[..., 0, :, :]` is K, `[..., 1, :, :]` is V) because the
    fused c_attn projection already lays them out that way, (N, [q | k | v]): one write (the kernels'
    `kv_write`, or `index_copy_`) puts both and one `index_select` gathers both, half the per-layer
    cache ops of separate K and V. Allocated once (on 2 MiB pages where Linux grants them:
    advise_huge_pages) and touched at start-up (PERF-NOTES: first touch is slow in these VMs), never
    per step. A token's K/V lives at flat slot `block * block_size + offset`; blocks are handed out
    by engine/kv_cache.py.

    dtype int8 (`--kv-cache-dtype int8`, as vLLM's fp8 cache): each head's K and V as int8 with one
    fp32 scale, `scale` (n_layer, S, 2, n_head) (quantize_kv): 53% of a bf16 cache's bytes per token,
    so twice the tokens in the same memory and half the bytes for decode attention to read, which is
    memory-bound at large batches. Attention computes in `compute_dtype` (the model's own K/V dtype):
    a prompt attends over its own unrounded K/V, later tokens over the cache's.
    """

    def __init__(self, config: GPT2Config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 compute_dtype: torch.dtype | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (config.n_layer, num_blocks * block_size, 2, config.n_head, config.head_dim)
        self.kv = torch.empty(shape, dtype=dtype, device=device)
        advise_huge_pages(self.kv)  # before the first touch, which then maps 2 MiB pages
        self.kv.zero_()
        self.scale = None  # (n_layer, S, 2, H) fp32 for an int8 cache
        if dtype == torch.int8:
            self.scale = torch.empty(shape[:-1], dtype=torch.float32, device=device)
            advise_huge_pages(self.scale)
            self.scale.zero_()
            self.compute_dtype = compute_dtype or torch.float32
        else:
            self.compute_dtype = dtype

    @property
    def k(self) -> torch.Tensor:
        return self.kv[:, :, 0]  # (n_layer, S, H, D) view

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, :, 1]

    def rows(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """The K/V at `slots` of one layer, (L, 2, H, D) in compute_dtype (an int8 cache's dequantized)."""
        kv = self.kv[layer].index_select(0, slots)
        if self.scale is None:
            return kv
        return (kv.float() * self.scale[layer].index_select(0, slots)[..., None]).to(self.compute_dtype)

    def write(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Torch ops' write of a step's K/V (N, 2, H, D) at `slots` (the kernels have kv_write)."""
        # index_copy_/index_select, not tensor indexing: on CPU advanced indexing into the large
        # cache costs ~100x more
        if self.scale is None:
            self.kv[layer].index_copy_(0, slots, kv.to(self.kv.dtype))
            return
        q, s = quantize_kv(kv)
        self.kv[layer].index_copy_(0, slots, q)
        self.scale[layer].index_copy_(0, slots, s)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.kv[:, dst * bs : (dst + 1) * bs] = self.kv[:, src * bs : (src + 1) * bs]
        if self.scale is not None:
            self.scale[:, dst * bs : (dst + 1) * bs] = self.scale[:, src * bs : (src + 1) * bs]

    @staticmethod
    def bytes_per_token(config: GPT2Config, dtype: torch.dtype) -> int:
        per_token = 2 * config.n_layer * config.n_embd * torch.empty((), dtype=dtype).element_size()
        if dtype == torch.int8:
            per_token += 2 * config.n_layer * config.n_head * 4  # the fp32 scales
        return per_token


# ---------------------------------------------------------------------------------------------
# Modules, named as the checkpoint's keys.


def gelu(y: torch.Tensor, approximate: str, ops=None) -> torch.Tensor:
    """GELU of a projection's fresh output. With the kernels of gpt2serve/kernels (`ops`), GPT-2's
    tanh form runs in place there: torch's vectorised tanh took 95-110 us for a (32, 3072) batch-32
    activation here against 23-30 (and 10-12% of an int8 batch-32 step)."""
    if ops is not None and approximate == "tanh" and y.dtype == torch.float32 and y.is_contiguous():
        ops.gelu_tanh_(y)
        return y
    return F.gelu(y, approximate=approximate)


class Conv1D(nn.Module):
    """OpenAI's 'Conv1D': a linear layer whose weight is stored (in, out).

    Every projection module (this one and the serving kernels below) also offers the two fusions the
    blocks use, `forward_gelu` (c_fc + GELU) and `forward_add` (c_proj + the residual); here they are
    two plain torch ops each, the kernels below fuse them where their library can.
    """

    gelu_ops = None  # set by prepare_for_serving: gpt2serve/kernels' GELU

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))  # (in, out)
        self.bias = nn.Parameter(torch.zeros(nf))  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)  # (N, in) @ (in, out) + (out,)

    def forward_gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return gelu(self(x), approximate, self.gelu_ops)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + self(x)


# activation codes of the small-batch kernels (gpt2serve/kernels/gemv.cpp)
_GEMV_ACT = {None: 0, "tanh": 1, "none": 2}


class Bf16Conv1D(nn.Module):
    """Conv1D in bf16 for CPUs where oneDNN computes bf16 natively (AVX512-BF16, AMX).

    Calls of up to `gemv_rows` rows (decode at small batch) run the hand-written AVX-512 GEMV in
    gpt2serve/kernels when it could be built here, larger ones oneDNN's linear (AMX where present)
    or the kernels' matmul_panels, whichever was faster at load (`many`, see panels_win).
    Measured over the 49 weight matmuls of a GPT-2 124M step on the 2-core AMX machine (ms):

    | rows | x @ W (in, out) | F.linear | oneDNN, packed weight | gemv kernel |
    |---|---|---|---|---|
    | 1 | 21.4 | 16.5 | 10.9-20.5 | 12.1 (same run as oneDNN's 20.5) |
    | 4 | - | - | 23.8 | 15.4 |
    | 32 | 18.8 | 20.9 | 13.3 | - |
    | 512 | 118 | 94 | 96 | - |

    oneDNN reads the weight reordered once into its blocked layout: in the engine, 8 and 32 streams
    ran 20% and 8% faster on it than on the plain (out, in) weight. The GEMV reads the plain weight,
    so with the kernel two copies are kept, the plain one and oneDNN's or the panels (one more bf16
    copy of the weights, 248 MB for GPT-2 124M).
    GELU and the residual add are fused into the matmul's epilogue (oneDNN post-ops, or the GEMV's).
    """

    gemv_rows = 4  # at 8 rows oneDNN's packed kernel was as fast (17.8 vs 19.1 ms), at 6 slower (19.1 vs 16.1)
    gemv_tensors = ("weight", "bias_f32")  # what the GEMV reads

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gemv=None, many: str = "onednn"):
        """many: what runs calls of more than gemv_rows rows: "onednn" (its bf16 linear), "panels"
        (the kernels' matmul_panels, fp32 FMAs on widened bf16 weights; needs `gemv`; see panels_win),
        "dot" (the kernels' matmul_bf16_dot, bf16 dot products, vdpbf16ps) or "amx" (the kernels'
        matmul_bf16_amx, on CPUs with AMX)."""
        super().__init__()
        self.many = many
        w = weight.detach().t().contiguous()  # (in, out) -> (out, in)
        self.gemv = gemv if gemv is not None and w.shape[1] % 64 == 0 else None
        self.weight = w if self.gemv is not None else None
        self.bias = None if bias is None else bias.detach().clone()
        self.bias_f32 = None if bias is None else bias.detach().float().contiguous()
        self.panels, self.packed = many_rows_weights(w, many, self.gemv)
        self._matmul = None  # the kernel that reads the panels
        if self.panels is not None:
            self._matmul = {"amx": self.gemv.matmul_bf16_amx, "dot": self.gemv.matmul_bf16_dot}.get(many, self.gemv.matmul_panels)

    def _run(self, x: torch.Tensor, gelu: str | None, residual: torch.Tensor | None) -> torch.Tensor:
        """gelu: None, or GELU's `approximate` ("tanh" / "none") to apply after the matmul."""
        if self.gemv is not None and x.shape[0] <= self.gemv_rows:
            return self.gemv.gemv_bf16(x.contiguous(), self.weight, self.bias_f32, residual, _GEMV_ACT[gelu])
        if self._matmul is not None:
            return self._matmul(x.contiguous(), self.panels, self.weight.shape[0], self.bias_f32, residual, _GEMV_ACT[gelu])
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        if gelu is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], gelu)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None, None)

    def forward_gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return self._run(x, approximate, None)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._run(x, None, residual.contiguous())

    @staticmethod
    def supported(dtype: torch.dtype, device: torch.device) -> bool:
        return (
            device.type == "cpu"
            and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )


def _pad_to_panels(w: torch.Tensor, dim: int, width: int = 32) -> tuple[torch.Tensor, int]:
    """w with its output columns (dimension `dim`) zero-padded to a multiple of `width`, and the
    number of panels of that many columns."""
    P = (w.shape[dim] + width - 1) // width
    pad = [0, 0] * (w.dim() - 1 - dim) + [0, P * width - w.shape[dim]]
    return F.pad(w, pad), P


def pack_panels(weight: torch.Tensor, width: int = 32) -> torch.Tensor:
    """(in, out) = (K, N) weight, bf16 or fp32 -> the panels matmul_panels reads (gemv.cpp):
    (ceil(N / 32), K, 32) in the weight's dtype, each panel 32 output columns (the last zero-padded).
    bf16 rows pair column c with c + 16 in 32 bits, so one 64-byte load widens to two fp32 vectors
    with one instruction each; fp32 rows are the 32 columns in order. width 16 (the AVX2 build,
    `panel_width`): fp32 only, (ceil(N / 16), K, 16), columns in order."""
    K = weight.shape[0]
    if width == 16:
        if weight.dtype != torch.float32:
            raise ValueError("16-column panels (the AVX2 build) are fp32")
        w, P = _pad_to_panels(weight, 1, 16)
        return w.view(K, P, 16).permute(1, 0, 2).contiguous()
    w, P = _pad_to_panels(weight, 1)  # (K, 32P)
    if w.dtype == torch.bfloat16:
        return w.view(K, P, 2, 16).permute(1, 0, 3, 2).contiguous().view(P, K, 32)  # [p, k, 2i + h] = w[k, 32p + 16h + i]
    return w.view(K, P, 32).permute(1, 0, 2).contiguous()


def pack_amx_bf16(weight: torch.Tensor) -> torch.Tensor:
    """(in, out) = (K, N) bf16 weight -> the panels matmul_bf16_amx reads (gemv.cpp): (ceil(N / 32),
    K / 2, 32, 2), each panel 32 output columns (the last zero-padded), each pair of inputs of the
    32 columns side by side: [p, g, n, j] = w[2g + j, 32p + n], the B operand layout of tdpbf16ps."""
    K = weight.shape[0]
    w, P = _pad_to_panels(weight, 1)  # (K, 32P)
    return w.view(K // 2, 2, P, 32).permute(2, 0, 3, 1).contiguous()


def many_rows_weights(w: torch.Tensor, many: str, gemv) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(panels, packed) of an (out, in) bf16 or fp32 weight for calls of more than gemv_rows rows:
    the kernels' panels when many is "panels" (matmul_panels), "amx" (matmul_bf16_amx) or "dot"
    (matmul_bf16_dot; both bf16 only)
    and the kernels are there, else oneDNN's reordered weight (the row-count hint 16: no slower at
    1 row than the hint 1, faster at 32: 10.9 vs 11.4 ms, 30.0 vs 34.6). Only one of them is made."""
    if many in ("amx", "dot") and gemv is not None:  # bf16 only; the same layout for both
        return pack_amx_bf16(w.t()), None
    if many == "panels" and gemv is not None:
        return pack_panels(w.t(), panel_width(gemv)), None
    return None, torch.ops.mkldnn._reorder_linear_weight(w, 16)


def panels_win(make, weight: torch.Tensor, rival: str = "onednn", rows: int = 32, repeats: int = 3,
               ours: tuple[str, ...] = ("panels",)) -> tuple[str, dict[str, float]]:
    """Which of the kernels' many-row matmuls (`ours`: "panels", and for bf16 "dot") or `rival`'s
    is fastest on this CPU for `weight` ((in, out), one of the model's), timed at `rows` rows, all
    taking turns: (the winner, each one's best ms). make(weight, many) builds the projection module
    for each kind.

    Which wins is a property of the CPU more than of the shape. bf16: where vdpbf16ps runs at half
    the FMA rate (the Intel Xeon without AMX we measured), fp32 FMAs on widened weights are ~1.7x
    faster at every row count (48 block matmuls, ms: 8 rows 5.6 vs 9.8, 32 rows 20.2 vs 34.1, 512
    rows 334 vs 521); on AMD Zen 4 (bf16 dot products at twice the fp32 rate) our dot-product
    kernel beats oneDNN's (48 block matmuls, weights streamed from memory: 8 rows 7.9-8.3 vs
    9.5-10.5 ms, 32 rows 16.3-16.6 vs 17.2-18.4, 512 rows 205 vs 208-215) and the FMA panels lose
    (8.9-10.2, 28, 420-430). fp32 (the Intel Xeon): 8 rows 8.5 vs 11.0, 32 rows 20.9 vs 23.1, 512
    rows alike. int8 (against fbgemm, at 12 rows: below AMX's oneDNN): 8 rows 2.1 vs 3.4 ms, 32 rows
    5.6 vs 7.2. The losers' copies of the weights are not kept."""
    x = torch.randn(rows, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.dtype)  # global RNG untouched
    kinds = [*ours, rival]
    mods = [make(weight, k) for k in kinds]
    return fastest({k: (lambda m=m: m(x)) for k, m in zip(kinds, mods)}, repeats)


def fastest(fns: dict, repeats: int = 3) -> tuple[object, dict[object, float]]:
    """Time each of `fns` (name -> zero-argument callable) `repeats` times, taking turns after one
    warm-up round: (the fastest one's name, each one's best ms). Taking turns, so that a phase of
    this machine's drifting speed does not favour whichever ran first."""
    import time

    best = dict.fromkeys(fns, math.inf)
    for r in range(repeats + 1):  # round 0 warms them up
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r:
                best[k] = min(best[k], time.perf_counter() - t)
    ms = {k: b * 1e3 for k, b in best.items()}
    return min(ms, key=ms.get), ms


class F32Conv1D(nn.Module):
    """Conv1D in fp32 on CPUs with oneDNN. Calls of up to `gemv_rows` rows (decode at small batch)
    run the hand-written AVX-512 GEMV of gpt2serve/kernels on the (out, in) weight where it could be
    built here, else MKL's `x @ W` on the checkpoint's (in, out) weight; more rows run oneDNN's
    linear on a weight it reordered once, with GELU and the residual add as post-ops, or the
    kernels' matmul_panels, whichever was faster at load (`many`, see panels_win).
    Over the 48 block matmuls of GPT-2 124M (ms, same runs):

    | rows | 1 | 2 | 4 | 8 | 32 | 512 |
    |---|---|---|---|---|---|---|
    | addmm, (in, out), Intel (AMX machine) | 11.9 | 20.4 | 21.3 | 22.2 | 36.7 | 269 |
    | oneDNN, packed, Intel | 14.4 | 15.2 | 15.8 | 18.2 | 30.5 | 255 |
    | addmm, AMD Zen 4 | 21.1 | 32.6 | 42.4 | 43.6 | - | - |
    | oneDNN, packed, AMD Zen 4 | 17.0 | 17.7 | 14.4 | 16.0 | - | - |
    | GEMV kernel, AMD Zen 4 | 10.9 | 11.9 | 13.2 | 17.9 | - | - |

    (MKL moves from its GEMV to its GEMM at 2 rows, and on AMD CPUs takes no AVX-512 path.) Two
    copies of the blocks' weights are kept, the plain one for the small calls and oneDNN's or the
    panels: one more fp32 copy, 340 MB for GPT-2 124M.
    """

    gemv_rows = 4  # at 8 rows oneDNN's packed kernel is faster (16.0 vs 17.9 ms)
    gemv_tensors = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu_ops=None, gemv=None, many: str = "onednn",
                 gemv_dtype: torch.dtype = torch.float32):
        """many: what runs calls of more than gemv_rows rows: "onednn" (its packed linear) or "panels"
        (the kernels' matmul_panels; needs `gemv`); see panels_win. gemv_dtype: the GEMV's copy of the
        weights, bf16 for a bf16 model on a CPU without native bf16 (the AVX2 build's GEMV widens it in
        registers: half the bytes to stream, the same products as fp32 on those bf16 values)."""
        super().__init__()
        self.many = many
        w_t = weight.detach().t().contiguous()  # (out, in); no copy when `weight` is a transposed view (the head's wte)
        self.gemv = gemv if gemv is not None and w_t.shape[1] % 32 == 0 else None
        # the small calls' plain weight: (out, in) for the GEMV, else the checkpoint's (in, out) for addmm
        self.weight = w_t.to(gemv_dtype) if self.gemv is not None else weight.detach()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.panels, self.packed = many_rows_weights(w_t, many, self.gemv)
        self.gelu_ops = gelu_ops  # gpt2serve/kernels' GELU for the addmm path

    def _own(self, x: torch.Tensor, act: str | None, residual: torch.Tensor | None) -> torch.Tensor:
        """A call not for oneDNN (see _is_own): the kernels' GEMV up to gemv_rows rows, matmul_panels
        above, or one row on MKL's addmm without the kernels. act: None, or GELU's `approximate`."""
        if self.gemv is not None and x.shape[0] > self.gemv_rows:
            return self.gemv.matmul_panels(x.contiguous(), self.panels, self.weight.shape[0], self.bias, residual, _GEMV_ACT[act])
        if self.gemv is not None:
            return self.gemv.gemv_f32(x.contiguous(), self.weight, self.bias, residual, _GEMV_ACT[act])
        y = torch.addmm(self.bias, x, self.weight) if self.bias is not None else x @ self.weight
        if act is not None:
            y = gelu(y, act, self.gelu_ops)
        return y if residual is None else residual + y

    def _is_own(self, x: torch.Tensor) -> bool:
        return self.panels is not None or x.shape[0] <= (self.gemv_rows if self.gemv is not None else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._is_own(x):
            return self._own(x, None, None)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def forward_gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        if self._is_own(x):
            return self._own(x, approximate, None)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], approximate)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self._is_own(x):
            return self._own(x, None, residual.contiguous())
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), self.packed, self.bias, "add")

    @staticmethod
    def supported(dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (Sapphire Rapids and later) and the kernel lets us use them."""
    init = getattr(torch._C._cpu, "_init_amx", None)
    try:
        return bool(init()) if init is not None else False
    except RuntimeError:
        return False


class Int8Conv1D(nn.Module):
    """Conv1D with int8 weights (per output channel scales) and int8 activations quantised at run
    time ("dynamic" quantisation) with int32 accumulation: a quarter of fp32's weight bytes for
    bandwidth-bound decode, several times its throughput for batched decode and prefill.

    Kernels: fbgemm's prepacked dynamic linear (AVX2/AVX-512 VNNI). With 12 layers' worth of GPT-2
    weights it beats `torch._int_mm` plus quantising the activations in Python at every row count
    (1 row: 5.8 vs 16.5 ms, 32: 19 vs 30, 512: 292 vs 303), because the weight is packed once and
    the activation quantisation is fused. On CPUs with AMX, oneDNN's dynamic linear runs the same
    int8 matmul on the tiles: measured over the 49 matmuls of a 124M step (ms),

    | rows | 1 | 4 | 8 | 16 | 32 | 64 | 512 |
    |---|---|---|---|---|---|---|---|
    | fbgemm | 7.4 | 9.0 | 9.3 | 12.4 | 18-22 | 27-32 | 227-233 |
    | oneDNN (AMX) | 14.1 | 9.7 | 9.3 | 9.6 | 11.5 | 16.1 | 104-121 |

    so with AMX the weight is packed for both, and calls of >= `onednn_rows` rows go to oneDNN
    (one more int8 copy of the weights, 124 MB for GPT-2 124M). The switch sits at 16 rows because in
    the engine (activation quantisation and the rest of the step included) batch 8 ran slower on
    oneDNN (224 vs 290 tok/s) and batch 16 faster (551 vs 435, against fbgemm alone, same run).

    Calls of up to `gemv_rows` rows run the hand-written AVX-512 VNNI GEMV (gpt2serve/kernels) when
    it could be built here, with GELU / the residual add fused: 6.5 vs fbgemm's 8.6 ms at 1 row, 8.3
    vs 11.3 at 4 (the 49 matmuls, same runs). It reads its own plain (out, in) copy of the int8
    weights. At 8 rows it won alone (9.0 vs 11.2 ms) but lost in the engine (363 vs 429 tok/s at
    batch 8 against fbgemm there), so it stops at 4.

    Calls of `matmul_rows` or more (prompts) without AMX run the kernels' matmul_int8: the GEMV's
    per-row quantisation and epilogue around `torch._int_mm` (oneDNN's VNNI GEMM) on the same
    plain weights, so a row's result is the GEMV's to the bit and does not depend on the rest of
    the batch. Over the 48 block matmuls (Intel Xeon without AMX, ms): 512 rows 89-92 vs fbgemm's
    97-99, 128 rows 24.0 vs 25.8, 64 rows 13.8 vs 14.2, 32 rows 8.4 vs 7.9; int8 prefill of 512
    tokens in the engine 2764 -> 3143 tok/s (A/B in one process). Where the panels below are faster at
    many rows too (AMD Zen 4: 48 block matmuls at 512 rows 111.5 vs 125.5 ms; prefill of 512 tokens
    3351-3382 -> 3462-3481 tok/s, of 128 tokens 2533-3091 -> 2878-3486, A/B in one process), they
    take every row count instead (`matmul_rows` None, timed by prepare_for_serving).

    Calls of 5 to 63 rows (batched decode) run matmul_int8_panels: the same per-row arithmetic
    again, on a copy of the weights in panels of 32 columns (pack_int8_panels) with an 8 x 32
    register tile. Against fbgemm (48 block matmuls, same machine, ms): 5 rows 2.0 vs 2.9, 8 rows
    2.1 vs 3.4, 16 rows 3.6 vs 4.8, 32 rows 6.8-7.1 vs 8.0, 64 rows alike. prepare_for_serving
    times it against fbgemm once (panels_win) and makes only the winner's copy (`many`); with the
    panels every row count runs the GEMV's arithmetic (AMX's oneDNN calls aside), and int8 keeps
    two int8 copies of the weights (plain and panels), plus oneDNN's with AMX.

    The AVX2 build (CPUs without AVX-512 VNNI) has the panels too, 16 columns wide, on vpmaddwd
    (exact, each row the GEMV's), but no matmul_int8: there fbgemm takes prompts where it times
    faster (prepare_for_serving keeps its copy then), and batched decode where it is > 10% faster.

    On CPUs with AMX the kernels' matmul_int8_amx runs the same arithmetic on the tiles, over the
    same panels (`many="amx"`), for every call of 5 rows or more, and oneDNN's copy is not made. Over
    the 48 block matmuls (2-core AMX machine, ms): 8 rows 2.8 vs the VNNI panels' 3.1 and oneDNN's
    5.5, 16 rows 4.3 vs 5.6 and 7.6, 32 rows 4.7 vs 8.1 and 9.5, 64 rows 7.4 vs 13.1 and 11.9, 128
    rows 15.7 vs 26.4 and 17.4, 512 rows 55 vs 103 and 72.
    """

    onednn_rows = 16
    gemv_rows = 4
    # from here (prompts) matmul_int8; below, matmul_int8_panels (at 64 rows alike, 13.8-14.0 ms, on
    # the Intel Xeon); None: the panels at every row count (prepare_for_serving times both: on AMD
    # Zen 4 the panels won at every size, 48 block matmuls at 512 rows 111.5 vs 125.5 ms)
    matmul_rows: int | None = 64
    gemv_tensors = ("q", "qsum", "scale", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, amx: bool = False, gemv=None, many: str = "panels"):
        """many: what runs calls of 5-63 rows with the kernels, "panels" (matmul_int8_panels) or
        "fbgemm" (see panels_win), or of 5 rows and up "amx" (matmul_int8_amx, on CPUs with AMX)."""
        super().__init__()
        self.many = many
        w = weight.detach().float()  # (in, out)
        scale = w.abs().amax(dim=0).clamp(min=1e-12) / 127.0  # (out,)
        q = torch.round(w / scale).to(torch.int8).t().contiguous()  # (out, in), the kernels' layout
        bias = None if bias is None else bias.detach().float().clone()
        # oneDNN's AMX copy, for many rows, unless the kernels' AMX matmul takes them
        self._packed_amx = self._prepack(q, scale, bias, "onednn") if amx and many != "amx" else None
        self.gelu_ops = gemv
        self.gemv = gemv if gemv is not None and q.shape[1] % 128 == 0 else None
        self.panels = None
        if self.gemv is not None:
            self.q, self.scale, self.bias = q, scale.float().contiguous(), bias
            self.qsum = q.sum(dim=1, dtype=torch.int32)  # (out,): takes the activations' zero point back out
            if many in ("panels", "amx"):
                self.panels = pack_int8_panels(q, panel_width(self.gemv))
        # fbgemm's packed copy only where the kernels do not take every row count
        self._packed = self._prepack(q, scale, bias, "fbgemm") if self.panels is None else None

    def _kernel(self, x: torch.Tensor, act, residual: torch.Tensor | None) -> torch.Tensor | None:
        """The kernels' int8 product with GELU / the residual fused, or None where fbgemm / oneDNN
        take these rows: the GEMV up to `gemv_rows`, then matmul_int8_amx where many == "amx", else
        matmul_int8_panels below `matmul_rows` and matmul_int8 (torch._int_mm between the GEMV's
        quantisation and epilogue) from there; where oneDNN's AMX copy was made (AMX, but not the
        kernels' AMX matmul), oneDNN from `onednn_rows`. Every kernel computes a row as the GEMV
        does, to the bit."""
        rows = x.shape[0]
        if self.gemv is None or (self._packed_amx is not None and rows >= self.onednn_rows):
            return None
        x = x.float().contiguous()
        residual = None if residual is None else residual.float().contiguous()
        a = _GEMV_ACT[act]
        if rows <= self.gemv_rows:
            return self.gemv.gemv_int8(x, self.q, self.qsum, self.scale, self.bias, residual, a)
        if self.many == "amx":
            return self.gemv.matmul_int8_amx(x, self.panels, self.qsum, self.scale, self.bias, residual, a)
        if self.matmul_rows is not None and rows >= self.matmul_rows:
            if self.prompts_on_fbgemm:
                return None
            if hasattr(self.gemv, "matmul_int8"):
                return self.gemv.matmul_int8(x, self.q, self.scale, self.bias, residual, a)
        if self.panels is not None:
            return self.gemv.matmul_int8_panels(x, self.panels, self.qsum, self.scale, self.bias, residual, a)
        return None

    def set_matmul_rows(self, rows: int | None) -> None:
        """Where calls stop running on the panels (prepare_for_serving's timed choice): from `rows`
        on matmul_int8, or where the kernels have none (the AVX2 build) fbgemm, whose copy of the
        weights is made here; None: the panels at every row count."""
        self.matmul_rows = rows
        if rows is not None and self.panels is not None and not hasattr(self.gemv, "matmul_int8") and self._packed is None:
            self._packed = self._prepack(self.q, self.scale, self.bias, "fbgemm")

    @property
    def prompts_on_fbgemm(self) -> bool:
        """Whether calls of >= matmul_rows rows run on fbgemm although the panels exist (set_matmul_rows)."""
        return self.matmul_rows is not None and self.panels is not None and self._packed is not None

    @staticmethod
    def _prepack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, engine: str):
        qe = torch.backends.quantized
        prev = qe.engine
        try:
            qe.engine = engine  # linear_prepack packs for the current engine; the packed object keeps it
            with warnings.catch_warnings():  # quantized tensors are deprecated in torch; these kernels are not yet replaced
                warnings.simplefilter("ignore", UserWarning)
                qt = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
                return torch.ops.quantized.linear_prepack(qt, bias)
        finally:
            qe.engine = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._kernel(x, None, None)
        if y is not None:
            return y
        x = x.float()
        if self._packed_amx is not None and x.shape[0] >= self.onednn_rows:
            # AMX's int8 tiles take the full u8 range (no int16 intermediate to saturate)
            return torch.ops.quantized.linear_dynamic(x, self._packed_amx, False)
        # reduce_range=True: 7-bit activations keep fbgemm's u8*s8 pair sums from saturating int16
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)

    def forward_gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        y = self._kernel(x, approximate, None)
        return y if y is not None else gelu(self(x), approximate, self.gelu_ops)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        y = self._kernel(x, None, residual)
        return y if y is not None else residual + self(x)


def pack_int8_panels(q: torch.Tensor, width: int = 32) -> torch.Tensor:
    """(out, in) = (N, K) int8 -> the panels matmul_int8_panels reads (gemv.cpp): (ceil(N / 32), K / 4,
    32, 4), each panel 32 output columns (the last zero-padded), each group of 4 inputs one
    128-byte row of 4 bytes per column, the operand layout of vpdpbusd. width 16 (the AVX2 build,
    `panel_width`): (ceil(N / 16), K / 2, 16, 2), each pair of inputs a 32-byte row, vpmaddwd's
    layout once widened to int16."""
    K = q.shape[1]
    if width == 16:
        q, P = _pad_to_panels(q, 0, 16)  # (16P, K)
        return q.view(P, 16, K // 2, 2).permute(0, 2, 1, 3).contiguous()
    q, P = _pad_to_panels(q, 0)  # (32P, K)
    return q.view(P, 32, K // 4, 4).permute(0, 2, 1, 3).contiguous()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Without the kernels (whose prefill_attention comes first, 2-3x faster still):
    causal self-attention of a prompt from position 0, by blocks of `block` queries, each against
    only the keys up to its end (about half the square's work), with scores and softmax in fp32.
    q: (T, H, D) in fp32 or bf16; k, v: (T, H, D) bf16 -> (H, T, D) bf16.

    torch's CPU flash attention takes bf16 at about the speed of fp32 on the AVX-512 BF16 machine
    without AMX (12 layers of a 512-token prompt: 68 ms, fp32 71), where bf16 matmuls run ~3x faster
    than fp32 ones. Here the scores are fp32 matmuls and the weighted sum of V a bf16 one: 12 layers,
    512 tokens 68 -> 45 ms, 256 tokens 17.6 -> 14.9, 1024 tokens 188 -> 161; at 128 tokens no faster
    (5.7 vs 5.8), so it is used from `CausalSelfAttention.blocked_from` tokens. Max error against fp32
    attention 9e-3, SDPA's in bf16 7e-3.
    """
    T, H, D = q.shape
    qs = q.float().transpose(0, 1) * D**-0.5  # (H, T, D)
    kt = k.float().permute(1, 2, 0).contiguous()  # (H, D, T)
    vh = v.transpose(0, 1)  # (H, T, D)
    out = torch.empty(H, T, D, dtype=v.dtype, device=v.device)
    above = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)  # a key after its query
    for s in range(0, T, block):
        e = min(s + block, T)
        scores = torch.bmm(qs[:, s:e], kt[:, :, :e])  # (H, b, e) fp32
        scores[:, :, s:e].masked_fill_(above[: e - s, : e - s], float("-inf"))
        out[:, s:e] = torch.bmm(torch.softmax(scores, -1).to(v.dtype), vh[:, :e])
    return out


class CausalSelfAttention(nn.Module):
    blocked_from = 256  # without the kernels: prompt tokens from which a bf16 cache's prompts use causal_attention

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head, self.head_dim, self.n_embd = config.n_head, config.head_dim, config.n_embd
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.paged_ops = None  # set by prepare_for_serving: gpt2serve/kernels' decode and prompt attention
        self.prefill_bf16 = False  # prompts over a bf16 cache in bf16 products (prepare_for_serving chooses)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, meta: AttentionMetadata, residual: torch.Tensor) -> torch.Tensor:
        """x: (N, C) after ln_1 -> residual + attention output, (N, C)."""
        N, C = x.shape
        H, D = self.n_head, self.head_dim
        qkv = self.c_attn(x)  # (N, 3C) = [q | k | v]
        q = qkv[:, :C].view(N, H, D)
        kv = qkv[:, C:].view(N, 2, H, D)  # k and v, already in the cache's layout
        kv_cache = cache.kv[layer]  # (S, 2, H, D)
        kv_scale = None if cache.scale is None else cache.scale[layer]  # (S, 2, H) of an int8 cache
        # write this step's K/V before anyone reads them (int8 mode: fp32 rows into the bf16 cache)
        if self.paged_ops is not None:
            self.paged_ops.kv_write(kv_cache, meta.slot_mapping, kv, kv_scale)
        else:
            cache.write(layer, meta.slot_mapping, kv)
            kv = kv.to(cache.compute_dtype)

        B = meta.num_decode
        o = None  # decode rows' output, (B, H, D)
        if B and self.paged_ops is not None and meta.decode_lens is not None:
            # decode: one query per sequence against its context, read in place from the paged cache
            o = self.paged_ops.decode_attention(q[:B], kv_cache, meta.decode_gather, meta.decode_lens, kv_scale)
        elif B:
            # decode: one query per sequence against its gathered context
            Bg, L = meta.decode_gather.shape
            ctx = cache.rows(layer, meta.decode_gather.view(-1)).view(Bg, L, 2, H, D)
            kd, vd = ctx[:, :, 0].transpose(1, 2), ctx[:, :, 1].transpose(1, 2)  # (B, H, L, D) each
            qd = q[:B].unsqueeze(2).to(ctx.dtype)  # (B, H, 1, D)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask).squeeze(2).to(x.dtype)
        if B == N:  # a decode-only step: the output is already (N, H*D), no copy
            return self.c_proj.forward_add(o.reshape(N, C), residual)
        if self.paged_ops is not None and B == 0 and len(meta.prefills) == 1:
            # one prompt chunk and nothing else: its attention output is the step's, no copy
            ctx_slots = meta.prefills[0][2]
            return self.c_proj.forward_add(self._prefill_attention(q, kv, cache, layer, ctx_slots).view(N, C), residual)
        out = torch.empty(N, H, D, dtype=q.dtype, device=q.device)
        if B:
            out[:B] = o
        for start, end, ctx_slots, mask in meta.prefills:
            if self.paged_ops is not None:
                out[start:end] = self._prefill_attention(q[start:end], kv[start:end], cache, layer, ctx_slots)
                continue
            if ctx_slots is None and kv.dtype == torch.bfloat16 and end - start >= self.blocked_from:
                # a long prompt from position 0 over a bf16 cache: by causal blocks (see causal_attention)
                out[start:end] = causal_attention(q[start:end], kv[start:end, 0], kv[start:end, 1]).transpose(0, 1)
                continue
            # 4-D (1, H, T, D): with 3-D inputs SDPA falls back to its unfused math path on CPU, 4-7x
            # slower for a 512-token prompt (measured: fp32 288 -> 68 ms, bf16 225 -> 30 ms, 12 layers)
            # in the cache's dtype, as decode reads it: int8 mode's prompts attend in bf16 like its
            # decodes do (and 2.2x faster than fp32 SDPA: 512 tokens, 12 layers 44 -> 20 ms)
            qp = q[start:end].transpose(0, 1).unsqueeze(0).to(kv.dtype)  # (1, H, T, D)
            if ctx_slots is None:  # chunk starts at position 0: its own K/V are the whole context
                kp = kv[start:end, 0].transpose(0, 1).unsqueeze(0)  # (1, H, T, D)
                vp = kv[start:end, 1].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
            else:
                ctx = cache.rows(layer, ctx_slots)  # (L, 2, H, D)
                kp, vp = ctx[:, 0].transpose(0, 1).unsqueeze(0), ctx[:, 1].transpose(0, 1).unsqueeze(0)  # (1, H, L, D)
                o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
            out[start:end] = o[0].transpose(0, 1)  # (T, H, D)
        return self.c_proj.forward_add(out.view(N, C), residual)

    def _prefill_attention(self, q: torch.Tensor, kv: torch.Tensor, cache: KVCache, layer: int,
                           ctx_slots: torch.Tensor | None) -> torch.Tensor:
        """The kernels' causal attention of one prompt chunk, q (T, H, D), over its own K/V (kv, (T, 2, H,
        D), rounded to the cache's float dtype as decode reads them; an int8 cache's compute_dtype, unquantized)
        or, continuing a context, the cache's rows at ctx_slots (an int8 cache's dequantized). Flash style in fp32 (12 layers of a 512-token prompt: 25-30 ms against SDPA's 52-69
        fp32 and 73 bf16); over a bf16 cache in bf16 products where `prefill_bf16` (AMX tiles: 12-14
        ms; vdpbf16ps on AMD Zen 4: 18-21 ms against fp32's 34-36 there)."""
        ctx = kv.to(cache.compute_dtype) if ctx_slots is None else cache.rows(layer, ctx_slots)  # (L, 2, H, D)
        return self.paged_ops.prefill_attention(q, ctx, self.prefill_bf16)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd)
        # gelu_new is the tanh approximation; plain "gelu" checkpoints use the exact erf form
        self.approximate = "none" if config.activation_function == "gelu" else "tanh"

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x: (N, C) after ln_2 -> residual + MLP output."""
        return self.c_proj.forward_add(self.c_fc.forward_gelu(x, self.approximate), residual)


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, layer, cache, meta):
        x = self.attn(self.ln_1(x), layer, cache, meta, residual=x)  # the residual adds are fused into c_proj
        return self.mlp(self.ln_2(x), residual=x)


class Transformer(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings, tied to lm_head
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # learned positions
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class DecodeLayers:
    """All blocks of a decode step of <= `max_rows` sequences as one call of the kernels'
    `decode_layers`, which runs the ops the Python blocks run, in the same order (same result to
    the bit; tests/model/test_kernels.py). At batch 1 the ~15 ops a block dispatches from Python
    cost ~1.5 ms a step for 12 layers, about what int8's weights take to stream.

    Built by prepare_for_serving when every projection of the blocks has the kernel's layout:
    int8 (Int8Conv1D), bf16 (Bf16Conv1D) or fp32 (F32Conv1D), each with its GEMV. Where the
    projections' calls of > 4 rows run the kernels too (their panels, VNNI or AMX: `many`), larger
    decode steps go through it as well, up to where int8 would hand the rows to oneDNN."""

    def __init__(self, ops, blocks, mode: int, act: int, eps: float, n_head: int):
        empty = torch.empty(0)
        self.ops, self.mode, self.act, self.eps, self.n_head = ops, mode, act, eps, n_head
        first = blocks[0].attn.c_attn
        # 0: the GEMV only; 1: the panels; 2: the AMX tiles; 3: bf16 dot products (the model's choice, one for all)
        self.many = 0 if first.panels is None else {"amx": 2, "dot": 3}.get(first.many, 1)
        if self.many == 1 and mode == 0 and first.matmul_rows is None:
            self.many = 4  # int8's panels at every row count (the kernel's matmul_int8 not used)
        # without `many`, the GEMV's rows (at 5-8 fbgemm and oneDNN are faster: int8 batch 8 553-570
        # vs 480-492 tok/s); with it any decode step, except where int8 has oneDNN take many rows
        self.max_rows = min(Int8Conv1D.gemv_rows, Bf16Conv1D.gemv_rows, F32Conv1D.gemv_rows)
        if self.many:
            self.max_rows = first.onednn_rows - 1 if mode == 0 and first._packed_amx is not None else 1 << 30
            if mode == 0 and first.prompts_on_fbgemm:
                self.max_rows = first.matmul_rows - 1  # the AVX2 build: fbgemm takes int8's calls from there
        self.params: list[torch.Tensor] = []
        for b in blocks:
            self.params += [b.ln_1.weight, b.ln_1.bias, b.ln_2.weight, b.ln_2.bias]
            for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj):
                panels = m.panels if self.many else empty
                if mode == 0:
                    self.params += [m.q, m.qsum, m.scale, m.bias if m.bias is not None else empty, panels]
                elif mode == 1:
                    self.params += [m.weight, m.bias_f32 if m.bias_f32 is not None else empty, empty, empty, panels]
                else:
                    self.params += [m.weight, m.bias if m.bias is not None else empty, empty, empty, panels]

    @classmethod
    def build(cls, model: "GPT2LMHeadModel", ops) -> "DecodeLayers | None":
        blocks = model.transformer.h
        convs = [m for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        if ops is None or not hasattr(ops, "decode_layers") or any(b.attn.paged_ops is None for b in blocks):
            return None
        if all(isinstance(m, Int8Conv1D) and m.gemv is not None for m in convs):
            mode = 0
        elif all(isinstance(m, Bf16Conv1D) and m.gemv is not None for m in convs):
            mode = 1
        elif all(isinstance(m, F32Conv1D) and m.gemv is not None for m in convs):
            mode = 2
        else:
            return None
        act = _GEMV_ACT[blocks[0].mlp.approximate]
        return cls(ops, blocks, mode, act, model.config.layer_norm_epsilon, model.config.n_head)

    def __call__(self, x: torch.Tensor, cache: "KVCache", meta: AttentionMetadata) -> torch.Tensor:
        return self.ops.decode_layers(x, self.params, cache.kv, meta.slot_mapping, meta.decode_gather,
                                      meta.decode_lens, self.mode, self.eps, self.n_head, self.act, self.many, cache.scale)


class GPT2LMHeadModel(nn.Module):
    _decode_layers: DecodeLayers | None = None  # set by prepare_for_serving where the kernels allow
    kernels = None  # gpt2serve.kernels' ops where prepare_for_serving uses them (the sampler's argmax too)

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        # lm_head is wte (tied); no parameter of its own, as in the checkpoints
        self.requires_grad_(False)  # serving only; lets inference tensors meet parameters anywhere

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (N,) -> hidden states after ln_f: (N, C)."""
        t = self.transformer
        # the functional forms: a module call costs ~5 us more each, a tenth of a decode step's Python
        x = F.embedding(input_ids, t.wte.weight) + F.embedding(positions, t.wpe.weight)  # (N, C)
        fused = self._decode_layers
        if fused is not None and meta.num_decode == x.shape[0] <= fused.max_rows and meta.decode_lens is not None:
            # a small decode step: every block in one call to the kernels (the same ops, see DecodeLayers)
            x = fused(x, cache, meta)
        else:
            for i, block in enumerate(t.h):
                x = block(x, i, cache, meta)
        ln_f = t.ln_f
        return F.layer_norm(x, ln_f.normalized_shape, ln_f.weight, ln_f.bias, ln_f.eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, C) -> (M, vocab) in float32 (sampling and logprobs want full precision)."""
        head = getattr(self, "_lm_head", None)
        if head is None:
            return F.linear(hidden, self.transformer.wte.weight).float()
        if isinstance(head, nn.Module):
            return head(hidden).float()
        return (hidden @ head).float()

    def prepare_for_serving(self, int8: bool = False, kernels: str = "auto") -> "GPT2LMHeadModel":
        """Lay the weights out for fast inference (after loading; the state dict keeps its keys only
        when the projections stay plain Conv1D).

        - lm_head: a (C, vocab) contiguous copy of wte, so the head is `x @ W` too (F.linear on the
          (vocab, C) wte streams at about half the speed on this CPU); costs one more copy of wte.
        - int8: every Conv1D becomes Int8Conv1D and the head is int8 as well; the embeddings stay
          in float for the lookup. With AMX, calls of many rows run on oneDNN (see Int8Conv1D).
          The KV cache is bf16 where the CPU computes bf16 natively or the kernels read it (`kv_dtype`).
        - bf16 on a CPU with oneDNN bf16: every Conv1D and the head become Bf16Conv1D; on a CPU
          without native bf16 the (bf16-rounded) weights widen to fp32 and it runs as fp32 does.
        - int8 and bf16 decode of <= 4 rows: the AVX-512 GEMV of gpt2serve/kernels, built on first use
          (on CPUs without AVX-512 VNNI/BF16 its AVX2 build: int8 and fp32 GEMVs, no many-row kernels);
          decode attention (every dtype) reads the paged cache in place with the kernel there.
        kernels: "auto" (the above) or "torch" (plain torch ops only, for comparisons: the int8
        projections then use fbgemm alone, bf16 stays `x @ W`, the KV cache keeps the weights' dtype).
        """
        if kernels not in ("auto", "torch"):
            raise ValueError(f"kernels must be 'auto' or 'torch', got {kernels!r}")
        if getattr(self, "_prepared", False):
            return self  # already laid out: the float Conv1D weights may be gone
        self._prepared = True
        wte = self.transformer.wte.weight.detach()
        widened = (kernels == "auto" and not int8 and wte.dtype == torch.bfloat16 and wte.device.type == "cpu"
                   and not Bf16Conv1D.supported(wte.dtype, wte.device))
        if widened:
            # no native bf16 here (no AVX512-BF16 / AMX, e.g. AVX2 laptops, AMD Zen 3): torch's bf16 matmuls
            # fall back to a scalar path, ~60x slower than fp32 (AMD EPYC Zen 3: a 768x2304 projection of
            # one row 49 ms vs 0.76; prefill of 512 tokens 100 s vs 0.9). The bf16-rounded weights widen to
            # fp32 exactly, so the model stays the bf16 model, computed in fp32 at fp32's speed; the AVX2
            # GEMV (decode of <= 4 rows) keeps reading them as bf16, half fp32's bytes.
            log.warning("bfloat16 on a CPU without native bf16: the bf16 weights are computed in fp32 "
                        "(torch's bf16 matmuls are ~60x slower here)")
            self.float()
            wte = self.transformer.wte.weight.detach()
        self.kv_dtype = wte.dtype
        replace = None
        fp32 = False
        gemv = None
        if kernels == "auto" and wte.device.type == "cpu":
            from gpt2serve.kernels import gemv as load_gemv

            gemv = load_gemv()  # None where it cannot be built or run: torch's kernels then
            self.kernels = gemv
            for block in self.transformer.h if gemv is not None else ():
                if self.config.head_dim % 16 == 0:
                    block.attn.paged_ops = gemv  # decode and prompt attention (paged cache), every dtype
                block.mlp.c_fc.gelu_ops = gemv  # plain fp32 Conv1D; the modules below take it as an argument
        if int8:
            if wte.device.type != "cpu":
                raise ValueError("int8 mode is for CPUs (VNNI); use bfloat16 or float16 on CUDA")
            amx = kernels == "auto" and has_amx()
            # fbgemm only where it is > 10% faster: the panels compute each row as the GEMV does (8-bit
            # activations, a scale per row; fbgemm one 7-bit scale per call, so a row's result depends
            # on its batch) and let decode_layers take the step. Timed at 12 rows where AMX's oneDNN
            # takes 16 and more either way, else at 32. The AVX2 build keeps its panels for decode
            # without timing them: on AMD Zen 3 fbgemm's c_fc at 32 rows timed 14-27% faster in
            # isolation (over three loads; 0-15% the session before), so the choice flipped between
            # loads, while in the engine batch 32 ran alike (fbgemm 521, 526 tok/s; the panels, with
            # prompts of >= 64 rows on fbgemm, 615, 502; the session before fbgemm ahead in two pairs
            # of three) and fbgemm's rounding cost greedy agreement with fp32 on the peers' weights
            # (11 of 16 tokens against 16). Prompts still go to fbgemm where it times faster there
            # (_choose_int8_prompt_matmul).
            if is_avx2(gemv):
                many = self.many_rows = "panels"
                log.info("matmuls of > 4 rows: panels (int8 decode rows on the AVX2 build's panels, untimed)")
            else:
                many = self._amx_kernels(gemv) or self._choose_many(
                    lambda w, m: Int8Conv1D(w, None, gemv=gemv, many=m), gemv, rival="fbgemm", rows=12 if amx else 32,
                    rival_margin=1.1)
            replace = lambda w, b: Int8Conv1D(w, b, amx=amx, gemv=gemv, many=many)  # noqa: E731
            paged = self.transformer.h[0].attn.paged_ops is not None
            if kernels == "auto" and (Bf16Conv1D.supported(torch.bfloat16, wte.device) or paged):
                # decode attention streams the whole context's K/V every step (the gather and SDPA
                # were ~38% of an int8 step at batch 32): a bf16 cache halves those bytes, and its
                # rounding is far below int8's (llama.cpp keeps an f16 cache by default). Without
                # native bf16 too where the kernels' attention reads the cache (widening bf16 is
                # a shift): 12 layers at batch 32, a context of 96, Zen 3: 17.3 -> 9.6 ms
                self.kv_dtype = torch.bfloat16
        elif kernels == "auto" and Bf16Conv1D.supported(wte.dtype, wte.device):
            many = self._amx_kernels(gemv) or self._choose_many(lambda w, m: Bf16Conv1D(w, None, gemv=gemv, many=m), gemv,
                                                                ours=("panels", "dot"))
            replace = lambda w, b: Bf16Conv1D(w, b, gemv=gemv, many=many)  # noqa: E731
        elif kernels == "auto" and F32Conv1D.supported(wte.dtype, wte.device):
            many = self._choose_many(lambda w, m: F32Conv1D(w, None, gemv=gemv, many=m), gemv)
            # a widened bf16 model keeps bf16 weights for the AVX2 GEMV (batch 1 streams half the bytes)
            gemv_dtype = torch.bfloat16 if widened and is_avx2(gemv) else torch.float32
            replace = lambda w, b: F32Conv1D(w, b, gelu_ops=gemv, gemv=gemv, many=many, gemv_dtype=gemv_dtype)  # noqa: E731
            fp32 = gemv is None
        if replace is not None:
            for block in self.transformer.h:
                for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
                    conv = getattr(parent, name)
                    setattr(parent, name, replace(conv.weight, conv.bias))
        # int8 (per-vocab-row scales), bf16 and fp32 with the kernels replace the head too (fp32's GEMV
        # reads wte itself, its (out, in) weight); fp32 without them keeps `x @ W`, MKL's GEMV at one row
        self._lm_head = wte.t().contiguous() if replace is None or fp32 else replace(wte.t(), None)
        if int8 and many == "panels":  # timed on the model's own projections, then set on every one (the head too)
            matmul_rows = self._choose_int8_prompt_matmul(gemv)
            for mod in self.modules():
                if isinstance(mod, Int8Conv1D):
                    mod.set_matmul_rows(matmul_rows)
        self._decode_layers = DecodeLayers.build(self, gemv)
        if gemv is not None and not is_avx2(gemv) and self.kv_dtype == torch.bfloat16 and self.config.head_dim % 32 == 0:
            # (the AVX2 build's prompt attention is in fp32 either way: no bf16 products there)
            bf16 = self._choose_prompt_attention(gemv)
            for block in self.transformer.h:
                block.attn.prefill_bf16 = bf16
        return self

    def _choose_prompt_attention(self, gemv, tokens: int = 256, repeats: int = 3) -> bool:
        """Whether prompts over a bf16 cache attend with bf16 products (the kernels' prefill_attention
        with bf16=True: queries and probabilities rounded to bf16, as the cache's K and V are) rather
        than in fp32. With AMX always (the tiles: 12 layers of a 512-token prompt 29-30 -> 12.5-14 ms
        on the AMX Xeon); otherwise timed once here on a random `tokens`-token prompt, both taking
        turns, as vdpbf16ps runs at twice the fp32 FMA rate on AMD Zen 4 (12 layers, 512 tokens: 34-36
        -> 18-21 ms) but at half of it on the Intel Xeon without AMX we measured. Logged."""
        if gemv.amx_available():
            log.info("prompt attention: bf16 products on the AMX tiles")
            return True
        H, D = self.config.n_head, self.config.head_dim
        qkv = torch.randn(tokens, 3, H, D, generator=torch.Generator().manual_seed(0))  # global RNG untouched
        q, kv = qkv[:, 0], qkv[:, 1:].to(torch.bfloat16)
        kind, ms = fastest({k: (lambda b=b: gemv.prefill_attention(q, kv, b)) for k, b in (("bf16", True), ("fp32", False))},
                           repeats)
        log.info("prompt attention: %s products (%d tokens: bf16 %.2f ms, fp32 %.2f ms)", kind, tokens, ms["bf16"], ms["fp32"])
        return kind == "bf16"

    def _amx_kernels(self, gemv) -> str | None:
        """"amx" where the projections' calls of > 4 rows run the kernels' AMX matmuls (int8 and
        bf16): wherever the CPU has AMX and Linux lets us use it; else None. No timing at load,
        unlike panels_win: both sides use the same tiles, and the kernels' are bound by streaming
        the weights at decode sizes, where oneDNN's were 1.4-2x slower (Int8Conv1D, Bf16Conv1D)."""
        if gemv is None or not hasattr(gemv, "amx_available") or not gemv.amx_available():
            return None
        self.many_rows = "amx"
        log.info("matmuls of > 4 rows: the kernels' AMX tiles")
        return "amx"

    def _choose_many(self, make, gemv, rival: str = "onednn", rows: int = 32, ours: tuple[str, ...] = ("panels",),
                     rival_margin: float = 1.0) -> str:
        """What runs the projections' calls of > 4 rows (int8: 5-63): the fastest on this CPU of the
        kernels' matmuls (`ours`) and `rival`'s, timed once on layer 0's c_fc (panels_win), the rival
        only where it is faster than ours by `rival_margin` (int8: 1.1, see prepare_for_serving).
        Kept in `self.many_rows` and logged."""
        many = rival
        if has_many_rows(gemv):
            many, ms = panels_win(make, self.transformer.h[0].mlp.c_fc.weight.detach(), rival=rival, rows=rows, ours=ours)
            best_ours = min(ours, key=ms.get)
            if many == rival and ms[rival] * rival_margin > ms[best_ours]:
                many = best_ours
            log.info("matmuls of > 4 rows: %s (c_fc at %d rows: %s)", many, rows,
                     ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
        self.many_rows = many
        return many

    def _choose_int8_prompt_matmul(self, gemv, rows: int = 256, repeats: int = 3) -> int | None:
        """Int8Conv1D.matmul_rows for int8 with the VNNI panels: where the kernels' matmul_int8
        (torch._int_mm, oneDNN's GEMM, between the GEMV's quantisation and epilogue) takes over from
        the panels, or None where the panels are faster at many rows too. Timed once here, both
        taking turns, on layer 0's MLP (c_fc and c_proj: x of K = 768 and of 3072) at `rows` rows, as
        which wins depends on the CPU: 48 block matmuls at 512 rows, AMD Zen 4, panels 111.5 vs
        matmul_int8 125.5 ms (at 64 rows 15.1 vs 18.7); the Intel Xeon without AMX, alike at 64 rows.
        The AVX2 build has no matmul_int8: there the rival is fbgemm (7-bit activations, one scale per
        call), whose copy of the weights prepare_for_serving then makes for every projection: on the
        AMD Zen 3 machine prefill of 512 tokens ran 703-741 tok/s on the panels, 834-921 on fbgemm
        (A/B in one process), where the MLP alone at 256 rows timed alike: so there the whole block
        is timed, at 512 rows. Called once layer 0's projections are Int8Conv1D. Logged."""
        block = self.transformer.h[0]
        mlp = block.mlp
        convs = ((mlp.c_fc, _GEMV_ACT[mlp.approximate]), (mlp.c_proj, 0))
        if not hasattr(gemv, "matmul_int8"):  # fbgemm: the whole block's projections at 512 rows (the MLP at 256 measured alike)
            convs = ((block.attn.c_attn, 0), (block.attn.c_proj, 0), *convs)
            rows = 512
        if any(m.panels is None for m, _ in convs):
            return Int8Conv1D.matmul_rows  # shapes the kernels do not take (K % 128): fbgemm's
        g = torch.Generator().manual_seed(0)  # the global RNG untouched
        calls = [(m, torch.randn(rows, m.q.shape[1], generator=g), act) for m, act in convs]
        if hasattr(gemv, "matmul_int8"):
            rival = "matmul_int8"
            run_rival = lambda: [gemv.matmul_int8(x, m.q, m.scale, m.bias, None, a) for m, x, a in calls]  # noqa: E731
        else:  # the AVX2 build: fbgemm, whose copy of the weights is made only if it wins (prepare_for_serving)
            rival = "fbgemm"
            packed = [Int8Conv1D._prepack(m.q, m.scale, m.bias, "fbgemm") for m, _ in convs]

            def run_rival():  # as Int8Conv1D.forward / forward_gelu run it
                for p, (m, x, a) in zip(packed, calls):
                    y = torch.ops.quantized.linear_dynamic(x, p, True)
                    if a:
                        gelu(y, mlp.approximate, gemv)
        kind, ms = fastest({
            rival: run_rival,
            "panels": lambda: [gemv.matmul_int8_panels(x, m.panels, m.qsum, m.scale, m.bias, None, a) for m, x, a in calls],
        }, repeats)
        log.info("int8 matmuls of >= %d rows: %s (%s at %d rows: %s)", Int8Conv1D.matmul_rows,
                 "the panels" if kind == "panels" else rival, "MLP" if len(convs) == 2 else "block 0", rows,
                 ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
        return None if kind == "panels" else Int8Conv1D.matmul_rows

    def refresh_gemv_weights(self) -> None:
        """Copy what the small-batch kernels read (each projection's `gemv_tensors`, and wte where
        fp32's head reads it) to fresh memory, dropping the old copies: no memory is added.

        Why: in these VMs the same kernels stream weights allocated once the engine's KV cache
        exists faster than the copies prepare_for_serving made. Measured on the AMD Zen 4 machine,
        batch 1, separate processes in turn: int8 160-175 -> 194-226 tok/s, bf16 91-94 -> 96-101,
        fp32 51 -> 76; the 48 bf16 block GEMVs alone 6.5 -> 6.0 ms and 7.8 -> 7.0 ms against copies
        made later in the same process. Copying at the end of prepare_for_serving, before the cache,
        did not help (int8 152-168). We have not pinned down the cause (guest huge pages made no
        difference); the engine calls this once its cache is allocated."""
        wte = self.transformer.wte.weight
        shares_wte = []
        for mod in self.modules():
            if getattr(mod, "gemv", None) is None:
                continue
            for name in getattr(mod, "gemv_tensors", ()):
                t = getattr(mod, name)
                if t is None:
                    continue
                if t.data_ptr() == wte.data_ptr():
                    shares_wte.append((mod, name))
                else:
                    setattr(mod, name, t.clone())
        if shares_wte:
            wte.data = wte.data.clone()
            for mod, name in shares_wte:
                setattr(mod, name, wte.detach())
        if self._decode_layers is not None:
            self._decode_layers = DecodeLayers.build(self, self._decode_layers.ops)

    def init_random(self, seed: int = 0) -> "GPT2LMHeadModel":
        """GPT-2's initialisation (normal 0.02, residual projections scaled by 1/sqrt(2 * n_layer))."""
        g = torch.Generator().manual_seed(seed)
        std = 0.02
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln_" in name or name.startswith("transformer.ln_f"):
                    p.fill_(1.0)
                else:
                    s = std / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else std
                    p.copy_(torch.randn(p.shape, generator=g) * s)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
