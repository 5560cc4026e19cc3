"""What this machine allows GPT-2 to do: memory bandwidth, matmul throughput, and the ceilings they imply.

Two limits bound a decoder on a CPU (a roofline):
- batch-1 decode reads every weight once per token, so tok/s <= bandwidth / weight bytes per token;
- batched decode and prefill do ~2 FLOPs per weight per token, so tok/s <= matmul rate / FLOPs per token.
A ceiling at batch M is the lower of the two (M * bandwidth bound, compute bound at M rows).

The matmul rate is measured with torch's own kernels (MKL/oneDNN for fp32 and bf16, `torch._int_mm`
and fbgemm's dynamic linear for int8) at GPT-2's real shapes, so a ceiling here is "what the best available kernel does", not
the datasheet peak. bf16 weights may also be multiplied in fp32 once widened (the serving kernels do
where that is faster), so the 16-bit compute bound takes, shape by shape, the faster of the bf16 and
fp32 products (on the Intel Xeon without AMX we measured, fp32 ran twice bf16's rate: the bf16
ceiling alone had the engine at 104-142% of it). Run `python -m gpt2serve.bench.hardware` to print them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from gpt2serve.kernels import has_vnni

DTYPES = ("float32", "bfloat16", "int8")
BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "int8": 1}
DEFAULT_ROWS = (1, 8, 32, 512)
# the arithmetic a dtype's weights can be multiplied in: its own, or a wider float after widening
COMPUTE_AS = {"float32": ("float32",), "bfloat16": ("bfloat16", "float32"), "int8": ("int8",)}


# ---------------------------------------------------------------------------- model cost


@dataclass(frozen=True)
class ModelCost:
    """Weights and FLOPs of a GPT-2 decoder, from its config (defaults: GPT-2 124M)."""

    n_layer: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    vocab_size: int = 50257
    n_positions: int = 1024

    @classmethod
    def from_config(cls, config) -> "ModelCost":
        """From a transformers GPT2Config or anything with the same attribute names."""
        return cls(
            n_layer=config.n_layer,
            n_embd=config.n_embd,
            n_inner=getattr(config, "n_inner", None),
            vocab_size=config.vocab_size,
            n_positions=config.n_positions,
        )

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the four matmuls in one block: c_attn, attn.c_proj, c_fc, mlp.c_proj."""
        d = self.n_embd
        return [(d, 3 * d), (d, d), (d, self.inner), (self.inner, d)]

    def shapes(self, lm_head: bool = True) -> list[tuple[int, int, int]]:
        """(in, out, count) of every weight matmul of one forward step."""
        out = [(k, n, self.n_layer) for k, n in self.layer_shapes()]
        if lm_head:
            out.append((self.n_embd, self.vocab_size, 1))
        return out

    def matmul_params(self, lm_head: bool = True) -> int:
        return sum(k * n * c for k, n, c in self.shapes(lm_head))

    def weight_bytes(self, dtype: str) -> int:
        """Bytes a batch-1 decode step must stream: every matmul weight (lm_head tied to wte).

        Biases, LayerNorms and the one wpe row are < 0.1% and left out; so are int8 scales.
        """
        return self.matmul_params() * BYTES_PER_WEIGHT[dtype]

    def kv_bytes_per_token(self, ctx: int, dtype: str) -> int:
        """KV cache a decode token reads: K and V of `ctx` positions in every layer."""
        kv_bytes = 2 if dtype == "bfloat16" else 4  # an int8 engine still keeps K/V in fp32 or bf16
        return 2 * self.n_layer * ctx * self.n_embd * kv_bytes

    def attention_flops(self, ctx: float) -> float:
        """QK^T and AV for one query over `ctx` keys in every layer (2 FLOPs per MAC each)."""
        return 2 * 2 * self.n_layer * ctx * self.n_embd

    def decode_flops_per_token(self, ctx: float) -> float:
        """One decoded token: every matmul incl. lm_head, plus attention over `ctx` positions."""
        return 2 * self.matmul_params(lm_head=True) + self.attention_flops(ctx)

    def prefill_flops_per_token(self, prompt_len: int) -> float:
        """One prompt token: the blocks, causal attention (mean context ~T/2), lm_head once per prompt."""
        return (
            2 * self.matmul_params(lm_head=False)
            + self.attention_flops((prompt_len + 1) / 2)
            + 2 * self.n_embd * self.vocab_size / prompt_len
        )


