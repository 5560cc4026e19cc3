"""Hand-written CPU kernels (gemv.cpp, gemv_avx2.cpp), compiled on this machine the first time they are needed.

`gemv()` returns the torch ops namespace holding `gemv_int8`, `gemv_bf16`, `gemv_f32` (projections of <= 8
rows), `matmul_int8_panels` / `matmul_int8` (int8 projections of 5-63 / more rows), `matmul_panels` (bf16
and fp32 projections of many rows, fp32 FMAs) and `matmul_bf16_dot` (bf16, `vdpbf16ps`), `matmul_int8_amx` /
`matmul_bf16_amx` (the same on AMX tiles, where `amx_available()`), `decode_attention` (one query per
sequence over the paged KV cache, fp32, bf16 or int8 with scales, read in place), `kv_write` (a step's K/V
into that cache), `argmax_rows` (the sampler's argmax), `prefill_attention` (a prompt chunk's causal attention; over a bf16 cache optionally in bf16 products, on AMX tiles
or `vdpbf16ps`) and
`decode_layers` (every block of a decode step), on x86 CPUs with AVX-512 VNNI and BF16 (gemv.cpp).
On x86 CPUs with AVX2 and FMA but not those (AMD Zen 2/3, most laptops) it returns
`torch.ops.gpt2serve_avx2` instead (gemv_avx2.cpp): the same schemas for the GEMVs (int8, fp32; the
latter also on bf16 weights), the many-row matmuls `matmul_panels` (fp32) and `matmul_int8_panels`
on 16-column panels (`panel_width`), GELU, argmax, decode and prompt attention, K/V writes and
decode_layers, without matmul_int8 and the bf16 / AMX products (callers check with hasattr). The two share kernels/common.h (argument checks). It is
None when neither can be had here (no AVX2, no C++ compiler, a failed build); callers then keep
torch's kernels. The build goes through torch.utils.cpp_extension (ninja, the system C++
compiler) into torch's extensions folder ($TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions),
named by a hash of the source, flags and torch version, so it is built once per machine and version
(~15 s on 2 cores) and loaded from there afterwards. It links the same libgomp as torch, so at::parallel_for
runs on torch's own threads (a second OpenMP runtime would oversubscribe the cores).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
import time
from pathlib import Path

log = logging.getLogger("gpt2serve.kernels")

SOURCE = Path(__file__).with_name("gemv.cpp")
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mfma", "-fopenmp"]
SOURCE_AVX2 = Path(__file__).with_name("gemv_avx2.cpp")
REQUIRED_FLAGS_AVX2 = ("avx2", "fma")
CFLAGS_AVX2 = ["-O3", "-mavx2", "-mfma", "-fopenmp"]

_lock = threading.Lock()
_state: dict = {}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def supported() -> bool:
    """Whether this CPU runs the AVX-512 kernels (the build is a separate question: see gemv())."""
    return platform.machine() in ("x86_64", "AMD64") and all(f in cpu_flags() for f in REQUIRED_FLAGS)


def supported_avx2() -> bool:
    """Whether this CPU runs the AVX2 kernels (gemv_avx2.cpp; every AVX-512 CPU does too)."""
    return platform.machine() in ("x86_64", "AMD64") and all(f in cpu_flags() for f in REQUIRED_FLAGS_AVX2)


def has_vnni() -> bool:
    """Whether this CPU has int8 dot products (VNNI, AVX-512 or AVX; AMX): without them int8 GEMMs that
    take u8 x s8 (oneDNN, torch._int_mm) go through saturating int16 pairs or slow paths."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def has_many_rows(ops) -> bool:
    """Whether `ops` has the many-row matmuls (panels): both builds (the AVX2 one without matmul_int8
    and the bf16 / AMX products)."""
    return ops is not None and hasattr(ops, "matmul_panels")


def panel_width(ops) -> int:
    """Output columns per panel of `ops`' many-row matmuls: 32 in the AVX-512 build (two zmm
    vectors), 16 in the AVX2 one (two ymm); the model packs its weights to match (pack_panels,
    pack_int8_panels)."""
    return 16 if is_avx2(ops) else 32


def is_avx2(ops) -> bool:
    """Whether `ops` is the AVX2 build (whose gemv_f32 also takes bf16 weights)."""
    return ops is not None and ops is _state.get("AVX2")


def _build(key: str, source: Path, cflags: list[str], namespace: str):
    """Compile `source` once per machine and torch version (see the module doc) and return
    torch.ops.<namespace>, or None (logged) where that fails."""
    with _lock:
        if key in _state:
            return _state[key]
        _state[key] = None
        try:
            import torch
            from torch.utils import cpp_extension

            # the header both builds include is part of what is built: a change to it must rebuild
            code = source.read_bytes() + source.with_name("common.h").read_bytes()
            digest = hashlib.sha256(code + " ".join(cflags).encode() + torch.__version__.encode()).hexdigest()[:12]
            t0 = time.perf_counter()
            cpp_extension.load(name=f"{source.stem}_{digest}", sources=[str(source)], extra_cflags=cflags,
                               extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
            ops = getattr(torch.ops, namespace)
            ops.gemv_int8, ops.gemv_f32  # noqa: B018 - raises if registration failed
            _state[key] = ops
            log.info("%s kernels ready (%.1f s)", key, time.perf_counter() - t0)
        except Exception as e:  # no compiler, no ninja, a failed build: torch's kernels still work
            log.warning("%s kernels unavailable, using torch's kernels: %s", key,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
        return _state[key]


def gemv_avx2():
    """The AVX2 build (`torch.ops.gpt2serve_avx2`), or None: what gemv() returns on CPUs without
    AVX-512 VNNI/BF16; loadable on any AVX2 CPU (the tests check it beside the AVX-512 one)."""
    if not supported_avx2():
        return None
    return _build("AVX2", SOURCE_AVX2, CFLAGS_AVX2, "gpt2serve_avx2")


def gemv():
    """The `torch.ops.gpt2serve` namespace (AVX-512) or `torch.ops.gpt2serve_avx2` (AVX2 without
    AVX-512 VNNI/BF16), or None (see the module doc)."""
    if supported():
        return _build("AVX-512", SOURCE, CFLAGS, "gpt2serve")
    if supported_avx2():  # logged once, when built
        return gemv_avx2()
    return None
