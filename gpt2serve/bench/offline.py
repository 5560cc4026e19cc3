"""Offline benchmark: the engine in-process (`LLM`), no HTTP.

For every prompt length and batch size: B random prompts, `max_tokens` new tokens each, greedy, EOS
ignored, after one short warm-up at the same shape. Output tok/s = B * max_tokens / wall time (the
prefill is inside the wall time, as a user sees it); total tok/s also counts the prompt tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gpt2serve.bench.stats import peak_rss_bytes, summarize


@dataclass
class OfflineConfig:
    model: str = "random:gpt2"
    dtype: str = "float32"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    prompt_lens: list[int] = field(default_factory=lambda: [32, 512])
    max_tokens: int = 128
    threads: int | None = None
    repeats: int = 1
    seed: int = 0
    engine_config: dict = field(default_factory=dict)  # extra EngineConfig fields


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """n prompts of `length` ids in [0, min(vocab, 50256)): never EOS, reproducible."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab_size, 50256), (n, length), generator=g).tolist()


def run_offline(cfg: OfflineConfig, progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    from gpt2serve.engine.core import LLM
    from gpt2serve.engine.sampling import SamplingParams

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    engine_config = {"max_num_seqs": max(64, *cfg.batch_sizes), **cfg.engine_config}
    if cfg.threads:
        engine_config.setdefault("threads", cfg.threads)
    t0 = time.perf_counter()
    llm = LLM(model=cfg.model, dtype=cfg.dtype, **engine_config)
    load_s = time.perf_counter() - t0
    vocab = llm.loaded.config.vocab_size
    n_pos = llm.loaded.config.n_positions
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=min(4, cfg.max_tokens), temperature=0.0, ignore_eos=True)
    shapes = [(p, b) for p in cfg.prompt_lens for b in cfg.batch_sizes]
    results, skipped = [], []
    bar = tqdm(shapes, desc="bench offline", unit="shape", disable=not progress)
    for prompt_len, batch in bar:
        bar.set_postfix_str(f"prompt {prompt_len} x batch {batch}")
        if prompt_len + cfg.max_tokens > n_pos:
            skipped.append({"prompt_len": prompt_len, "batch": batch, "reason": f"prompt + max_tokens > {n_pos}"})
            continue
        prompts = random_prompts(batch, prompt_len, vocab, cfg.seed + prompt_len)
        llm.generate(prompts, warm)
        best, outs = float("inf"), None
        for _ in range(max(1, cfg.repeats)):
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            best = min(best, time.perf_counter() - t)
        got = sum(len(o.outputs[0].token_ids) for o in outs)
        if got != batch * cfg.max_tokens:
            raise RuntimeError(f"prompt {prompt_len} batch {batch}: {got} tokens, expected {batch * cfg.max_tokens}")
        # per-request time to first token from the engine's own timestamps (monotonic), when it keeps them
        ttft = [o.first_token_time - o.arrival_time for o in outs
                if getattr(o, "first_token_time", None) is not None and getattr(o, "arrival_time", None)]
        results.append({
            "prompt_len": prompt_len, "batch": batch, "max_tokens": cfg.max_tokens, "seconds": best,
            "output_tok_s": got / best, "total_tok_s": (got + batch * prompt_len) / best,
            "ttft_ms": summarize(1000 * t for t in ttft),
        })
    bar.close()
    return {
        "mode": "offline", "model": cfg.model, "dtype": cfg.dtype, "threads": torch.get_num_threads(),
        "max_tokens": cfg.max_tokens, "load_seconds": load_s, "engine_config": engine_config,
        "peak_rss_bytes": peak_rss_bytes(), "results": results, "skipped": skipped,
    }


def format_markdown(report: dict) -> str:
    lines = [f"# Offline: {report['model']} {report['dtype']}, {report['threads']} threads, "
             f"{report['max_tokens']} new tokens, greedy, EOS ignored ({report.get('date', '')})", "",
             "| prompt | batch | output tok/s | total tok/s | seconds | TTFT p50 ms | TTFT p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        t = r["ttft_ms"]
        fmt = (lambda v: f"{v:.0f}" if v is not None else "-")
        lines.append(f"| {r['prompt_len']} | {r['batch']} | {r['output_tok_s']:.1f} | {r['total_tok_s']:.1f} "
                     f"| {r['seconds']:.2f} | {fmt(t['p50'])} | {fmt(t['p99'])} |")
    if report.get("peak_rss_bytes"):
        lines += ["", f"Peak resident memory: {report['peak_rss_bytes'] / 2**20:.0f} MiB"]
    for s in report.get("skipped", []):
        lines.append(f"- skipped prompt {s['prompt_len']} batch {s['batch']}: {s['reason']}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Output tok/s against batch size, one line per prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in sorted({r["prompt_len"] for r in report["results"]}):
        rs = [r for r in report["results"] if r["prompt_len"] == p]
        ax.plot([r["batch"] for r in rs], [r["output_tok_s"] for r in rs], marker="o", label=f"prompt {p}")
    ax.set_xscale("log", base=2)
    xs = sorted({r["batch"] for r in report["results"]})
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"gpt2serve offline ({report['dtype']}, {report['threads']} threads)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
