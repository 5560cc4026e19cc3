"""`gpt2serve bench offline|serve|peers`: speed of the engine in-process, of a live server, and of peers.

    gpt2serve bench offline --model random:gpt2 --dtype bfloat16      # batch 1,8,32,64 x prompt 32,512
    gpt2serve bench serve --url http://127.0.0.1:8000 --server-pid $(pgrep -f 'gpt2serve serve')
    gpt2serve bench peers --quick                                      # = python -m gpt2serve.bench.peers

offline and serve write <out>/<mode>.json, .md and .png (default out: bench-results/) and print the
markdown table; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path


def _ints(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2serve bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--max-tokens", type=int, default=128, help="new tokens per sequence (EOS ignored)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--out", default="bench-results", help="folder for <mode>.json/.md/.png ('' = print only)")
    common.add_argument("--no-plot", action="store_true")
    common.add_argument("--no-progress", action="store_true")

    o = sub.add_parser("offline", parents=[common], help="the engine in-process (LLM), no HTTP")
    o.add_argument("--model", default="random:gpt2", help="folder, Hub id or random:<id>")
    o.add_argument("--dtype", default="float32", help="float32 | bfloat16 | int8 | ...")
    o.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32, 64])
    o.add_argument("--prompt-lens", type=_ints, default=[32, 512])
    o.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or the engine's)")
    o.add_argument("--repeats", type=int, default=1, help="timed runs per shape (best kept)")
    o.add_argument("--engine-config", default=None, help='extra EngineConfig fields as JSON, e.g. \'{"max_num_batched_tokens": 4096}\'')

    s = sub.add_parser("serve", parents=[common], help="load generator against a running server (streaming /v1/completions)")
    s.add_argument("--url", default="http://127.0.0.1:8000")
    s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default: $OPENAI_API_KEY)")
    s.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    s.add_argument("--concurrency", type=_ints, default=[1, 8, 32, 64])
    s.add_argument("--requests-per-client", type=int, default=2)
    s.add_argument("--prompt-len", type=int, default=32)
    s.add_argument("--idle-requests", type=int, default=5, help="sequential max_tokens=1 requests for the idle TTFT baseline")
    s.add_argument("--arrivals", choices=["staggered", "burst"], default="staggered",
                   help="staggered: steady state, each client's first measured request offset by a lead-in "
                        "request of i/C of max_tokens; burst: all clients start at once (bench/serve.py)")
    s.add_argument("--no-warmup", action="store_true")
    s.add_argument("--server-pid", type=int, default=None, help="report the server's peak resident memory (Linux /proc)")
    s.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")

    sub.add_parser("peers", add_help=False, help="peer engines on the same weights (python -m gpt2serve.bench.peers)")
    return p


def _write(report: dict, md: str, out: str, mode: str, plot_fn, no_plot: bool) -> None:
    print(md)
    if not out:
        return
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{mode}.json").write_text(json.dumps(report, indent=2))
    (d / f"{mode}.md").write_text(md + "\n")
    written = [d / f"{mode}.json", d / f"{mode}.md"]
    if not no_plot:
        plot_fn(report, str(d / f"{mode}.png"))
        written.append(d / f"{mode}.png")
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "peers":
        from gpt2serve.bench import peers

        return peers.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.max_tokens <= 0:
        print("gpt2serve bench: --max-tokens must be positive", file=sys.stderr)
        return 2
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "gpt2serve bench " + " ".join(argv)

    if args.mode == "offline":
        from gpt2serve.bench import offline

        threads = args.threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None)
        cfg = offline.OfflineConfig(
            model=args.model, dtype=args.dtype, batch_sizes=args.batch_sizes, prompt_lens=args.prompt_lens,
            max_tokens=args.max_tokens, threads=threads, repeats=args.repeats, seed=args.seed,
            engine_config=json.loads(args.engine_config) if args.engine_config else {},
        )
        report = offline.run_offline(cfg, progress=not args.no_progress)
        report.update(date=date, command=command)
        _write(report, offline.format_markdown(report), args.out, "offline", offline.plot, args.no_plot)
        return 0

    from gpt2serve.bench import serve

    cfg = serve.ServeConfig(
        url=args.url, api_key=args.api_key, model=args.model, concurrency=args.concurrency,
        requests_per_client=args.requests_per_client, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
        idle_requests=args.idle_requests, warmup=not args.no_warmup, server_pid=args.server_pid,
        arrivals=args.arrivals,
        seed=args.seed, timeout=args.timeout,
    )
    report = asyncio.run(serve.run_serve(cfg, progress=not args.no_progress))
    report.update(date=date, command=command)
    _write(report, serve.format_markdown(report), args.out, "serve", serve.plot, args.no_plot)
    failed = sum(lv["errors"] for lv in report["levels"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
