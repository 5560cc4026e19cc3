"""`gpt2serve serve`: the OpenAI-compatible HTTP server.

    gpt2serve serve --model random:gpt2 --host 127.0.0.1 --port 8000

Every option is also a GPT2SERVE_* environment variable (GPT2SERVE_MAX_NUM_SEQS=32, ...); a flag
given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gpt2serve.api.settings import Settings

# flag -> (Settings field, type, help); defaults come from Settings (and so from the environment)
_FLAGS: list[tuple[str, str, type, str]] = [
    ("--model", "model", str, "local folder, Hub id (gpt2, distilgpt2, ...) or random:<id>"),
    ("--served-model-name", "served_model_name", str, "model id shown to clients (default: the model's own)"),
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "port to listen on"),
    ("--dtype", "dtype", str, "auto | float32 | bfloat16 | float16 | int8"),
    ("--device", "device", str, "auto | cpu | cuda"),
    ("--threads", "threads", int, "torch intra-op threads (default: all cores)"),
    ("--kernels", "kernels", str, "auto (gpt2serve's AVX-512 / AMX kernels where the CPU runs them, else oneDNN and fbgemm) | torch (plain torch ops)"),
    ("--max-num-seqs", "max_num_seqs", int, "running sequences per engine step"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "tokens per engine step (prefill chunks + decodes)"),
    ("--prefill-first-tokens", "prefill_first_tokens", int,
     "new prompts totalling at most this many tokens get a step of their own, ahead of the decodes (0: never)"),
    ("--max-queue", "max_queue", int, "waiting requests before 429 overloaded"),
    ("--kv-cache-memory", "kv_cache_memory", str, "KV cache size in bytes (e.g. 2GiB) or auto"),
    ("--kv-cache-dtype", "kv_cache_dtype", str,
     "auto (the model's float dtype) | int8 (per-head int8 K/V with fp32 scales: ~half the memory and decode-attention reads)"),
    ("--max-body-bytes", "max_body_bytes", int, "request bodies above this get 413"),
    ("--keepalive-seconds", "keepalive_seconds", float, "SSE keep-alive comment interval"),
    ("--database-url", "database_url", str, "accounts database (sqlite:///file.db or postgresql+psycopg://...)"),
    ("--instance-name", "instance_name", str, "this replica's stable name in a shared ledger (default: host name)"),
    ("--eval-report", "eval_report", str, "JSON report of `gpt2serve eval` shown on the model page"),
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2serve serve", description="Run the OpenAI-compatible HTTP server.",
                                epilog="Every option can also be set as GPT2SERVE_<NAME> in the environment.")
    for flag, dest, typ, help_ in _FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    p.add_argument("--no-auth", dest="auth", action="store_false", default=None,
                   help="serve without API keys (local use; usage is still recorded)")
    p.add_argument("--auth", dest="auth", action="store_true", default=None, help="require API keys (default)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {dest: getattr(args, dest) for _, dest, _, _ in _FLAGS if getattr(args, dest) is not None}
    if args.auth is not None:
        overrides["auth"] = args.auth
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = settings_from_args(args)
    except Exception as e:  # pydantic: a bad GPT2SERVE_* value
        print(f"gpt2serve serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from gpt2serve.api.app import create_app

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(exc: BaseException) -> None:
        # a server that cannot load its model should not sit there answering 503 forever
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if not settings.auth:
        logging.getLogger(__name__).warning("--no-auth: anyone who can reach %s:%d can generate", settings.host, settings.port)
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
