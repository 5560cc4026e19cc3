"""Serving: an OpenAI request -> token ids + SamplingParams -> engine -> JSON response or SSE chunks.

Each prompt of a request is one engine request (`<response id>-<prompt index>`); its sequences
(n, or best_of) become choices with index = prompt_index * n + i. All prompts run concurrently
(the engine batches them); one task per prompt pushes the engine's deltas into a queue that the
response side drains. On every exit path (done, error, client gone) the engine requests are aborted
and billing is settled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gpt2serve.api import protocol as P
from gpt2serve.api.errors import APIError, invalid, not_found, rate_limited
from gpt2serve.api.metrics import Metrics, RequestTimer
from gpt2serve.api.settings import Settings
from gpt2serve.engine import ContextLengthExceeded, EngineOverloaded
from gpt2serve.engine.outputs import RequestOutput, TokenLogprob
from gpt2serve.engine.sampling import ParamError, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class ServerContext:
    """What routes reach through `request.app.state.ctx`."""

    settings: Settings
    metrics: Metrics | None = None
    loaded: Any = None  # gpt2serve.model.loader.LoadedModel, once loaded
    engine: Any = None  # gpt2serve.engine.AsyncEngine, once started
    store: Any = None  # gpt2serve.accounts.AccountStore
    billing: Any = None  # gpt2serve.accounts.Billing
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or (self.loaded.name if self.loaded else self.settings.model)


def _lp(x: float) -> float:
    """A logprob safe for JSON: -inf (a token masked out) and NaN become LOGPROB_FLOOR."""
    return x if math.isfinite(x) else (P.LOGPROB_FLOOR if x != math.inf else 0.0)


def _nchars(b: bytes) -> int:
    # characters a token adds to valid UTF-8 text: its bytes that are not continuation bytes
    return sum(1 for c in b if c & 0xC0 != 0x80)


def sse(obj: Any) -> str:
    return f"data: {obj}\n\n"


KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"


class TokenText:
    """Token id -> display string and bytes for logprobs. A token holding part of a UTF-8 character
    is shown as OpenAI shows it ("bytes:\\xe2\\x80"), so no two tokens ever share a string."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[int, str] = {}

    def bytes(self, token_id: int) -> bytes:
        return self.tok.token_bytes(token_id)

    def str(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            b = self.tok.token_bytes(token_id)
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                s = "bytes:" + "".join(f"\\x{c:02x}" for c in b)
            self._cache[token_id] = s
        return s

    def top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        d: dict[str, float] = {}
        for tid, lp in top:  # best first; setdefault keeps the best under any (impossible) clash
            d.setdefault(self.str(tid), _lp(lp))
        return d


@dataclass
class Prompt:
    text: str  # what `echo` returns
    ids: list[int]


@dataclass
class SeqState:
    """One sequence's accumulated output (non-streaming) or running offsets (streaming)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_tokens: int = 0
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    offset: int = 0  # text_offset of the next token (characters from the start of the prompt)
    started: bool = False  # chat: the reply's leading space has been dealt with


class Generation:
    """The engine side of one HTTP request: one task per prompt feeding a queue of deltas."""

    def __init__(self, serving: "OpenAIServing", response_id: str, prompts: list[Prompt], params: SamplingParams):
        self.s = serving
        self.engine = serving.ctx.engine
        self.response_id = response_id
        self.prompts = prompts
        self.params = params
        self.rids = [f"{response_id}-{i}" for i in range(len(prompts))]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished: set[int] = set()
        self.started = time.monotonic()
        self.timers = [RequestTimer(serving.metrics, self.started) for _ in prompts] if serving.metrics else None
        self.seqs: dict[tuple[int, int], SeqState] = {
            (i, j): SeqState() for i in range(len(prompts)) for j in range(params.num_sequences)
        }
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        self.tasks: list[asyncio.Task] = []
        self.replay: list = []  # events taken off the queue before the stream started
        self.cost: float | None = None  # USD, once settled

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._produce(i)) for i in range(len(self.prompts))]

    async def _produce(self, i: int) -> None:
        try:
            async for out in self.engine.generate(self.prompts[i].ids, self.params, self.rids[i]):
                self.queue.put_nowait(("out", i, out))
            self.queue.put_nowait(("done", i, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer, which maps it to an HTTP error
            self.queue.put_nowait(("error", i, e))

    def apply(self, i: int, out: RequestOutput) -> None:
        """Fold one delta into the per-sequence state; also feeds the metrics."""
        if out.prompt_logprobs is not None and i not in self.prompt_logprobs:
            self.prompt_logprobs[i] = out.prompt_logprobs
        n_new = 0
        for so in out.outputs:
            st = self.seqs[(i, so.index)]
            st.text.append(so.text)
            st.token_ids += so.token_ids
            if so.logprobs:
                st.logprobs += so.logprobs
            st.num_tokens = so.num_tokens or len(st.token_ids)
            st.cumulative_logprob = so.cumulative_logprob
            if so.finish_reason is not None:
                st.finish_reason, st.stop_reason = so.finish_reason, so.stop_reason
            n_new += len(so.token_ids)
        if self.timers:
            self.timers[i].on_output(time.monotonic(), out, n_new)
        if out.finished:
            self.finished.add(i)

    async def events(self, keepalive: float | None = None) -> AsyncIterator[tuple[str, int, Any]]:
        """Engine events until every prompt is done; ("keepalive", -1, None) after `keepalive`
        seconds without one. An engine error is raised here."""
        pending = len(self.prompts)
        while pending:
            if self.replay:
                kind, i, item = self.replay.pop(0)
            else:
                try:
                    kind, i, item = await asyncio.wait_for(self.queue.get(), keepalive)
                except TimeoutError:
                    yield "keepalive", -1, None
                    continue
            if kind == "error":
                raise item
            if kind == "done":
                pending -= 1
                self.finished.add(i)
                if self.timers:
                    self.timers[i].finish(time.monotonic())
                continue
            self.apply(i, item)
            yield kind, i, item

    async def close(self) -> None:
        """Stop the producers and abort what is still in the engine. Shielded: it runs while the
        request's task is being cancelled (client gone) and must still reach the engine."""
        with anyio.CancelScope(shield=True):
            for t in self.tasks:
                t.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            for i, rid in enumerate(self.rids):
                if i not in self.finished:
                    try:
                        await self.engine.abort(rid)
                    except Exception:  # an abort must never hide the original outcome
                        log.exception("abort of %s failed", rid)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(st.num_tokens for st in self.seqs.values())

    def finish_reason(self) -> str | None:
        return next((st.finish_reason for st in self.seqs.values() if st.finish_reason), None)


def _finish(reason: str | None) -> str | None:
    # the engine's "abort" only happens when we aborted it: no client sees it
    return reason if reason in ("stop", "length") else None


class OpenAIServing:
    def __init__(self, ctx: ServerContext):
        self.ctx = ctx
        self.metrics = ctx.metrics
        self._tt: TokenText | None = None

    # -- helpers ------------------------------------------------------------------------------

    def ready(self) -> None:
        if self.ctx.engine is None or self.ctx.loaded is None:
            if self.ctx.load_error:
                raise APIError(503, f"The model failed to load: {self.ctx.load_error}", "service_unavailable", None, "model_load_failed")
            raise APIError(503, "The model is still loading; retry shortly.", "service_unavailable", None, "model_loading",
                           {"Retry-After": "5"})

    @property
    def tokenizer(self):
        return self.ctx.loaded.tokenizer

    @property
    def tt(self) -> TokenText:
        if self._tt is None:
            self._tt = TokenText(self.tokenizer)
        return self._tt

    @property
    def context_length(self) -> int:
        return int(self.ctx.loaded.config.n_positions)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def model_names(self) -> set[str]:
        names = {self.ctx.model_name, self.ctx.settings.model}
        if self.ctx.loaded is not None:
            names.add(self.ctx.loaded.name)
        return names

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names():
            raise not_found(f"The model '{model}' does not exist. This server serves '{self.ctx.model_name}'.",
                            param="model", code="model_not_found")

    def _ids(self, ids: list[int], param: str) -> list[int]:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} is out of range [0, {self.vocab_size})", param)
        return ids

    def prompts(self, prompt: P.PromptType) -> list[Prompt]:
        """The four prompt forms -> one Prompt per batch element. An empty string means
        <|endoftext|> (GPT-2's document boundary: unconditional generation)."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            items: list = [prompt]
        elif not prompt:
            raise invalid("prompt must not be an empty array", "prompt")
        elif all(isinstance(x, int) for x in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                ids = tok.encode(item) if item else [tok.eos_token_id]
                out.append(Prompt(item if item else tok.decode(ids), ids))
            else:
                if not item:
                    raise invalid(f"prompt[{i}] is an empty array of token ids", "prompt")
                ids = self._ids(list(item), "prompt")
                out.append(Prompt(tok.decode(ids), ids))
        return out

    def check_context(self, prompts: list[Prompt], max_tokens: int, param: str) -> None:
        limit = self.context_length
        for p in prompts:
            if len(p.ids) + max_tokens > limit:
                raise context_error(len(p.ids), max_tokens, limit, param)

    def validate(self, params: SamplingParams, max_logprobs: int) -> SamplingParams:
        return params.validate(self.vocab_size, max_logprobs=max_logprobs)

    async def reserve(self, key, gen: Generation):
        billing = self.ctx.billing
        if billing is None:
            return None
        return await billing.reserve(
            key, prompt_tokens=gen.prompt_tokens,
            max_completion_tokens=gen.params.max_tokens * gen.params.num_sequences * len(gen.prompts),
            model=self.ctx.model_name, generation_id=gen.response_id)

    async def settle(self, reservation, gen: Generation, *, streamed: bool, cancelled: bool, failed: bool) -> float:
        """Cost in USD (micro-USD from billing / 1e6); shielded so that a cancelled stream settles."""
        if gen.cost is not None:
            return gen.cost
        gen.cost = 0.0
        with anyio.CancelScope(shield=True):
            if self.metrics:
                self.metrics.prompt_tokens.inc(gen.prompt_tokens)
            if reservation is None:
                return 0.0
            try:
                micros = await self.ctx.billing.settle(
                    reservation, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                    finish_reason=gen.finish_reason(), streamed=streamed, cancelled=cancelled, failed=failed,
                    latency_s=time.monotonic() - gen.started)
            except Exception:
                log.exception("billing settle failed for %s", gen.response_id)
                return 0.0
            gen.cost = micros / 1e6
            return gen.cost

    def usage(self, gen: Generation, cost: float) -> P.UsageInfo:
        pt, ct = gen.prompt_tokens, gen.completion_tokens
        return P.UsageInfo(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct, cost=cost)

    def _outcome(self, endpoint: str, outcome: str) -> None:
        if self.metrics:
            self.metrics.requests.labels(endpoint, outcome).inc()

    # -- the request life cycle shared by both endpoints ------------------------------------------

    async def _run(self, raw: Request, key, gen: Generation, *, stream: bool, endpoint: str,
                   render_full, render_stream) -> Response:
        reservation = await self.reserve(key, gen)
        headers = {"X-Generation-Id": gen.response_id}
        if reservation is not None:
            headers.update(getattr(reservation, "headers", {}) or {})
        gen.start()
        if stream:
            try:
                gen.replay = await self._first_events(gen)
            except Exception as e:
                await self._abandon(reservation, gen, endpoint, cancelled=False)
                raise map_engine_error(e, endpoint) from None
            except BaseException:
                await self._abandon(reservation, gen, endpoint, cancelled=True)
                raise
            body = self._stream_body(gen, reservation, render_stream, endpoint)

            async def unstarted() -> None:
                # The client left before the body generator ran (its finally never will): clean up here.
                if gen.cost is None:
                    await gen.close()
                    await self.settle(reservation, gen, streamed=True, cancelled=True, failed=False)
                    self._outcome(endpoint, "cancelled")

            return SSEResponse(body, unstarted, headers=headers)

        outcome = "ok"
        try:
            if not await self._collect_unless_disconnected(raw, gen):
                outcome = "cancelled"
                return Response(status_code=499)  # nobody reads it: the client is gone
            cost = await self.settle(reservation, gen, streamed=False, cancelled=False, failed=False)
            return JSONResponse(render_full(gen, self.usage(gen, cost)).model_dump(mode="json"), headers=headers)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as e:
            outcome = "error"
            raise map_engine_error(e, endpoint) from None
        finally:
            await gen.close()
            await self.settle(reservation, gen, streamed=False, cancelled=outcome == "cancelled",
                              failed=outcome == "error")
            self._outcome(endpoint, outcome)

    async def _abandon(self, reservation, gen: Generation, endpoint: str, cancelled: bool) -> None:
        await gen.close()
        await self.settle(reservation, gen, streamed=True, cancelled=cancelled, failed=not cancelled)
        self._outcome(endpoint, "cancelled" if cancelled else "error")

    async def _first_events(self, gen: Generation) -> list:
        """Before committing a 200 to a stream, wait for each prompt's first event (or the first
        keep-alive interval), so that admission errors (overloaded -> 429, bad parameters -> 400)
        get their HTTP status instead of an error event inside a 200 stream."""
        got: list = []
        seen: set[int] = set()
        deadline = time.monotonic() + self.ctx.settings.keepalive_seconds
        while len(seen) < len(gen.prompts):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                ev = await asyncio.wait_for(gen.queue.get(), left)
            except TimeoutError:
                break
            if ev[0] == "error":
                raise ev[2]
            seen.add(ev[1])
            got.append(ev)
        return got

    async def _collect_unless_disconnected(self, raw: Request, gen: Generation) -> bool:
        """Drain the engine; False if the client disconnected first (the caller aborts)."""

        async def drain() -> None:
            async for _ in gen.events():
                pass

        async def disconnected() -> None:
            # After FastAPI read the body, the next ASGI message is http.disconnect, delivered the
            # moment the client goes: no polling needed (is_disconnected() would poll).
            while True:
                msg = await raw.receive()
                if msg["type"] == "http.disconnect":
                    return

        work, watch = asyncio.create_task(drain()), asyncio.create_task(disconnected())
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, watch):
                if not t.done():
                    t.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)
        if work in done:
            work.result()  # re-raise an engine error
            return True
        return False

    async def _stream_body(self, gen: Generation, reservation, render_stream, endpoint: str):
        outcome = "ok"
        try:
            async for chunk in render_stream(gen):
                if isinstance(chunk, _UsageChunk):
                    # include_usage: the engine is done; settle now so usage.cost is what was charged
                    await gen.close()
                    cost = await self.settle(reservation, gen, streamed=True, cancelled=False, failed=False)
                    chunk = chunk.render(cost)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except Exception as e:
            outcome = "error"
            yield sse(json.dumps(map_engine_error(e, endpoint).body()))
            yield DONE
        finally:
            await gen.close()
            await self.settle(reservation, gen, streamed=True, cancelled=outcome == "cancelled", failed=outcome == "error")
            self._outcome(endpoint, outcome)  # last: a request counted is a request settled

    # -- /v1/completions -----------------------------------------------------------------------

    async def create_completion(self, req: P.CompletionRequest, raw: Request, key) -> Response:
        self.ready()
        self.check_model(req.model)
        prompts = self.prompts(req.prompt)
        params = self.validate(req.to_sampling_params(), P.MAX_COMPLETION_LOGPROBS)
        self.check_context(prompts, params.max_tokens, "max_tokens")
        gen = Generation(self, P.random_id("cmpl"), prompts, params)
        return await self._run(raw, key, gen, stream=bool(req.stream), endpoint="completions",
                               render_full=lambda g, u: self._completion_response(req, g, u),
                               render_stream=lambda g: self._completion_stream(req, g))

    def _completion_logprobs(self, tls: list[TokenLogprob], offset: int) -> tuple[P.CompletionLogProbs, int]:
        tt = self.tt
        lp = P.CompletionLogProbs()
        for t in tls:
            lp.tokens.append(tt.str(t.token_id))
            lp.token_logprobs.append(_lp(t.logprob))
            lp.top_logprobs.append(tt.top_dict(t.top))
            lp.text_offset.append(offset)
            offset += _nchars(tt.bytes(t.token_id))
        return lp, offset

    def _prompt_logprobs(self, prompt: Prompt, plps: list[TokenLogprob | None]) -> tuple[P.CompletionLogProbs, int]:
        """Echoed prompt: the first token has no context, so null logprob and null top_logprobs."""
        tt = self.tt
        lp = P.CompletionLogProbs()
        offset = 0
        for pos, tid in enumerate(prompt.ids):
            t = plps[pos] if pos < len(plps) else None
            lp.tokens.append(tt.str(tid))
            lp.token_logprobs.append(None if t is None else _lp(t.logprob))
            lp.top_logprobs.append(None if t is None else tt.top_dict(t.top))
            lp.text_offset.append(offset)
            offset += _nchars(tt.bytes(tid))
        return lp, offset

    def _ranked(self, gen: Generation, i: int) -> list[SeqState]:
        """The n sequences returned for prompt i: with best_of, the n best by cumulative logprob."""
        seqs = [gen.seqs[(i, j)] for j in range(gen.params.num_sequences)]
        if gen.params.best_of is not None and gen.params.best_of > gen.params.n:
            seqs.sort(key=lambda s: s.cumulative_logprob, reverse=True)
        return seqs[: gen.params.n]

    def _completion_response(self, req: P.CompletionRequest, gen: Generation, usage: P.UsageInfo) -> P.CompletionResponse:
        choices = []
        for i, prompt in enumerate(gen.prompts):
            for j, st in enumerate(self._ranked(gen, i)):
                text = "".join(st.text)
                logprobs = None
                start = 0
                if req.echo:
                    text = prompt.text + text
                    start = len(prompt.text)
                if req.logprobs is not None:
                    if req.echo and i in gen.prompt_logprobs:
                        logprobs, start = self._prompt_logprobs(prompt, gen.prompt_logprobs[i])
                        tail, _ = self._completion_logprobs(st.logprobs, start)
                        for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                            getattr(logprobs, f).extend(getattr(tail, f))
                    else:
                        logprobs, _ = self._completion_logprobs(st.logprobs, len(prompt.text))
                choices.append(P.CompletionChoice(text=text, index=i * gen.params.n + j, logprobs=logprobs,
                                                  finish_reason=_finish(st.finish_reason) or "length",
                                                  stop_reason=st.stop_reason))
        return P.CompletionResponse(id=gen.response_id, model=self.ctx.model_name, choices=choices, usage=usage)

    async def _completion_stream(self, req: P.CompletionRequest, gen: Generation) -> AsyncIterator[str]:
        n = gen.params.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        created = int(time.time())
        echoed: set[int] = set()

        def chunk(index: int, text: str, logprobs=None, finish=None, stop_reason=None) -> str:
            c = P.CompletionStreamResponse(
                id=gen.response_id, created=created, model=self.ctx.model_name,
                choices=[P.CompletionStreamChoice(text=text, index=index, logprobs=logprobs, finish_reason=finish,
                                                  stop_reason=stop_reason)])
            return sse(c.model_dump_json(exclude=exclude))

        async for kind, i, out in gen.events(self.ctx.settings.keepalive_seconds):
            if kind == "keepalive":
                yield KEEPALIVE
                continue
            prompt = gen.prompts[i]
            if req.echo and i not in echoed:
                echoed.add(i)
                lp = None
                if req.logprobs is not None and out.prompt_logprobs is not None:
                    lp, _ = self._prompt_logprobs(prompt, out.prompt_logprobs)
                for j in range(n):
                    gen.seqs[(i, j)].offset = len(prompt.text)
                    yield chunk(i * n + j, prompt.text, lp)
            for so in out.outputs:
                st = gen.seqs[(i, so.index)]
                if not st.started:
                    st.started = True
                    st.offset = len(prompt.text)
                finish = _finish(so.finish_reason)
                lp = None
                if req.logprobs is not None and so.logprobs:
                    lp, st.offset = self._completion_logprobs(so.logprobs, st.offset)
                if so.text or lp is not None or finish:
                    yield chunk(i * n + so.index, so.text, lp, finish, so.stop_reason if finish else None)
        if include_usage:
            yield self._usage_chunk(gen, P.CompletionStreamResponse, created)
        yield DONE

    def _usage_chunk(self, gen: Generation, cls, created: int) -> "_UsageChunk":
        """The last chunk of include_usage (no choices); rendered once billing has settled."""
        return _UsageChunk(self, gen, cls, created)

    # -- /v1/chat/completions ------------------------------------------------------------------

    async def create_chat_completion(self, req: P.ChatCompletionRequest, raw: Request, key) -> Response:
        self.ready()
        self.check_model(req.model)
        text = P.render_chat(req.messages)
        prompts = [Prompt(text, self.tokenizer.encode(text))]
        room = self.context_length - len(prompts[0].ids)
        explicit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if room <= 0 and explicit is None:
            raise context_error(len(prompts[0].ids), 1, self.context_length, "messages")
        params = self.validate(req.to_sampling_params(default_max_tokens=max(room, 0)), P.MAX_CHAT_TOP_LOGPROBS)
        self.check_context(prompts, params.max_tokens, "messages")
        gen = Generation(self, P.random_id("chatcmpl"), prompts, params)
        return await self._run(raw, key, gen, stream=bool(req.stream), endpoint="chat",
                               render_full=lambda g, u: self._chat_response(req, g, u),
                               render_stream=lambda g: self._chat_stream(req, g))

    def _chat_logprobs(self, tls: list[TokenLogprob]) -> P.ChatChoiceLogprobs:
        tt = self.tt
        content = []
        for t in tls:
            top = [P.TopLogprob(token=tt.str(tid), logprob=_lp(lp), bytes=list(tt.bytes(tid))) for tid, lp in t.top]
            content.append(P.ChatLogprob(token=tt.str(t.token_id), logprob=_lp(t.logprob),
                                         bytes=list(tt.bytes(t.token_id)), top_logprobs=top))
        return P.ChatChoiceLogprobs(content=content)

    @staticmethod
    def _strip_lead(st: SeqState, text: str) -> str:
        """The template ends with "Assistant:"; the model's reply starts with a space: drop it."""
        if not st.started and text:
            text = text.lstrip(" ")
            st.started = bool(text)
        return text

    def _chat_response(self, req: P.ChatCompletionRequest, gen: Generation, usage: P.UsageInfo) -> P.ChatCompletionResponse:
        choices = []
        for j, st in enumerate(self._ranked(gen, 0)):
            text = "".join(st.text).lstrip(" ")
            choices.append(P.ChatCompletionChoice(
                index=j, message=P.ChatResponseMessage(content=text),
                logprobs=self._chat_logprobs(st.logprobs) if req.logprobs else None,
                finish_reason=_finish(st.finish_reason) or "length", stop_reason=st.stop_reason))
        return P.ChatCompletionResponse(id=gen.response_id, model=self.ctx.model_name, choices=choices, usage=usage)

    async def _chat_stream(self, req: P.ChatCompletionRequest, gen: Generation) -> AsyncIterator[str]:
        n = gen.params.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        created = int(time.time())

        def chunk(index: int, delta: P.DeltaMessage, logprobs=None, finish=None, stop_reason=None) -> str:
            c = P.ChatCompletionStreamResponse(
                id=gen.response_id, created=created, model=self.ctx.model_name,
                choices=[P.ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                                      finish_reason=finish, stop_reason=stop_reason)])
            return sse(c.model_dump_json(exclude=exclude))

        for j in range(n):  # OpenAI opens every choice with the role
            yield chunk(j, P.DeltaMessage(role="assistant", content=""))
        async for kind, _, out in gen.events(self.ctx.settings.keepalive_seconds):
            if kind == "keepalive":
                yield KEEPALIVE
                continue
            for so in out.outputs:
                st = gen.seqs[(0, so.index)]
                text = self._strip_lead(st, so.text)
                lp = self._chat_logprobs(so.logprobs) if req.logprobs and so.logprobs else None
                if text or lp is not None:
                    yield chunk(so.index, P.DeltaMessage(content=text), lp)
                finish = _finish(so.finish_reason)
                if finish:
                    yield chunk(so.index, P.DeltaMessage(), None, finish, so.stop_reason)
        if include_usage:
            yield self._usage_chunk(gen, P.ChatCompletionStreamResponse, created)
        yield DONE


