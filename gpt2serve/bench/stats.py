"""Summary statistics for latencies: one function, numpy's percentiles (linear interpolation)."""

from __future__ import annotations

import os

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


def _tree(pid: int | str) -> list[str]:
    """pid and its descendants (/proc/<pid>/task/<tid>/children): `--server-pid` may name a wrapper,
    e.g. a pyenv shim, which forks the Python server instead of becoming it."""
    out, todo = [], [str(pid)]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += f.read().split()
        except OSError:
            continue
    return out


def _status_kb(pid: str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _tree_bytes(pid: int | str, field: str) -> int | None:
    vals = [v for v in (_status_kb(p, field) for p in _tree(pid)) if v is not None]
    return sum(vals) * 1024 if vals else None


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """Peak resident memory (VmHWM) of a process and its descendants (summed), from /proc; None
    where /proc is unavailable or there is no such process."""
    return _tree_bytes(pid, "VmHWM:")


def rss_bytes(pid: int | str = "self") -> int | None:
    """Current resident memory (VmRSS) of a process and its descendants (summed), or None."""
    return _tree_bytes(pid, "VmRSS:")
