"""The FastAPI app: `create_app(settings)`. Its lifespan owns the account store, the model and the
engine; routes are thin (parse -> `OpenAIServing` -> response); every error leaves in OpenAI's shape.

The model loads in a worker thread after startup, so the server answers at once: /health says 503
"loading" until the engine runs, and generation routes answer 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
from contextlib import asynccontextmanager
from typing import Any, Callable

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2serve.api import protocol as P
from gpt2serve.api.errors import APIError, invalid, not_found
from gpt2serve.api.metrics import Metrics
from gpt2serve.api.serving import OpenAIServing, ServerContext
from gpt2serve.api.settings import Settings
from gpt2serve.engine.sampling import ParamError

log = logging.getLogger(__name__)

ERRORS = {s: {"model": P.ErrorResponse} for s in (400, 401, 402, 404, 413, 429, 503)}


# ------------------------------------------------------------------------------------- lifespan


def default_load(settings: Settings):
    from gpt2serve.model.loader import load_model

    return load_model(settings.model, dtype=settings.dtype, device=settings.device)  # both may be "auto"


def default_engine(loaded, settings: Settings):
    """`loaded`: a LoadedModel or a function that loads one, in the engine's thread."""
    from gpt2serve.engine import AsyncEngine, EngineConfig

    config = EngineConfig(max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
                          prefill_first_tokens=settings.prefill_first_tokens,
                          max_queue=settings.max_queue, kv_cache_memory=settings.kv_cache_memory,
                          threads=settings.threads, kernels=settings.kernels, kv_cache_dtype=settings.kv_cache_dtype)
    return AsyncEngine(loaded, config).start()


def default_accounts(settings: Settings):
    from gpt2serve.accounts import AccountStore, Billing, Pricing

    store = AccountStore(settings.database_url, instance=settings.instance_name)
    store.migrate()
    store.release_open_reservations()  # holds left by a crash of this instance
    billing = Billing(store, Pricing(settings.price_prompt_micros, settings.price_completion_micros),
                      settings.rate_limit_rpm, settings.rate_limit_tpm)
    return store, billing


async def _load(ctx: ServerContext, load: Callable, make_engine: Callable, on_failure: Callable | None) -> None:
    ctx.metrics.loading.set(1)
    try:
        # The engine's own thread runs the loader (see AsyncEngine: one thread for all torch work).
        engine = await anyio.to_thread.run_sync(make_engine, functools.partial(load, ctx.settings), ctx.settings)
        loaded = engine.loaded
        ctx.loaded, ctx.engine = loaded, engine
        log.info("serving %s (%s parameters%s) on %s", ctx.model_name, f"{loaded.num_parameters:,}",
                 ", random weights" if loaded.random_weights else "", loaded.device)
    except Exception as e:
        log.exception("loading %s failed", ctx.settings.model)
        ctx.load_error = f"{type(e).__name__}: {e}"
        if on_failure is not None:
            on_failure(e)
    finally:
        ctx.metrics.loading.set(0)


# ------------------------------------------------------------------------------- errors, limits


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status_code, headers=e.headers)


def _loc(loc: tuple) -> str | None:
    """pydantic's error location -> OpenAI's param: ("body", "messages", 0, "role") -> messages[0].role"""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return invalid("Invalid request body.")
    err = errors[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):  # raised by a model_validator: it knows the param
        return invalid(cause.message, cause.param)
    if err.get("type") == "json_invalid":
        return invalid("We could not parse the JSON body of your request. The body must be valid JSON "
                       f"({err.get('msg')}).")
    param = _loc(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:
        return invalid(f"Invalid request body: {msg}. Send a JSON object.")
    if err.get("type") == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param)
    return invalid(f"Invalid value for '{param}': {msg}.", param)