class _UsageChunk:
    """Placeholder a stream renderer yields for its usage chunk; `_stream_body` settles billing
    first (usage.cost is what was charged), then renders it."""

    def __init__(self, serving: OpenAIServing, gen: Generation, cls, created: int):
        self.serving, self.gen, self.cls, self.created = serving, gen, cls, created

    def render(self, cost: float) -> str:
        c = self.cls(id=self.gen.response_id, created=self.created, model=self.serving.ctx.model_name, choices=[],
                     usage=self.serving.usage(self.gen, cost))
        return sse(c.model_dump_json())


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_exit`: if the client disconnects before the body
    generator starts, Starlette cancels it unstarted and the generator's own cleanup never runs."""

    media_type = "text/event-stream"

    def __init__(self, body, on_exit, headers: dict[str, str]):
        super().__init__(body, headers=headers | {"Cache-Control": "no-cache"})
        self.on_exit = on_exit

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_exit()


def context_error(prompt_tokens: int, max_tokens: int, limit: int, param: str) -> APIError:
    return invalid(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
        "Please reduce the length of the prompt or of the completion (max_tokens).",
        param, "context_length_exceeded")


def map_engine_error(e: BaseException, endpoint: str = "completions") -> APIError:
    """Engine exceptions -> OpenAI errors; anything unknown is a 500 (a bug, logged by the caller)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineOverloaded):
        retry = float(getattr(e, "retry_after", 1.0) or 1.0)
        return rate_limited("The server is overloaded (its request queue is full); retry shortly.", retry, type="overloaded")
    if isinstance(e, ContextLengthExceeded):
        return context_error(e.prompt_tokens, e.max_tokens, e.limit, "messages" if endpoint == "chat" else "max_tokens")
    if isinstance(e, ParamError):
        return invalid(e.message, e.param)
    log.error("engine error", exc_info=e)
    return APIError(500, "The server had an error while processing your request.", "server_error", None, "internal_error")
