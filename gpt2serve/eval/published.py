"""Published zero-shot numbers: Table 3 of Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners" (the GPT-2 paper). The paper calls the smallest model 117M; it has 124M
parameters counted the usual way (the Hub id `gpt2` / `openai-community/gpt2`).

Keys are (task, metric) as `gpt2serve eval` reports them. Lower is better for ppl/bpb/bpc, higher
for acc (percent, as in the paper).
"""

from __future__ import annotations

# task -> (metric, higher_is_better)
TASK_METRICS: dict[str, list[tuple[str, bool]]] = {
    "lambada": [("ppl", False), ("acc", True)],
    "cbt-cn": [("acc", True)],
    "cbt-ne": [("acc", True)],
    "wikitext2": [("ppl", False)],
    "ptb": [("ppl", False)],
    "enwik8": [("bpb", False)],
    "text8": [("bpc", False)],
    "wikitext103": [("ppl", False)],
    "1bw": [("ppl", False)],
}

_COLUMNS = [
    ("lambada", "ppl"), ("lambada", "acc"), ("cbt-cn", "acc"), ("cbt-ne", "acc"), ("wikitext2", "ppl"),
    ("ptb", "ppl"), ("enwik8", "bpb"), ("text8", "bpc"), ("wikitext103", "ppl"), ("1bw", "ppl"),
]
# One row per model size, in the paper's column order.
_ROWS = {
    "gpt2": [35.13, 45.99, 87.65, 83.4, 29.41, 65.85, 1.16, 1.17, 37.50, 75.20],  # "117M"
    "gpt2-medium": [15.60, 55.48, 92.35, 87.1, 22.76, 47.33, 1.01, 1.06, 26.37, 55.72],  # "345M"
    "gpt2-large": [10.87, 60.12, 93.45, 88.0, 19.93, 40.31, 0.97, 1.02, 22.05, 44.575],  # "762M"
    "gpt2-xl": [8.63, 63.24, 93.30, 89.05, 18.34, 35.76, 0.93, 0.98, 17.48, 42.16],  # "1542M"
}

PUBLISHED: dict[str, dict[tuple[str, str], float]] = {
    size: dict(zip(_COLUMNS, row, strict=True)) for size, row in _ROWS.items()
}

# (n_layer, n_embd) -> family member, to pick the published row from a loaded model's shape.
SIZE_BY_SHAPE = {(12, 768): "gpt2", (24, 1024): "gpt2-medium", (36, 1280): "gpt2-large", (48, 1600): "gpt2-xl"}


def published_size_for(model_spec: str, shape: tuple[int, int] | None = None) -> str:
    """The paper row to compare against: from the model's shape when known, else from its name."""
    if shape in SIZE_BY_SHAPE:
        return SIZE_BY_SHAPE[shape]
    spec = model_spec.lower()
    for size in ("gpt2-xl", "gpt2-large", "gpt2-medium"):
        if size in spec or size.replace("gpt2-", "") == spec:
            return size
    return "gpt2"
