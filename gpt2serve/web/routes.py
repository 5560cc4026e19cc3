"""The model page: `/` (HTML), `/static/...` (its assets, shipped in the package), `/v1/page-info` (its data).

The page is static; everything that depends on this deployment (model shape, prices, sign-up, eval
numbers, live status) comes from `/v1/page-info`, read from `app.state.ctx` (see api/app.py):
`ctx.settings` (api/settings.py), `ctx.loaded` (model/loader.LoadedModel), `ctx.engine`.
No auth on these routes: the page must load before a visitor has a key.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from gpt2serve.web import facts

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter()
# StaticFiles does the path safety (no ../), content types, ETag and 304s; it is called from a
# route rather than mounted because include_router() does not carry a router's mounts.
_static = StaticFiles(directory=STATIC_DIR)
# Revalidate on each load (ETag makes that a 304), so a redeploy never serves a stale page.
_NO_CACHE = {"Cache-Control": "no-cache"}


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_NO_CACHE)


@router.api_route("/static/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
async def static(path: str, request: Request) -> Response:
    response = await _static.get_response(path, request.scope)
    response.headers.update(_NO_CACHE)
    return response


@router.get("/v1/page-info", tags=["web"])
async def page_info(request: Request) -> dict[str, Any]:
    """Everything the model page shows that depends on this deployment."""
    ctx = getattr(request.app.state, "ctx", None)
    settings = getattr(ctx, "settings", None)
    loaded = getattr(ctx, "loaded", None)
    engine = getattr(ctx, "engine", None)
    model = _model_facts(settings, loaded)
    try:  # api/serving.ServerContext.model_name: the id /v1/models shows (served_model_name or the model's)
        model["id"] = ctx.model_name or model["id"]
    except AttributeError:
        pass

    measured, report = facts.load_eval_report(getattr(settings, "eval_report", None))
    rows = facts.published_table(model["size"])
    for row in rows:
        row["measured"] = measured.get(row["task"])

    auth = bool(getattr(settings, "auth", True))
    starter = int(getattr(settings, "starter_credit_micros", 0) or 0)
    return {
        "model": model,
        "pricing": _pricing(settings, getattr(ctx, "billing", None), auth),
        "zero_shot": {
            "source": "Radford et al. 2019, Language Models are Unsupervised Multitask Learners, Table 3",
            "size": model["size"],
            "sizes": list(facts.PUBLISHED),
            "rows": rows,
            "report": report,
            "measured_random_weights": bool(report.get("random_weights")) if report else None,
        },
        "status": _status(loaded, engine),
        "auth": auth,
        "signup": {
            "enabled": auth and bool(getattr(settings, "signup_enabled", False)),
            "starter_credit_micros": starter,
            "starter_credit_usd": _usd(starter),
        },
    }


def _model_facts(settings: Any, loaded: Any) -> dict[str, Any]:
    config = getattr(loaded, "config", None)

    def cfg(*names: str) -> int | None:
        for name in names:
            v = getattr(config, name, None)
            if isinstance(v, int):
                return v
        return None

    n_layer, n_head, n_embd = cfg("n_layer", "num_hidden_layers"), cfg("n_head"), cfg("n_embd", "hidden_size")
    name = getattr(loaded, "name", None) or getattr(settings, "model", "gpt2")
    served = getattr(settings, "served_model_name", None) or name
    num_parameters = int(getattr(loaded, "num_parameters", 0) or 0)
    size = facts.size_of(n_layer, n_embd) if n_layer and n_embd else None
    # A released shape names its Hub repo; otherwise use the name's own mapping (distilgpt2) or itself.
    hub_id = size[1] if size else facts.HUB_IDS.get(name.split(":")[-1], name)
    return {
        "id": served,  # what API calls pass as "model"
        "name": name,
        "hub_id": hub_id,
        "task": "text-generation",
        "architecture": "decoder-only transformer",
        "num_parameters": num_parameters,
        "parameters": facts.format_parameters(num_parameters) if num_parameters else None,
        "size": size[0] if size else None,
        "context_length": cfg("n_positions", "n_ctx", "max_position_embeddings"),
        "vocab_size": cfg("vocab_size"),
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "dtype": str(getattr(loaded, "dtype", "")).removeprefix("torch.") or None,
        "device": str(getattr(loaded, "device", "")) or None,
        "random_weights": getattr(loaded, "random_weights", None),
        "licence": facts.LICENCE,
        "description": facts.DESCRIPTION,
        "limits": facts.LIMITS,
    }


def _usd(micros: int) -> str:
    """Integer micro-USD -> a plain decimal string, never in exponent form: 1 -> "0.000001"."""
    return f"{Decimal(micros).scaleb(-6).normalize():f}"


def _pricing(settings: Any, billing: Any, auth: bool) -> dict[str, Any]:
    # The billing object's prices are the ones charged (accounts/pricing.Pricing); settings only
    # seed them, so they are the fallback.
    pricing = getattr(billing, "pricing", None)
    prompt = getattr(pricing, "prompt_micros_per_token", None)
    completion = getattr(pricing, "completion_micros_per_token", None)
    if prompt is None or completion is None:
        prompt = int(getattr(settings, "price_prompt_micros", 0) or 0)
        completion = int(getattr(settings, "price_completion_micros", 0) or 0)
    return {
        "billed": auth,  # without auth nothing is charged
        "prompt": _usd(prompt),  # USD per token (OpenRouter's shape, as in /v1/models)
        "completion": _usd(completion),
        "prompt_per_million_usd": _usd(prompt * 1_000_000),
        "completion_per_million_usd": _usd(completion * 1_000_000),
    }


def _status(loaded: Any, engine: Any) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    if engine is not None and hasattr(engine, "stats"):
        try:
            stats = dict(engine.stats())
        except Exception:  # a status line must never take the page down
            stats = {}
    return {
        "status": "ok" if loaded is not None else "loading",
        "random_weights": getattr(loaded, "random_weights", None),
        "running": stats.get("running"),
        "waiting": stats.get("waiting"),
    }
