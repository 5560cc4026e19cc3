"""The page's own behaviour in Chromium against a scripted API (no model): rendering, SSE parsing,
the token-probability view, readable errors for 401/402/429/context-too-long, chat mode, keyboard.

The scripted endpoints return what OpenAI's API returns (and what gpt2serve's account routes
return), so these pin the page's parsing; tests/web/test_e2e.py runs the same page against the real
`gpt2serve serve`.
"""

from __future__ import annotations

import json
import math
import threading
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gpt2serve.api.settings import Settings
from gpt2serve.web.routes import router

from .conftest import PHONE, ThreadServer, generate, open_page

pytestmark = pytest.mark.browser

KEY = "sk-test-0123456789"
PIECES = ["Hello", ",", " world", "\n"]
release = threading.Event()  # the "slow" prompt's stream waits on this after its first token


def err(status, message, type_, code=None, param=None, headers=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def make_app() -> FastAPI:
    app = FastAPI()
    app.include_router(router)
    config = SimpleNamespace(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    loaded = SimpleNamespace(name="gpt2", config=config, num_parameters=124_439_808, random_weights=True,
                             dtype="float32", device="cpu")
    app.state.ctx = SimpleNamespace(settings=Settings(), loaded=loaded, engine=None, billing=None)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": "gpt2", "random_weights": True, "running": 1, "waiting": 3}

    @app.post("/v1/signup")
    async def signup():
        return {"key": KEY, "data": {"credit": 1.0, "credit_micros": 1_000_000}, "message": "shown once"}

    @app.get("/v1/credits")
    async def credits(request: Request):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return err(401, "Incorrect API key provided.", "authentication_error", "invalid_api_key")
        return {"data": {"total_credits": 1.0, "total_usage": 0.25}}

    @app.get("/v1/generation")
    async def generation(id: str):
        return {"data": {"id": id, "tokens_prompt": 3, "tokens_completion": 4, "total_cost": 0.000011}}

    def chunk(i, piece, chat, logprobs):
        choice = {"index": 0, "finish_reason": "length" if i == len(PIECES) - 1 else None}
        alts = [(piece, math.log(0.5)), ("X", math.log(0.25)), ("Y", math.log(0.125))]
        if chat:
            choice["delta"] = {"content": piece}
            if logprobs:
                choice["logprobs"] = {"content": [{"token": piece, "logprob": alts[0][1], "bytes": list(piece.encode()),
                                                   "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alts]}]}
        else:
            choice["text"] = piece
            if logprobs:
                choice["logprobs"] = {"tokens": [piece], "token_logprobs": [alts[0][1]],
                                      "top_logprobs": [dict(alts)], "text_offset": [0]}
        return {"id": "cmpl-fake1", "object": "chat.completion.chunk" if chat else "text_completion",
                "model": "gpt2", "choices": [choice]}

    async def complete(request: Request, chat: bool):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return err(401, "Incorrect API key provided.", "authentication_error", "invalid_api_key")
        body = await request.json()
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if prompt == "spend":
            return err(402, "Insufficient credit: this request needs $0.000066, $0.000010 left.", "insufficient_quota", "insufficient_quota")
        if prompt == "busy":
            return err(429, "Rate limit reached for requests per minute.", "rate_limit_exceeded", "rate_limit_exceeded",
                       headers={"Retry-After": "7"})
        if prompt == "long":
            return err(400, "This model's maximum context length is 1024 tokens; you asked for 1100.",
                       "invalid_request_error", "context_length_exceeded", "max_tokens")
        assert body["stream"] is True
        logprobs = bool(body.get("logprobs"))

        async def events():
            # Keep-alive comments and CRLF line ends are legal SSE: the parser must cope.
            yield ": keep-alive\r\n\r\n"
            for i, piece in enumerate(PIECES):
                yield f"data: {json.dumps(chunk(i, piece, chat, logprobs))}\n\n"
                if i == 0 and prompt == "slow":
                    import anyio.to_thread
                    await anyio.to_thread.run_sync(release.wait, 20)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server():
    with ThreadServer(make_app()) as s:
        yield s


def test_page_shows_the_model_facts(page_factory, server):
    page = open_page(page_factory, server.url)
    assert page.inner_text("h1 code") == "openai-community/gpt2"
    assert page.inner_text("#f-params").startswith("124M")
    assert page.inner_text("#f-ctx") == "1,024 tokens"
    assert page.inner_text("#f-vocab").startswith("50,257")
    assert page.inner_text("#f-licence") == "MIT"
    assert "decoder-only" in page.inner_text("#f-arch").lower()
    assert page.locator("#zs-table tbody tr").count() == 10
    assert "45.99" in page.inner_text("#zs-table")
    assert "$1.00 per million prompt tokens" in page.inner_text("#pricing-text")
    page.wait_for_function("document.getElementById('status-text').textContent.includes('loaded')")
    status = page.inner_text("#status-text")
    assert "random weights" in status and "1 running, 3 waiting" in status
    # Snippets name this server and model.
    curl = page.inner_text("#code-curl")
    assert f"{server.url}/v1/completions" in curl and '"model":"gpt2"' in curl


def test_signup_shows_the_key_once_and_the_credit(page_factory, server):
    page = open_page(page_factory, server.url)
    page.click("#signup-btn")
    page.wait_for_selector("#new-key:not([hidden])")
    assert page.inner_text("#new-key-value") == KEY
    page.wait_for_function("document.getElementById('credit-text').textContent.startsWith('Remaining')")
    assert page.inner_text("#credit-text") == "Remaining credit: $0.75 of $1.00 · used $0.25"
    assert page.evaluate("sessionStorage.getItem('gpt2serve.key')") == KEY
    # A reload keeps the key in this tab but never shows it again.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.is_hidden("#new-key")
    page.wait_for_function("document.getElementById('credit-text').textContent.startsWith('Remaining')")


def use_key(page):
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_function("document.getElementById('credit-text').textContent.startsWith('Remaining')")


def test_streamed_completion_with_token_probabilities(page_factory, server):
    page = open_page(page_factory, server.url)
    use_key(page)
    generate(page, "Say hello", probs=True)
    assert page.eval_on_selector("#output", "e => e.textContent") == "".join(PIECES)
    assert page.is_hidden("#pg-error")
    assert "finish: length" in page.inner_text("#pg-meta")
    tokens = page.locator("#tokens .tok")
    assert tokens.count() == len(PIECES)
    assert tokens.nth(3).inner_text() == "↵"  # a newline token is made visible
    # Keyboard: tabbing onto a token shows its alternatives.
    tokens.nth(2).focus()
    detail = page.inner_text("#token-detail")
    assert "50.0%" in detail and "25.0%" in detail and "12.5%" in detail
    # The generation joins this tab's recent usage.
    page.wait_for_selector("#usage-table tbody tr")
    assert "cmpl-fake1" in page.inner_text("#usage-table")


def test_output_streams_token_by_token(page_factory, server):
    page = open_page(page_factory, server.url)
    use_key(page)
    release.clear()
    page.fill("#prompt", "slow")
    page.click("#generate")
    # The first token is on screen while the server still holds the rest of the stream.
    page.wait_for_function("document.getElementById('output').textContent === 'Hello'")
    assert page.get_attribute("#output", "aria-busy") == "true"
    release.set()
    page.wait_for_selector("#output[data-done=true]")
    assert page.eval_on_selector("#output", "e => e.textContent") == "".join(PIECES)


def test_chat_mode(page_factory, server):
    page = open_page(page_factory, server.url)
    use_key(page)
    generate(page, "Hi there", probs=True, mode="chat")
    assert page.eval_on_selector("#output", "e => e.textContent") == "".join(PIECES)
    assert page.locator("#tokens .tok").count() == len(PIECES)
    assert page.inner_text("#prompt-label") == "Message"
    assert "chat.completions.create" in page.inner_text("#code-python")


@pytest.mark.parametrize(
    "prompt,with_key,expected",
    [
        ("anything", False, "Your API key was not accepted (401)"),
        ("spend", True, "Out of credit (402)"),
        ("busy", True, "Rate limit reached (429): try again in 7 s."),
        ("long", True, "Too long for the model's context window"),
    ],
)
def test_errors_are_readable(page_factory, server, prompt, with_key, expected):
    page = open_page(page_factory, server.url)
    if with_key:
        use_key(page)
    generate(page, prompt)
    page.wait_for_selector("#pg-error:not([hidden])")
    assert expected in page.inner_text("#pg-error")
    assert page.get_attribute("#pg-error", "role") == "alert"
    assert page.eval_on_selector("#output", "e => e.textContent") == ""


def test_keyboard_only_generation_and_tabs(page_factory, server):
    page = open_page(page_factory, server.url)
    use_key(page)
    page.fill("#prompt", "keyboard")
    page.focus("#seed")
    page.keyboard.press("Enter")  # Enter in a form field submits the playground form
    page.wait_for_selector("#output[data-done=true]")
    assert page.eval_on_selector("#output", "e => e.textContent") == "".join(PIECES)
    page.focus("#tab-curl")
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#tab-python", "aria-selected") == "true"
    assert page.is_visible("#panel-python") and page.is_hidden("#panel-curl")
    assert page.evaluate("document.activeElement.id") == "tab-python"


def test_phone_width_has_no_horizontal_scroll(page_factory, server):
    page = open_page(page_factory, server.url, PHONE)
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a phone screen"
