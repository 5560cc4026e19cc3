"""Hand-written CPU kernels (gemv.cpp), compiled on this machine the first time they are needed.

`gemv()` returns the torch ops namespace holding `gemv_int8`, `gemv_bf16`, `gemv_f32` (projections of <= 8
rows), `matmul_int8_panels` / `matmul_int8` (int8 projections of 5-63 / more rows), `matmul_panels` (bf16
and fp32 projections of many rows, fp32 FMAs) and `matmul_bf16_dot` (bf16, `vdpbf16ps`), `matmul_int8_amx` /
`matmul_bf16_amx` (the same on AMX tiles, where `amx_available()`), `decode_attention` (one query per
sequence over the paged KV cache, fp32, bf16 or int8 with scales, read in place), `kv_write` (a step's K/V
into that cache), `argmax_rows` (the sampler's argmax), `prefill_attention` (a prompt chunk's causal attention; over a bf16 cache optionally in bf16 products, on AMX tiles
or `vdpbf16ps`) and
`decode_layers` (every block of a decode step), or
None when they cannot be had here (not x86 with AVX-512 VNNI and BF16, no C++ compiler, a failed
build); callers then keep torch's kernels. The build goes through torch.utils.cpp_extension (ninja, the system C++
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
    """Whether this CPU runs the kernels (the build is a separate question: see gemv())."""
    return platform.machine() in ("x86_64", "AMD64") and all(f in cpu_flags() for f in REQUIRED_FLAGS)


def gemv():
    """The `torch.ops.gpt2serve` namespace with gemv_int8 / gemv_bf16 / gemv_f32 / decode_attention, or None
    (see the module doc)."""
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        _state["ops"] = None
        if not supported():
            log.info("small-batch kernels: this CPU lacks AVX-512 VNNI/BF16; using torch's kernels")
            return None
        try:
            import torch
            from torch.utils import cpp_extension

            digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode()).hexdigest()[:12]
            t0 = time.perf_counter()
            cpp_extension.load(name=f"gpt2serve_gemv_{digest}", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                               extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
            ops = torch.ops.gpt2serve
            ops.gemv_int8, ops.gemv_bf16  # noqa: B018 - raises if registration failed
            _state["ops"] = ops
            log.info("small-batch kernels ready (%.1f s)", time.perf_counter() - t0)
        except Exception as e:  # no compiler, no ninja, a failed build: torch's kernels still work
            log.warning("small-batch kernels unavailable, using torch's kernels: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return _state["ops"]
