"""Summary statistics for latencies: one function, numpy's percentiles (linear interpolation)."""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(values, percentiles=PERCENTILES) -> dict[str, float | int | None]:
    """{"n", "mean", "min", "max", "p50", "p90", "p99"} of `values`; all None (n = 0) when empty.

    Percentiles interpolate linearly between order statistics (numpy's default, and what vLLM's and
    TGI's benchmarks report), so p50 of [1, 2, 3, 4] is 2.5.
    """
    a = np.asarray(list(values), dtype=np.float64)
    keys = ["mean", "min", "max"] + [f"p{p}" for p in percentiles]
    if a.size == 0:
        return {"n": 0, **{k: None for k in keys}}
    out: dict[str, float | int | None] = {"n": int(a.size), "mean": float(a.mean()), "min": float(a.min()),
                                          "max": float(a.max())}
    for p, v in zip(percentiles, np.percentile(a, percentiles)):
        out[f"p{p}"] = float(v)
    return out


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """Peak resident memory (VmHWM) of a process from /proc, or None where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def rss_bytes(pid: int | str = "self") -> int | None:
    """Current resident memory (VmRSS) of a process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
