"""The engine: Engine.step() = schedule, execute, make outputs; AsyncEngine runs it in a thread;
LLM is the synchronous front for eval and bench."""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import torch

from gpt2serve.engine.kv_cache import BlockAllocator
from gpt2serve.engine.outputs import RequestOutput, SequenceOutput, TokenLogprob
from gpt2serve.engine.request import FINISH_REASON, Request, Sequence, Status
from gpt2serve.engine.runner import ModelRunner
from gpt2serve.engine.sampler import seed_generator
from gpt2serve.engine.sampling import ParamError, SamplingParams
from gpt2serve.engine.scheduler import Chunk, Scheduler, SchedulerConfig
from gpt2serve.model.gpt2 import KVCache

log = logging.getLogger("gpt2serve.engine")


class EngineOverloaded(Exception):
    """The waiting queue is full: the HTTP layer answers 429 (type "overloaded") with Retry-After."""

    def __init__(self, waiting: int, limit: int):
        super().__init__(f"The server is overloaded: {waiting} requests are waiting (limit {limit}). Retry shortly.")
        self.retry_after = 1.0


class ContextLengthExceeded(ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int):
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit
        super().__init__(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
            f"Please reduce the prompt or the completion length."
        )


def parse_bytes(v: str | int | None) -> int | None:
    if v is None or v == "auto":
        return None
    if isinstance(v, int):
        return v
    s = v.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    for u, m in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


@dataclass
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # a step computes only new prompts when they total at most this many tokens (scheduler.py); 0: never
    prefill_first_tokens: int = 256
    max_queue: int = 256
    block_size: int = 16
    # KV-cache budget in bytes; None = enough for max_num_seqs full contexts, capped at 2 GiB and a
    # quarter of the machine's memory. The cache is allocated once and never grows past it.
    kv_cache_memory: int | None = None
    threads: int | None = None
    # "auto": the fastest kernels this CPU has (gpt2serve/kernels' AVX-512 and AMX ones, oneDNN, fbgemm); "torch": plain torch
    # ops only (to measure what the kernels buy, or to rule them out)
    kernels: str = "auto"
    # "auto": K/V in the model's float dtype (bf16 for int8 weights where the CPU has native bf16);
    # "int8": each head's K and V as int8 with an fp32 scale (gpt2.KVCache), about half the bytes
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        if self.kernels not in ("auto", "torch"):
            raise ValueError(f"kernels must be 'auto' or 'torch', got {self.kernels!r}")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'int8', got {self.kv_cache_dtype!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every running sequence decodes each step)")
        if self.prefill_first_tokens < 0:
            raise ValueError("prefill_first_tokens must be >= 0")
        self.kv_cache_memory = parse_bytes(self.kv_cache_memory)