# ---------------------------------------------------------------------------- measurements


def _best_seconds(fn, repeats: int, min_time: float = 0.0) -> float:
    """Best wall time of `fn()` over `repeats` calls (after one warm-up call).

    Best, not mean: the machine is shared, and interference only ever slows a run down.
    """
    fn()
    best = float("inf")
    start = time.perf_counter()
    n = 0
    while n < repeats or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def measure_bandwidth(size_mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth in GB/s (1e9 bytes): `read` = sum of a large fp32 tensor, `copy` = read+write.

    The tensor is far larger than any cache, and is touched once first: on these VMs untouched
    pages are handed back to the host and cost far more on their first touch.
    """
    n = size_mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of both
    nbytes = src.numel() * src.element_size()
    read = _best_seconds(lambda: src.sum(), repeats)
    copy = _best_seconds(lambda: dst.copy_(src), repeats)
    return {"read_gbs": nbytes / read / 1e9, "copy_gbs": 2 * nbytes / copy / 1e9, "size_mib": size_mib}


def bandwidth_probe(quick: bool = False) -> dict[str, float]:
    """measure_bandwidth at the size and repeats `measure` uses (smaller and fewer when quick)."""
    return measure_bandwidth(size_mib=256 if quick else 512, repeats=3 if quick else 5)


def _matmul_fn(dtype: str, m: int, k: int, n: int, layout: str):
    """A closure running x(m,k) @ W for one dtype; `layout` "kn" stores W as (k, n), "nk" as (n, k) (nn.Linear)."""
    g = torch.Generator().manual_seed(0)
    if dtype == "int8" and layout == "fbgemm":  # dynamic linear on a prepacked per-channel int8 weight
        from gpt2serve.model.gpt2 import Int8Conv1D

        x = torch.randn(m, k, generator=g)
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        packed = Int8Conv1D._prepack(q, torch.full((n,), 0.01), None, "fbgemm")
        return lambda: torch.ops.quantized.linear_dynamic(x, packed, True)
    if dtype == "int8":
        x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        w = torch.randint(-127, 128, (k, n) if layout == "kn" else (n, k), dtype=torch.int8, generator=g)
        wt = w if layout == "kn" else w.t()
        return lambda: torch._int_mm(x, wt)
    tdt = getattr(torch, dtype)
    x = torch.randn(m, k, generator=g).to(tdt)
    if layout == "kn":
        w = torch.randn(k, n, generator=g).to(tdt)
        return lambda: torch.mm(x, w)
    w = torch.randn(n, k, generator=g).to(tdt)
    return lambda: torch.nn.functional.linear(x, w)


def measure_matmul(dtype: str, m: int, k: int, n: int, repeats: int = 3, min_time: float = 0.05) -> dict:
    """GFLOP/s (GOP/s for int8) of one (m,k)@(k,n) product, best of both weight layouts (int8: and of
    fbgemm's dynamic linear, activation quantisation included: without VNNI, e.g. AVX2 CPUs, torch._int_mm
    has no fast path, ~20x slower than fbgemm on an AMD Zen 3, so the int8 ceiling would mean nothing)."""
    best = {}
    layouts = ["kn", "nk"]
    if dtype == "int8" and "fbgemm" in torch.backends.quantized.supported_engines:
        # without VNNI, skip _int_mm: at 512 rows it took minutes of this measurement on the Zen 3
        layouts = layouts + ["fbgemm"] if has_vnni() else ["fbgemm"]
    for layout in layouts:
        fn = _matmul_fn(dtype, m, k, n, layout)
        best[layout] = _best_seconds(fn, repeats, min_time)
    layout = min(best, key=best.get)
    return {"gflops": 2 * m * k * n / best[layout] / 1e9, "seconds": best[layout], "layout": layout}


@dataclass
class HardwareProfile:
    threads: int
    bandwidth: dict[str, float]
    # dtype -> str(rows) -> "KxN" -> {"gflops", "seconds", "layout"}
    matmul: dict[str, dict[str, dict[str, dict]]] = field(default_factory=dict)
    torch_version: str = torch.__version__
    cpu: str = ""

    def step_seconds(self, dtype: str, rows: int, cost: ModelCost, lm_head: bool = True) -> float:
        """Time of all weight matmuls of one forward step over `rows` tokens, from the per-shape timings:
        each shape at the fastest arithmetic its weights allow (COMPUTE_AS) among those measured."""
        tables = [self.matmul[d][str(rows)] for d in COMPUTE_AS.get(dtype, (dtype,))
                  if str(rows) in self.matmul.get(d, {})]
        return sum(min(t[f"{k}x{n}"]["seconds"] for t in tables) * c for k, n, c in cost.shapes(lm_head))

    def model_gflops(self, dtype: str, rows: int, cost: ModelCost) -> float:
        """Matmul rate over GPT-2's mix of shapes at `rows` rows (time-weighted, lm_head included)."""
        flops = 2 * rows * cost.matmul_params(lm_head=True)
        return flops / self.step_seconds(dtype, rows, cost) / 1e9


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def measure(
    cost: ModelCost | None = None,
    dtypes=DTYPES,
    rows=DEFAULT_ROWS,
    threads: int | None = None,
    quick: bool = False,
    passes: int | None = None,
    progress=None,
    into: HardwareProfile | None = None,
    bandwidth: bool = True,
) -> HardwareProfile:
    """Measure bandwidth and every (dtype, rows, shape) matmul that GPT-2 runs; ~1 min for 124M (~10 s quick).

    The whole table is measured `passes` times (default 2, quick 1) and each entry keeps its best: on a
    shared machine a burst of load from elsewhere then has to hit the same entry in every pass to
    lower a ceiling. `into`: a profile measured before (the peers script's earlier rounds), updated in
    place the same way, best entry kept, and returned; `bandwidth=False` leaves its bandwidth alone
    (the peers script probes that itself, once a round).
    """
    cost = cost or ModelCost()
    if threads is not None:
        torch.set_num_threads(threads)
    passes = passes or (1 if quick else 2)
    prof = into or HardwareProfile(threads=torch.get_num_threads(), bandwidth={}, cpu=_cpu_name())
    bw = prof.bandwidth
    shapes = sorted({(k, n) for k, n, _ in cost.shapes()})
    for _ in range(passes):
        if bandwidth:
            b = bandwidth_probe(quick)
            for key in ("read_gbs", "copy_gbs"):
                bw[key] = max(bw.get(key, 0.0), b[key])
            bw["size_mib"] = b["size_mib"]
        for dtype in dtypes:
            table = prof.matmul.setdefault(dtype, {})
            for m in rows:
                row = table.setdefault(str(m), {})
                for k, n in shapes:
                    r = measure_matmul(dtype, m, k, n, repeats=1 if quick else 3, min_time=0.0 if quick else 0.05)
                    old = row.get(f"{k}x{n}")
                    if old is None or r["seconds"] < old["seconds"]:
                        row[f"{k}x{n}"] = r
                    if progress is not None:
                        progress(f"{dtype} {m}x{k}x{n}: {r['gflops']:.0f} GFLOP/s")
    return prof


# ---------------------------------------------------------------------------- ceilings


def ceilings(
    prof: HardwareProfile,
    cost: ModelCost | None = None,
    prompt_len: int = 32,
    new_tokens: int = 128,
    prefill_len: int = 512,
    batches=(1, 8, 32),
) -> dict[str, dict[str, float]]:
    """tok/s ceilings per dtype: "decode_b{M}" for each batch M and "prefill_{T}".

    decode_bM = min(M * bandwidth / bytes per step, M / compute time of a step at M rows), where a
    step streams the weights once plus each sequence's KV cache at the mean context
    (prompt_len + new_tokens / 2). Batch 1 and batch sizes without a matmul measurement at M rows
    get only the bandwidth bound (a 1-row matmul is itself bandwidth-bound, and torch's kernels for
    it are far from the roof, e.g. `_int_mm` at 1 row: that is a kernel limit, not the machine's).
    prefill_T = T / (matmul time of the blocks at T rows + the lm_head's weight read): the prompt's
    last token is the only row through the lm_head, and a 1-row matmul is bound by its weight bytes.
    """
    cost = cost or ModelCost()
    ctx = prompt_len + new_tokens / 2
    bw = prof.bandwidth["read_gbs"] * 1e9
    out: dict[str, dict[str, float]] = {}
    for dtype in prof.matmul:
        c: dict[str, float] = {}
        for m in batches:
            step_bytes = cost.weight_bytes(dtype) + m * cost.kv_bytes_per_token(int(ctx), dtype)
            bound = m * bw / step_bytes
            if m > 1 and str(m) in prof.matmul[dtype]:
                # attention runs at the same rate as the weight matmuls (generous: it is usually slower)
                t = prof.step_seconds(dtype, m, cost)
                t *= cost.decode_flops_per_token(ctx) / (2 * cost.matmul_params())
                bound = min(bound, m / t)
            c[f"decode_b{m}"] = bound
        if str(prefill_len) in prof.matmul[dtype]:
            t_blocks = prof.step_seconds(dtype, prefill_len, cost, lm_head=False)
            t_blocks *= 1 + cost.attention_flops((prefill_len + 1) / 2) / (2 * cost.matmul_params(lm_head=False))
            # the last token's lm_head is a 1-row matmul: bound by reading its weight once
            t_head = cost.n_embd * cost.vocab_size * BYTES_PER_WEIGHT[dtype] / bw
            c[f"prefill_{prefill_len}"] = prefill_len / (t_blocks + t_head)
        out[dtype] = c
    return out


def format_report(prof: HardwareProfile, ceils: dict, cost: ModelCost | None = None) -> str:
    """Markdown: bandwidth, model-mix matmul rates per dtype and rows, and the ceilings."""
    cost = cost or ModelCost()
    lines = [
        f"CPU: {prof.cpu or '?'}; torch {prof.torch_version}; {prof.threads} threads",
        f"Memory bandwidth: read {prof.bandwidth['read_gbs']:.1f} GB/s, copy {prof.bandwidth['copy_gbs']:.1f} GB/s",
        f"Model: {cost.matmul_params() / 1e6:.1f}M matmul weights; decode {cost.decode_flops_per_token(96) / 1e6:.0f} "
        f"MFLOP/token at context 96",
        "",
    ]
    rows = sorted({int(m) for d in prof.matmul.values() for m in d})
    lines.append("| matmul GFLOP/s (GPT-2 shape mix) | " + " | ".join(f"{m} rows" for m in rows) + " |")
    lines.append("|---|" + "---|" * len(rows))
    for dtype in prof.matmul:
        cells = [f"{prof.model_gflops(dtype, m, cost):.0f}" if str(m) in prof.matmul[dtype] else "-" for m in rows]
        lines.append(f"| {dtype} | " + " | ".join(cells) + " |")
    lines.append("")
    keys = sorted({k for c in ceils.values() for k in c},
                  key=lambda k: (not k.startswith("prefill"), int(k.rsplit("_", 1)[1].lstrip("b"))))
    lines.append("| ceiling tok/s | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for dtype, c in ceils.items():
        lines.append(f"| {dtype} | " + " | ".join(f"{c[k]:.0f}" if k in c else "-" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2serve.bench.hardware", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller bandwidth buffer")
    p.add_argument("--json", dest="json_path", help="also write the profile and ceilings here")
    args = p.parse_args(argv)
    prof = measure(dtypes=args.dtypes.split(","), threads=args.threads, quick=args.quick,
                   progress=lambda s: print(s, file=sys.stderr))
    ceils = ceilings(prof)
    print(format_report(prof, ceils))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"hardware": asdict(prof), "ceilings": ceils}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