class BodyLimit:
    """413 for a body over `limit` bytes: by Content-Length up front, else while it streams in (the
    body is buffered, at most `limit` bytes, then replayed to the app)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                return await self._reject(scope, receive, send)
        if length is None and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                chunks.append(msg)  # a disconnect: replay it
                break
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await self._reject(scope, receive, send)
            chunks.append(msg)
            if not msg.get("more_body"):
                break

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        err = APIError(413, f"Request body too large: the limit is {self.limit} bytes.", "invalid_request_error",
                       None, "request_too_large")
        await _error(err)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _error(validation_error(exc))

    @app.exception_handler(ParamError)
    async def _param(request: Request, exc: ParamError):
        return _error(invalid(exc.message, exc.param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = not_found(f"Unknown route: {request.method} {request.url.path}", code="unknown_url")
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                           "invalid_request_error", None, "method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")
        err.headers.update(getattr(exc, "headers", None) or {})
        return _error(err)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(APIError(500, "The server had an error while processing your request.", "server_error", None,
                               "internal_error"))


# ------------------------------------------------------------------------------------------ routes


def _require_key():
    from gpt2serve.api.auth import require_key

    return require_key


def build_router() -> APIRouter:
    router = APIRouter()
    require_key = _require_key()

    def serving(request: Request) -> OpenAIServing:
        return request.app.state.serving

    @router.post("/v1/completions", responses=ERRORS, tags=["openai"],
                 response_model=P.CompletionResponse)
    async def completions(body: P.CompletionRequest, request: Request, key: Any = Depends(require_key)):
        return await serving(request).create_completion(body, request, key)

    @router.post("/v1/chat/completions", responses=ERRORS, tags=["openai"],
                 response_model=P.ChatCompletionResponse)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request, key: Any = Depends(require_key)):
        return await serving(request).create_chat_completion(body, request, key)

    @router.get("/v1/models", response_model=P.ModelList, tags=["openai"])
    async def models(request: Request):
        return P.ModelList(data=[model_card(request.app.state.ctx)])

    @router.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses=ERRORS, tags=["openai"])
    async def model(model_id: str, request: Request):
        s = serving(request)
        s.check_model(model_id)
        return model_card(request.app.state.ctx)

    @router.post("/tokenize", response_model=P.TokenizeResponse, responses=ERRORS, tags=["tokenizer"])
    async def tokenize(body: P.TokenizeRequest, request: Request):
        s = serving(request)
        s.ready()
        s.check_model(body.model)
        if body.prompt is not None:
            ids = encode_with_specials(s.tokenizer, body.prompt)
        else:  # exactly the prompt /v1/chat/completions builds
            ids = s.tokenizer.encode(P.render_chat(body.messages or []))
        return P.TokenizeResponse(count=len(ids), max_model_len=s.context_length, tokens=ids)

    @router.post("/detokenize", response_model=P.DetokenizeResponse, responses=ERRORS, tags=["tokenizer"])
    async def detokenize(body: P.DetokenizeRequest, request: Request):
        s = serving(request)
        s.ready()
        s.check_model(body.model)
        return P.DetokenizeResponse(prompt=s.tokenizer.decode(s._ids(body.tokens, "tokens")))

    @router.get("/tokenizer_info", tags=["tokenizer"], responses=ERRORS)
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        s = serving(request)
        s.ready()
        tok = s.tokenizer
        # vLLM's fields first (lm-eval's remote tokenizer reads eos_token, bos_token, chat_template)
        return {
            "tokenizer_class": "GPT2TokenizerFast",
            "eos_token": ENDOFTEXT,
            "bos_token": ENDOFTEXT,  # GPT-2 uses <|endoftext|> for both
            "pad_token": None,
            "model_max_length": s.context_length,
            "chat_template": P.CHAT_TEMPLATE_JINJA,
            "vocab_size": tok.vocab_size,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.eos_token_id,
            "chat_template_doc": P.CHAT_TEMPLATE_DOC,
            "chat_roles": P.CHAT_ROLES,
            "chat_stop": P.CHAT_STOP,
            "notes": {
                "empty_prompt": "an empty prompt string is generated from <|endoftext|>",
                "special_tokens": "/tokenize reads the text <|endoftext|> as token 50256 (as Hugging Face and vLLM "
                                  "do); prompt strings sent to /v1/completions keep it as plain text",
                "logprob_tokens": "a token holding part of a UTF-8 character shows as 'bytes:\\xNN...'",
            },
        }

    @router.get("/health", tags=["server"])
    async def health(request: Request):
        ctx: ServerContext = request.app.state.ctx
        if ctx.engine is None:
            status = "failed" if ctx.load_error else "loading"
            body = {"status": status, "model": ctx.settings.model}
            if ctx.load_error:
                body["error"] = ctx.load_error
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        stats = ctx.engine.stats() or {}
        return {"status": "ok", "model": ctx.model_name, "random_weights": bool(ctx.loaded.random_weights),
                "running": int(stats.get("running", 0)), "waiting": int(stats.get("waiting", 0))}

    @router.get("/metrics", tags=["server"], response_class=Response)
    async def metrics(request: Request):
        ctx: ServerContext = request.app.state.ctx
        if not ctx.settings.public_metrics and ctx.settings.auth:
            from gpt2serve.api.auth import authenticate

            await authenticate(request, check_credit=False)
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


ENDOFTEXT = "<|endoftext|>"


def encode_with_specials(tok, text: str) -> list[int]:
    """Hugging Face semantics for /tokenize: the literal <|endoftext|> is the special token (lm-eval's
    remote tokenizer finds eos_token_id as encode(eos_token)[0])."""
    ids: list[int] = []
    for k, part in enumerate(text.split(ENDOFTEXT)):
        if k:
            ids.append(tok.eos_token_id)
        if part:
            ids += tok.encode(part)
    return ids


def model_card(ctx: ServerContext) -> P.ModelCard:
    if ctx.loaded is None:
        raise APIError(503, "The model is still loading; retry shortly.", "service_unavailable", None, "model_loading",
                       {"Retry-After": "5"})
    from gpt2serve.accounts.pricing import Pricing

    cfg, loaded = ctx.loaded.config, ctx.loaded
    pricing = ctx.billing.pricing if ctx.billing is not None else Pricing(ctx.settings.price_prompt_micros,
                                                                          ctx.settings.price_completion_micros)
    return P.ModelCard(
        id=ctx.model_name, created=ctx.created, context_length=int(cfg.n_positions),
        pricing=P.ModelPricing(**pricing.openrouter()),
        gpt2serve={
            "parameters": int(loaded.num_parameters), "random_weights": bool(loaded.random_weights),
            "dtype": str(loaded.dtype).removeprefix("torch."), "device": str(loaded.device),
            "vocab_size": int(cfg.vocab_size), "n_layer": int(cfg.n_layer), "n_head": int(cfg.n_head),
            "n_embd": int(cfg.n_embd), "source": getattr(loaded, "source", None),
        })


def _optional_router(module: str):
    """Another team's router, when its module exists; an error inside it is not swallowed."""
    try:
        return importlib.import_module(module).router
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            return None
        raise


