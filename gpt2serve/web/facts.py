"""Published facts about the GPT-2 family, and the shaping of this deployment's own numbers.

Pure data and pure functions (no FastAPI, no torch) so the router stays thin and this is testable alone.

The zero-shot table is Table 3 of Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners", as copied into each Hugging Face model card (openai-community/gpt2, -medium, -large, -xl).
The paper's "117M" model is the 124M one: the paper miscounted (it left out the position/token
embedding sharing); the HF cards and every later count give 124,439,808 parameters.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

# (task key, label shown, metric, better) in the paper's column order.
# `better` is "lower" for perplexity / bits, "higher" for accuracy.
ZERO_SHOT_TASKS: list[tuple[str, str, str, str]] = [
    ("lambada_ppl", "LAMBADA", "PPL", "lower"),
    ("lambada_acc", "LAMBADA", "ACC", "higher"),
    ("cbt_cn", "CBT-CN", "ACC", "higher"),
    ("cbt_ne", "CBT-NE", "ACC", "higher"),
    ("wikitext2", "WikiText-2", "PPL", "lower"),
    ("ptb", "PTB", "PPL", "lower"),
    ("enwik8", "enwik8", "BPB", "lower"),
    ("text8", "text8", "BPC", "lower"),
    ("wikitext103", "WikiText-103", "PPL", "lower"),
    ("1bw", "1BW", "PPL", "lower"),
]

# size key -> published numbers, same order as ZERO_SHOT_TASKS (accuracies in percent).
PUBLISHED: dict[str, list[float]] = {
    "124M": [35.13, 45.99, 87.65, 83.4, 29.41, 65.85, 1.16, 1.17, 37.50, 75.20],
    "355M": [15.60, 55.48, 92.35, 87.1, 22.76, 47.33, 1.01, 1.06, 26.37, 55.72],
    "774M": [10.87, 60.12, 93.45, 88.0, 19.93, 40.31, 0.97, 1.02, 22.05, 44.575],
    "1.5B": [8.63, 63.24, 93.30, 89.05, 18.34, 35.76, 0.93, 0.98, 17.48, 42.16],
}

# The four released sizes: (n_layer, n_embd) -> (size key, Hugging Face id).
SIZES: dict[tuple[int, int], tuple[str, str]] = {
    (12, 768): ("124M", "openai-community/gpt2"),
    (24, 1024): ("355M", "openai-community/gpt2-medium"),
    (36, 1280): ("774M", "openai-community/gpt2-large"),
    (48, 1600): ("1.5B", "openai-community/gpt2-xl"),
}
# Short names users type -> Hub id; DistilGPT2 is a distillation of the 124M model (6 layers).
HUB_IDS: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}

LICENCE = {
    "name": "MIT",
    "detail": "The Hugging Face model card declares license: mit; OpenAI's original release "
    "(github.com/openai/gpt-2) uses a Modified MIT License.",
    "url": "https://github.com/openai/gpt-2/blob/master/LICENSE",
}

DESCRIPTION = (
    "GPT-2 is a decoder-only transformer language model released by OpenAI in 2019. It was trained "
    "with a plain next-token objective on WebText, about 40 GB of text from 8 million web pages "
    "linked from Reddit. Given some text, it continues it. It was never instruction-tuned or "
    "aligned with human feedback, so it completes text rather than following instructions."
)

LIMITS = [
    "It does not distinguish fact from fiction: it writes fluent text that can be false.",
    "It reflects the biases of its training data (web pages linked from Reddit), including "
    "stereotypes about gender, race and religion; OpenAI's model card warns against deploying it "
    "where such biases matter.",
    "It is not a chat model: chat requests are flattened into a plain text prompt, and it will not reliably follow instructions.",
    "Its context window is fixed (prompt + completion tokens); longer requests are refused.",
    "Its knowledge stops at 2019 and it was trained mostly on English.",
]


def format_parameters(n: int) -> str:
    """124_439_808 -> "124M", 354_823_168 -> "355M", 1_557_611_200 -> "1.6B", 98_304 -> "98K"."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{round(n / 1e6)}M"
    if n >= 1_000:
        return f"{round(n / 1e3)}K"
    return str(n)


def size_of(n_layer: int, n_embd: int) -> tuple[str, str] | None:
    """The released GPT-2 size with this shape, as (size key, Hub id), or None (custom/tiny)."""
    return SIZES.get((n_layer, n_embd))


