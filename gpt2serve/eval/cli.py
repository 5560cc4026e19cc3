"""`gpt2serve eval TASK... --model M [--data DIR] [--limit N] [--output results.json] [--api URL]`

Runs the GPT-2 paper's zero-shot tasks and prints a markdown table beside the published numbers;
`--output` also writes everything (metrics, data sizes, timings, the table rows) as JSON.
Backends: the engine in process (default), `--api URL` (any OpenAI-compatible /v1/completions),
or `--backend hf` (transformers directly, a reference). See METHODS.md for how each metric is made.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from gpt2serve.eval import data
from gpt2serve.eval.published import published_size_for
from gpt2serve.eval.report import comparison_rows, markdown_table
from gpt2serve.eval.scoring import ApiScorer, Scorer, get_tokenizer, run_requests
from gpt2serve.eval.tasks import TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2serve eval", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks", nargs="+", metavar="TASK", help=f"one or more of: {', '.join(TASKS)}, or all")
    p.add_argument("--model",
                   help="model to load (folder, Hub id, random:<id>); with --api, the model name sent to the server "
                        "(default there: the first of its /v1/models)")
    p.add_argument("--data", metavar="DIR", help=f"evaluation data folder (else ${data.ENV_VAR}, else ../shared/data/eval)")
    p.add_argument("--limit", type=int, help="first N examples (lambada, cbt), lines (wikitext, ptb, 1bw, enwik8) or words (text8)")
    p.add_argument("--output", metavar="FILE", help="write the results as JSON")
    p.add_argument("--api", metavar="URL", help="score through an OpenAI-compatible server instead of in process")
    p.add_argument("--api-key", help="bearer key for --api (else $GPT2SERVE_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight with --api (default 4)")
    p.add_argument("--prompts-per-request", type=int, default=8, help="prompts per HTTP request with --api (default 8)")
    p.add_argument("--backend", choices=("engine", "hf"), default="engine", help="in-process backend (default engine)")
    p.add_argument("--batch-size", type=int, default=32, help="requests handed to the scorer at once (default 32)")
    p.add_argument("--window", type=int, help="tokens per scoring window (default: the model's context, 1024)")
    p.add_argument("--stride", type=int, help="tokens a window advances (default window // 2 = 512)")
    p.add_argument("--dtype", default="float32", help="in-process weights dtype (default float32)")
    p.add_argument("--device", default="auto", help="in-process device: cpu, cuda, cuda:N, auto (default)")
    p.add_argument("--published", choices=("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"),
                   help="paper row to compare against (default: from the model's shape or name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def make_scorer(args) -> Scorer:
    if args.api:
        return ApiScorer(args.api, args.model, api_key=args.api_key, max_length=args.window or 1024,
                         prompts_per_request=args.prompts_per_request, concurrency=args.concurrency)
    if args.backend == "hf":
        from gpt2serve.eval.scoring import TransformersScorer

        return TransformersScorer(args.model, dtype=args.dtype, device=args.device)
    from gpt2serve.eval.scoring import EngineScorer

    return EngineScorer(args.model, dtype=args.dtype, device=args.device)


def evaluate(tasks: list[str], scorer: Scorer, tok=None, data_dir=None, limit: int | None = None,
             window: int | None = None, stride: int | None = None, batch_size: int = 32,
             progress: bool = True) -> dict[str, dict]:
    """Run tasks with a scorer; returns {task: {"metrics", "info", "timing", "data", "limit"}}."""
    tok = tok or getattr(scorer, "tokenizer", None) or get_tokenizer()
    window = window or scorer.max_length
    if window > scorer.max_length:
        raise ValueError(f"--window {window} exceeds the model's context of {scorer.max_length}")
    stride = stride or window // 2
    paths = {t: data.find(t, data_dir) for t in tasks}
    results = {}
    for name in tasks:
        prep = TASKS[name].prepare(paths[name], tok, limit, window, stride)
        scores, timing = run_requests(scorer, prep.requests, batch_size, desc=name, progress=progress)
        results[name] = {"metrics": prep.finish(scores), "info": prep.info, "timing": timing,
                         "data": str(paths[name]), "limit": limit}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model and not args.api:
        parser.error("--model is required (or --api URL)")
    tasks = list(TASKS) if args.tasks == ["all"] else args.tasks
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"gpt2serve eval: unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)} or all",
              file=sys.stderr)
        return 2
    missing = []
    for t in tasks:  # before loading any model: every missing file reported at once
        try:
            data.find(t, args.data)
        except data.MissingDataError as e:
            missing.append(str(e))
    if missing:
        print("gpt2serve eval: missing data\n" + "\n".join(missing), file=sys.stderr)
        return 2

    t0 = time.time()
    scorer = make_scorer(args)
    try:
        results = evaluate(tasks, scorer, data_dir=args.data, limit=args.limit, window=args.window,
                           stride=args.stride, batch_size=args.batch_size, progress=not args.no_progress)
    finally:
        scorer.close()
    model_name = getattr(scorer, "model", None) if args.api else args.model
    size = args.published or published_size_for(model_name or "", getattr(scorer, "shape", None))
    rows = comparison_rows(results, size)
    table = markdown_table(rows, size)
    print(table)
    if args.limit is not None:
        print(f"\n(--limit {args.limit}: a slice of each test set; not comparable with the published numbers)")
    if args.output:
        out = {"model": model_name, "backend": "api" if args.api else args.backend, "api": args.api,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "dtype": None if args.api else args.dtype, "device": None if args.api else args.device,
               "published_row": size, "limit": args.limit, "seconds": round(time.time() - t0, 2),
               "tasks": results, "table": rows, "markdown": table}
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