# ------------------------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None, *, load: Callable | None = None, make_engine: Callable | None = None,
               make_accounts: Callable | None = None, on_load_failure: Callable | None = None) -> FastAPI:
    """`load(settings) -> LoadedModel`, `make_engine(loaded, settings) -> started AsyncEngine` and
    `make_accounts(settings) -> (store, billing)` default to the real ones; tests pass fakes.
    `on_load_failure(exc)` is called when the model can't load (the CLI stops the server)."""
    settings = settings or Settings()
    ctx = ServerContext(settings=settings)
    ctx.metrics = Metrics(lambda: ctx.engine.stats() if ctx.engine is not None else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.store, ctx.billing = await anyio.to_thread.run_sync(make_accounts or default_accounts, settings)
        task = asyncio.create_task(_load(ctx, load or default_load, make_engine or default_engine, on_load_failure))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if ctx.engine is not None:
                await anyio.to_thread.run_sync(ctx.engine.shutdown)
            if ctx.store is not None and hasattr(ctx.store, "dispose"):
                ctx.store.dispose()

    app = FastAPI(
        title="gpt2serve", version=_version(), lifespan=lifespan,
        description="GPT-2 behind OpenAI's API. Chat template: " + P.CHAT_TEMPLATE_DOC,
    )
    app.state.ctx = ctx
    app.state.serving = OpenAIServing(ctx)
    install_error_handlers(app)
    app.include_router(build_router())
    for module in ("gpt2serve.api.account_routes", "gpt2serve.web.routes"):
        router = _optional_router(module)
        if router is not None:
            app.include_router(router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def _version() -> str:
    from gpt2serve import __version__

    return __version__