def published_table(size: str | None) -> list[dict[str, Any]]:
    """One row per task: published numbers for every size plus `this` for the loaded size."""
    rows = []
    for i, (key, label, metric, better) in enumerate(ZERO_SHOT_TASKS):
        by_size = {s: vals[i] for s, vals in PUBLISHED.items()}
        rows.append(
            {
                "task": key,
                "label": label,
                "metric": metric,
                "better": better,
                "published": by_size,
                "published_this": by_size.get(size) if size else None,
                "measured": None,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# This deployment's measured numbers, from the JSON that `gpt2serve eval --output` writes.
# The reader is tolerant: it walks any JSON and matches paths like results.lambada.acc or
# {"task": "wikitext2", "metric": "ppl", "value": 29.9}, so a change of layout in eval/ does
# not blank the page.

_TASK_ALIASES: dict[str, list[str]] = {
    "lambada": ["lambada"],
    "cbt_cn": ["cbtcn", "cbtcommonnoun"],
    "cbt_ne": ["cbtne", "cbtnamedentit"],
    "wikitext2": ["wikitext2", "wikitext2raw", "wiki2"],
    "ptb": ["ptb", "penntreebank"],
    "enwik8": ["enwik8", "enwiki8"],
    "text8": ["text8"],
    "wikitext103": ["wikitext103", "wiki103"],
    "1bw": ["1bw", "lm1b", "onebillion", "billionword"],
}
_METRIC_ALIASES: dict[str, list[str]] = {
    "PPL": ["ppl", "perplexity", "wordperplexity", "tokenperplexity"],
    "ACC": ["acc", "accuracy"],
    "BPB": ["bpb", "bitsperbyte"],
    "BPC": ["bpc", "bitspercharacter", "bitsperchar"],
}
# Task keys in ZERO_SHOT_TASKS -> (eval task family, metric).
_ROW_TARGETS: dict[str, tuple[str, str]] = {
    "lambada_ppl": ("lambada", "PPL"),
    "lambada_acc": ("lambada", "ACC"),
    "cbt_cn": ("cbt_cn", "ACC"),
    "cbt_ne": ("cbt_ne", "ACC"),
    "wikitext2": ("wikitext2", "PPL"),
    "ptb": ("ptb", "PPL"),
    "enwik8": ("enwik8", "BPB"),
    "text8": ("text8", "BPC"),
    "wikitext103": ("wikitext103", "PPL"),
    "1bw": ("1bw", "PPL"),
}


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _walk(obj: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], float]]:
    """Every finite number in `obj` with the keys (and sibling task/metric names) above it."""
    found: list[tuple[tuple[str, ...], float]] = []
    if isinstance(obj, dict):
        # A record like {"task": "lambada", "metric": "acc", "value": 0.45}: its names join the path.
        names = tuple(str(obj[k]) for k in ("task", "name", "dataset", "metric") if isinstance(obj.get(k), str))
        for k, v in obj.items():
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                if math.isfinite(v):
                    found.append((path + names + (str(k),), float(v)))
            else:
                found.extend(_walk(v, path + names + (str(k),)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found.extend(_walk(v, path + (str(i),)))
    return found


def _matches(part: str, aliases: list[str]) -> bool:
    p = _norm(part)
    return any(p == a or p.startswith(a) for a in aliases)


def _metric_of(path: tuple[str, ...]) -> str | None:
    # The metric is the deepest path element that names one (a value's own key, usually).
    for part in reversed(path):
        words = {_norm(part)} | {w for w in re.split(r"[^a-z0-9]+", part.lower()) if w}
        for metric, aliases in _METRIC_ALIASES.items():
            if words & set(aliases):
                return metric
    return None


def _task_of(path: tuple[str, ...]) -> str | None:
    for part in reversed(path):
        for task, aliases in _TASK_ALIASES.items():
            if _matches(part, aliases):
                return task
    return None


def measured_numbers(report: Any) -> dict[str, float]:
    """Row key (as in ZERO_SHOT_TASKS) -> measured value, percent for accuracies."""
    out: dict[str, float] = {}
    # gpt2serve eval's own layout first (eval/cli.py): "table" rows of {task, metric, ours, published, ...},
    # accuracies already in percent; then "tasks": {task: {"metrics": {metric: value}}}.
    if isinstance(report, dict):
        for row in report.get("table") or []:
            if isinstance(row, dict) and isinstance(row.get("ours"), (int, float)):
                _put(out, str(row.get("task", "")), str(row.get("metric", "")), float(row["ours"]))
        for task, res in (report.get("tasks") or {}).items() if isinstance(report.get("tasks"), dict) else ():
            metrics = res.get("metrics") if isinstance(res, dict) else None
            for metric, value in (metrics or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    _put(out, str(task), str(metric), float(value))
        if out:
            return out
    # Anything else: walk it, skipping the published / difference columns of a comparison.
    for path, value in _walk(report):
        last = path[-1].lower() if path else ""
        if _norm(last) in _NOT_OURS or _NOT_OURS & set(re.split(r"[^a-z0-9]+", last)):
            continue
        task, metric = _task_of(path), _metric_of(path)
        if task is not None and metric is not None:
            # Accuracies may be fractions (0.4599) here; 1.0 or less is read as a fraction.
            _put_row(out, task, metric, value * 100.0 if metric == "ACC" and value <= 1.0 else value)
    return out


_NOT_OURS = {"published", "paper", "reference", "expected", "diff", "diffpct", "delta", "stderr", "std", "ci",
             "n", "count", "tokens", "numtokens", "examples", "seconds", "time", "limit"}


def _put(out: dict[str, float], task: str, metric: str, value: float) -> None:
    t, m = _task_of((task,)), _metric_of((metric,))
    # Only the headline metric: "ppl_token" beside "ppl" is not the paper's number.
    if t is not None and m is not None and _norm(metric) in _METRIC_ALIASES[m]:
        _put_row(out, t, m, value)


def _put_row(out: dict[str, float], task: str, metric: str, value: float) -> None:
    for row, target in _ROW_TARGETS.items():
        if target == (task, metric) and row not in out:
            out[row] = value


def load_eval_report(path: str | None) -> tuple[dict[str, float], dict[str, Any] | None]:
    """(measured numbers, report facts to show) from the eval report file; ({}, None) if absent/bad."""
    if not path:
        return {}, None
    p = Path(path)
    try:
        report = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}, None
    facts: dict[str, Any] = {"path": p.name}
    if isinstance(report, dict):
        for k in ("model", "backend", "created", "date", "timestamp", "dtype", "device", "random_weights", "limit"):
            if k in report and isinstance(report[k], (str, int, float, bool)):
                facts[k] = report[k]
        if "random_weights" not in facts and isinstance(report.get("model"), str):
            facts["random_weights"] = report["model"].startswith("random:")
    return measured_numbers(report), facts