def keep_freed_memory() -> None:
    """Stop glibc from handing freed memory back to the OS between steps.

    A forward allocates megabytes of temporaries per op (a 512-token prefill: ~6 MB per MLP
    activation). glibc serves blocks above 128 KiB-32 MiB with mmap and unmaps them on free, and trims
    the heap, so every step faults fresh pages in again, and in these VMs touching returned memory
    is slow (PERF-NOTES). Measured with the peers workload: prefill 512 fp32 704 -> 796 tok/s, bf16
    1063 -> 1354; decode unchanged. Process-wide, harmless elsewhere; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB (the maximum) come from the heap
    libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap instead of trimming it


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 2**30


class Engine:
    """Synchronous core. Not thread-safe: AsyncEngine drives it from one thread."""

    def __init__(self, loaded, config: EngineConfig | None = None):
        self.loaded = loaded
        self.config = config or EngineConfig()
        cfg = loaded.config
        self.model_config = cfg
        self.tokenizer = loaded.tokenizer
        self.eos = loaded.tokenizer.eos_token_id
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        keep_freed_memory()
        model = loaded.model.prepare_for_serving(int8=loaded.dtype == "int8", kernels=self.config.kernels)
        device = next(model.parameters()).device
        kv_dtype = model.kv_dtype  # the weights' float dtype; bf16 for int8 on CPUs with native bf16
        cache_dtype = torch.int8 if self.config.kv_cache_dtype == "int8" else kv_dtype
        per_token = KVCache.bytes_per_token(cfg, cache_dtype)
        budget = self.config.kv_cache_memory
        if budget is None:
            budget = min(self.config.max_num_seqs * cfg.n_positions * per_token, 2 * 2**30, _total_memory() // 4)
        bs = self.config.block_size
        num_blocks = budget // (per_token * bs)
        min_blocks = -(-cfg.n_positions // bs)
        if num_blocks < min_blocks:
            raise ValueError(
                f"kv_cache_memory {budget} bytes holds {num_blocks * bs} tokens, less than one full context "
                f"({cfg.n_positions} tokens = {per_token * cfg.n_positions} bytes)"
            )
        self.kv_cache_bytes = num_blocks * bs * per_token
        self.cache = KVCache(cfg, num_blocks, bs, cache_dtype, device, compute_dtype=kv_dtype)
        model.refresh_gemv_weights()  # see there: the kernels stream copies made now faster
        self.allocator = BlockAllocator(num_blocks, bs)
        self.scheduler = Scheduler(
            SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                            self.config.prefill_first_tokens), self.allocator
        )
        self.runner = ModelRunner(model, self.cache, self.eos)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%s)",
            num_blocks, bs, num_blocks * bs, self.kv_cache_bytes / 2**20, cache_dtype,
        )

    # -- requests ------------------------------------------------------------------------------

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Everything that can be said about a request before it is queued (raises)."""
        cfg = self.model_config
        params.validate(cfg.vocab_size)
        if not prompt_token_ids:
            raise ParamError("prompt", "The prompt is empty: it must have at least one token.")
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise ParamError("prompt", f"Token id {bad!r} in the prompt is not in [0, {cfg.vocab_size}).")
        if len(prompt_token_ids) + params.max_tokens > cfg.n_positions:
            raise ContextLengthExceeded(len(prompt_token_ids), params.max_tokens, cfg.n_positions)
        probe = Request("probe", prompt_token_ids, params)
        if not self.scheduler.can_ever_fit(probe):
            raise ParamError(
                "n" if params.best_of is None else "best_of",
                f"This request needs more sequences or KV cache than the server holds "
                f"(max {self.config.max_num_seqs} sequences, {self.allocator.num_blocks * self.allocator.block_size} cached tokens).",
            )

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        self.check(prompt_token_ids, params)
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id}")
        req = Request(request_id, list(prompt_token_ids), params)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        seq = self._new_seq(req, 0)
        req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def _new_seq(self, req: Request, index: int) -> Sequence:
        seq = Sequence(next(self._seq_ids), req, index, list(req.prompt_token_ids))
        seq.detok = self.tokenizer.detokenizer()
        if req.params.seed is not None and not req.params.greedy:
            seq.generator = seed_generator(req.params.seed, index, self.runner.device)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.aborted = True
        for s in req.seqs:
            s.finish(Status.FINISHED_ABORTED)
        self.scheduler.release_request(req)
        return RequestOutput(
            request_id, req.prompt_token_ids, None,
            [SequenceOutput(s.index, "", [], None, s.num_output, s.cumulative_logprob, "abort") for s in req.seqs],
            finished=True, arrival_time=req.arrival_time,
        )

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> dict:
        return {
            "running": self.scheduler.num_running_requests,
            "running_sequences": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.allocator.num_blocks,
            "kv_blocks_free": self.allocator.num_free,
            "kv_block_size": self.allocator.block_size,
            "kv_cache_bytes": self.kv_cache_bytes,
        }

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, execute, make outputs."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        now = time.monotonic()
        sample_seqs: list[tuple[Sequence, int]] = []
        plp_chunks: list[int] = []
        forks: list[tuple[Sequence, Sequence]] = []
        for ci, c in enumerate(chunks):
            s, req = c.seq, c.seq.request
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            if req.prompt_logprobs is not None and s.in_prefill:
                plp_chunks.append(ci)
            if not s.in_prefill:
                sample_seqs.append((s, ci))
            elif c.completes_prompt and req.params.max_tokens > 0:
                sample_seqs.append((s, ci))
                for k in range(1, req.params.num_sequences):
                    child = self._new_seq(req, k)
                    req.seqs.append(child)
                    forks.append((s, child))
                    sample_seqs.append((child, ci))

        result = self.runner.run(chunks, sample_seqs, plp_chunks)

        completing = [c.completes_prompt for c in chunks]
        touched: dict[str, Request] = {}
        for c in chunks:
            c.seq.num_computed += c.num_tokens
            touched[c.seq.request.request_id] = c.seq.request
        for parent, child in forks:
            copy = self.scheduler.fork(parent, child)
            if copy is not None:
                self.cache.copy_block(*copy)
        for c, done_prompt in zip(chunks, completing):
            lps = result.prompt_lps.get(c.seq.seq_id)
            if lps:
                c.seq.request.prompt_logprobs.extend(lps)
            if done_prompt and c.seq.request.params.max_tokens == 0:
                self._finish_without_output(c.seq.request)
        t = time.monotonic()
        for s, _ in sample_seqs:
            tok, lp, top = result.sampled[s.seq_id]
            if s.request.first_token_time is None:
                s.request.first_token_time = t
            self._append(s, tok, lp, top)
        return [self._output(req) for req in touched.values() if self._has_news(req)]

    def _finish_without_output(self, req: Request) -> None:
        """max_tokens == 0 (echo / scoring): the prompt is the whole answer, for every sequence."""
        for k in range(1, req.params.num_sequences):
            child = self._new_seq(req, k)
            req.seqs.append(child)
        for s in req.seqs:
            s.finish(Status.FINISHED_LENGTH)
            self.scheduler.release(s)

    def _append(self, s: Sequence, tok: int, lp: float | None, top) -> None:
        p = s.request.params
        s.token_ids.append(tok)
        s.pending_ids.append(tok)
        if lp is not None:
            s.cumulative_logprob += lp
            if p.logprobs is not None:
                s.pending_logprobs.append(TokenLogprob(tok, lp, top or []))
        if tok == self.eos and not p.ignore_eos:
            s.finish(Status.FINISHED_STOPPED, None)
        elif tok in p.stop_token_ids:
            s.finish(Status.FINISHED_STOPPED, tok)
        else:
            new = s.detok.feed([tok])
            if new:
                s.text += new
                if p.stop and s.num_output >= p.min_tokens:
                    self._check_stop_strings(s, len(new))
        if not s.finished and (s.num_output >= p.max_tokens or len(s.token_ids) >= self.model_config.n_positions):
            s.finish(Status.FINISHED_LENGTH)
        if s.finished:
            if s.status == Status.FINISHED_LENGTH:
                s.text += s.detok.flush()
            self.scheduler.release(s)

    def _check_stop_strings(self, s: Sequence, new_len: int) -> None:
        p = s.request.params
        longest = max(len(x) for x in p.stop)
        # only a window that can hold a stop string touching the new text needs searching
        from_ = max(s.emitted, len(s.text) - new_len - longest + 1, 0)
        best = None
        for stop in p.stop:
            i = s.text.find(stop, from_)
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        if best is not None:
            i, stop = best
            s.text = s.text[: i + len(stop)] if p.include_stop_str_in_output else s.text[:i]
            s.finish(Status.FINISHED_STOPPED, stop)

    def _held_back(self, s: Sequence) -> int:
        """Characters at the end of the text that may be the start of a stop string."""
        stops = s.request.params.stop
        if not stops or s.finished:
            return 0
        text = s.text
        hold = 0
        for stop in stops:
            for k in range(min(len(stop) - 1, len(text) - s.emitted), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def _has_news(self, req: Request) -> bool:
        return req.finished or any(s.pending_ids for s in req.seqs) or (
            req.prompt_logprobs is not None and not req.prompt_logprobs_sent and not req.seqs[0].in_prefill
        )

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for s in req.seqs:
            if not s.pending_ids and not (s.finished and not s.final_sent):
                continue
            end = len(s.text) - self._held_back(s)
            text = s.text[s.emitted : end] if end > s.emitted else ""
            s.emitted = max(s.emitted, end)
            outs.append(
                SequenceOutput(
                    index=s.index,
                    text=text,
                    token_ids=s.pending_ids,
                    logprobs=s.pending_logprobs if req.params.logprobs is not None else None,
                    num_tokens=s.num_output,
                    cumulative_logprob=s.cumulative_logprob,
                    finish_reason=FINISH_REASON.get(s.status),
                    stop_reason=s.stop_reason,
                )
            )
            s.pending_ids, s.pending_logprobs = [], []
            s.final_sent = s.finished
        plp = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent and not req.seqs[0].in_prefill:
            plp, req.prompt_logprobs_sent = req.prompt_logprobs, True
        finished = req.finished
        if finished:
            self.requests.pop(req.request_id, None)
            self.scheduler.release_request(req)
        return RequestOutput(
            req.request_id, req.prompt_token_ids, plp, outs, finished,
            req.arrival_time, req.first_scheduled_time, req.first_token_time,
        )


# ---------------------------------------------------------------------------------------------


class AsyncEngine:
    """Runs Engine.step() in a background thread; the HTTP layer awaits deltas per request.

    Torch releases the GIL inside its kernels, so the event loop stays responsive while a step runs.
    """

    def __init__(self, loaded, config: EngineConfig | None = None):
        """`loaded`: a LoadedModel, or a zero-argument function that loads one.

        NOTE(engine): pass the loader. The thread that steps the engine should be the only one that
        ever runs torch's OpenMP regions: once a second thread has run them (loading the model in a
        worker thread, say), libgomp manages more threads than there are cores, throttles its barrier
        spinning, and every small parallel op of a step pays for futex sleeps. Measured (int8, batch
        1, 2 cores): model loaded in another thread 58-68 tok/s, loaded in the engine thread 103-107.
        """
        self._source = loaded
        self.config = config or EngineConfig()
        self.engine: Engine | None = None
        self.loaded = None if callable(loaded) else loaded
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stats: dict = {}
        self._waiting_estimate = 0
        self.error: BaseException | None = None

    def start(self) -> "AsyncEngine":
        """Start the engine thread; it loads the model (when given a loader) and builds the engine.
        Blocks until the engine is ready, and raises what loading raised."""
        self._thread = threading.Thread(target=self._main, name="gpt2serve-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.engine is None:
            raise self.error
        return self

    def _main(self) -> None:
        try:
            self.loaded = self._source() if callable(self._source) else self._source
            self.engine = Engine(self.loaded, self.config)
            self.config = self.engine.config
            self._stats = self.engine.stats()
        except BaseException as e:
            self.error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def stats(self) -> dict:
        return dict(self._stats)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutput deltas until the request finishes. Raises ParamError,
        ContextLengthExceeded or EngineOverloaded before yielding anything. Stopping iteration
        early (a client that went away) aborts the request and frees its cache at once."""
        request_id = request_id or uuid.uuid4().hex
        self.engine.check(prompt_token_ids, params)  # pure checks; safe from this thread
        if not self.alive:
            raise RuntimeError("the engine is not running")
        # queued = in the scheduler's waiting queue + submitted but not yet picked up by the loop
        queued = len(self.engine.scheduler.waiting) + self._waiting_estimate
        if queued >= self.config.max_queue:
            raise EngineOverloaded(queued, self.config.max_queue)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, q)
        self._waiting_estimate += 1
        self._commands.put(("add", request_id, list(prompt_token_ids), params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def _deliver(self, batch: list[tuple[asyncio.Queue, object]]) -> None:
        for q, item in batch:
            q.put_nowait(item)

    def _publish(self, outputs: Iterable[RequestOutput | tuple[str, BaseException]]) -> None:
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for o in outputs:
            rid, item = (o.request_id, o) if isinstance(o, RequestOutput) else o
            target = self._streams.get(rid)
            if target is not None:
                per_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in per_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass

    def _drain_commands(self) -> None:
        eng = self.engine
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params = cmd
                self._waiting_estimate -= 1
                if rid not in self._streams:  # the client left before we saw it
                    continue
                try:
                    eng.add_request(rid, ids, params)
                except Exception as e:  # validated already; a race (duplicate id) lands here
                    self._publish([(rid, e)])
            elif cmd[0] == "abort":
                eng.abort(cmd[1])

    def _loop(self) -> None:
        eng = self.engine
        try:
            with torch.inference_mode():
                while not self._stop:
                    self._drain_commands()
                    if not eng.has_unfinished():
                        self._stats = eng.stats()
                        self._wake.wait(timeout=0.5)
                        self._wake.clear()
                        continue
                    outputs = eng.step()
                    self._stats = eng.stats()
                    self._stats["waiting"] += max(self._waiting_estimate, 0)
                    self._publish(outputs)
        except BaseException as e:  # a bug in the engine: fail every open stream, loudly
            log.exception("engine loop crashed")
            self.error = e
            self._publish([(rid, RuntimeError(f"engine failure: {e}")) for rid in list(self._streams)])


# ---------------------------------------------------------------------------------------------


class LLM:
    """Synchronous batch generation (eval, bench, `gpt2serve generate`): outputs hold whole sequences."""

    def __init__(self, model: str = "random:gpt2", dtype: str = "float32", device: str = "cpu", loaded=None, **engine_config):
        if loaded is None:
            from gpt2serve.model.loader import load_model

            loaded = load_model(model, dtype=dtype, device=device)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.engine = Engine(loaded, EngineConfig(**engine_config))

    def stream(self, prompt_token_ids: list[int], params: SamplingParams) -> Iterable[RequestOutput]:
        rid = uuid.uuid4().hex
        self.engine.add_request(rid, prompt_token_ids, params)
        try:
            with torch.inference_mode():
                while True:
                    for out in self.engine.step():
                        yield out
                        if out.request_id == rid and out.finished:
                            return
        finally:
            self.engine.abort(rid)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], progress: bool = False) -> list[RequestOutput]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [uuid.uuid4().hex for _ in prompts]
        final: dict[str, RequestOutput] = {}
        seqs: dict[str, dict[int, SequenceOutput]] = {}
        pending = list(zip(ids, prompts, plist))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), unit="req", file=__import__("sys").stderr)
        with torch.inference_mode():
            while pending or self.engine.has_unfinished():
                # feed the queue without exceeding it, so any number of prompts works
                while pending and len(self.engine.scheduler.waiting) < max(self.engine.config.max_queue, 1):
                    rid, p, sp = pending.pop(0)
                    self.engine.add_request(rid, p, sp)
                for out in self.engine.step():
                    acc = seqs.setdefault(out.request_id, {})
                    if out.request_id not in final:
                        final[out.request_id] = RequestOutput(out.request_id, out.prompt_token_ids, None, [], False, out.arrival_time)
                    f = final[out.request_id]
                    if out.prompt_logprobs is not None:
                        f.prompt_logprobs = out.prompt_logprobs
                    f.first_scheduled_time = out.first_scheduled_time
                    f.first_token_time = out.first_token_time
                    for so in out.outputs:
                        a = acc.get(so.index)
                        if a is None:
                            a = acc[so.index] = SequenceOutput(so.index, "", [], [] if so.logprobs is not None else None)
                        a.text += so.text
                        a.token_ids += so.token_ids
                        if so.logprobs is not None:
                            a.logprobs = (a.logprobs or []) + so.logprobs
                        a.num_tokens, a.cumulative_logprob = so.num_tokens, so.cumulative_logprob
                        a.finish_reason, a.stop_reason = so.finish_reason, so.stop_reason
                    if out.finished:
                        f.finished = True
                        f.outputs = [acc[k] for k in sorted(acc)]
                        if bar:
                            bar.update(1)
        if bar:
            bar.close()
        return [final[r] for r in ids]
