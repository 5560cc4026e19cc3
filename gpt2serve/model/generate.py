"""`gpt2serve generate PROMPT`: the generated text on stdout as it is produced; diagnostics on stderr."""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2serve generate", description="Generate text from a prompt with GPT-2.")
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--model", default="random:gpt2", help="local folder, Hub id (gpt2, distilgpt2, ...) or random:<id>")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (CUDA) | int8")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    from gpt2serve.engine import LLM, ContextLengthExceeded, ParamError, SamplingParams
    from gpt2serve.model.loader import CheckpointError, load_model

    t0 = time.perf_counter()
    try:
        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"gpt2serve generate: {e}", file=sys.stderr)
        return 1
    kind = "random weights" if loaded.random_weights else loaded.source
    print(f"[{loaded.name} ({kind}), {loaded.num_parameters / 1e6:.0f}M params, {loaded.dtype}, {loaded.device}; "
          f"loaded in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    llm = LLM(loaded=loaded, max_num_seqs=1, kv_cache_memory=None)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop,
    )
    ids = loaded.tokenizer.encode(prompt) or [loaded.tokenizer.eos_token_id]  # an empty prompt starts a document
    n, t1 = 0, time.perf_counter()
    try:
        for out in llm.stream(ids, params):
            for so in out.outputs:
                n += len(so.token_ids)
                if so.text:
                    sys.stdout.write(so.text)
                    sys.stdout.flush()
    except (ParamError, ContextLengthExceeded) as e:
        print(f"gpt2serve generate: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    dt = time.perf_counter() - t1
    print(f"[{n} tokens in {dt:.2f}s, {n / dt if dt else 0:.1f} tok/s]", file=sys.stderr)
    return 0
