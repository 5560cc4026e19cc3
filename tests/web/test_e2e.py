"""The model page in headless Chromium against a live `gpt2serve serve` on loopback: a subprocess
with a tiny random model (random:gpt2-tiny), auth on, SQLite in a temp dir and a small starter credit.

Sign up, see the credit, generate in the playground and get exactly the text of a direct API call
with the same seed, spend the credit until the page shows the 402, and write screenshots at desktop
and phone widths (their folder is printed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import DESKTOP, PHONE, free_port, generate, open_page

pytestmark = pytest.mark.browser

MODEL = "random:gpt2-tiny"
STARTER_CREDIT_MICROS = 300  # $0.0003: a few playground runs at $1/$2 per million tokens


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web-e2e")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, GPT2SERVE_STARTER_CREDIT_MICROS=str(STARTER_CREDIT_MICROS), GPT2SERVE_SIGNUP_RATE_PER_HOUR="100")
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2serve.cli", "serve", "--model", MODEL, "--host", "127.0.0.1", "--port", str(port),
         "--database-url", f"sqlite:///{tmp / 'accounts.db'}", "--threads", "1", "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180  # importing torch and building the model on a busy 2-core box
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gpt2serve serve exited with {proc.returncode}:\n{(tmp / 'serve.log').read_text()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gpt2serve serve not healthy in time:\n{(tmp / 'serve.log').read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def remaining_micros(url: str, key: str) -> int:
    d = httpx.get(url + "/v1/credits", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    return d["total_credits_micros"] - d["total_usage_micros"]


def test_signup_generate_match_the_api_then_run_out_of_credit(page_factory, live, screenshot_dir):
    page = open_page(page_factory, live)
    assert page.inner_text("#f-id") == "gpt2-tiny"
    page.wait_for_function("document.getElementById('status-text').textContent.includes('loaded')")
    assert "random weights" in page.inner_text("#status-text")

    # Sign up: the key is shown once, the starter credit appears.
    page.click("#signup-btn")
    page.wait_for_selector("#new-key:not([hidden])")
    key = page.inner_text("#new-key-value")
    assert key.startswith("sk-")
    page.wait_for_function("document.getElementById('credit-text').textContent.startsWith('Remaining')")
    assert page.inner_text("#credit-text").startswith("Remaining credit: $0.0003 of $0.0003")

    # Generate in the playground; the streamed text equals a direct (non-streamed) API call, same seed.
    params = {"max_tokens": 8, "temperature": 1, "top_p": 0.95, "top_k": 50, "seed": 1234}
    shown = generate(page, "The capital of France is", probs=True, **params)
    assert page.is_hidden("#pg-error"), page.inner_text("#pg-error")
    assert shown, "the playground showed no text"
    # The credit shown follows the ledger, and the run is listed with its tokens.
    left = remaining_micros(live, key)
    assert left < STARTER_CREDIT_MICROS
    page.wait_for_function(f"document.getElementById('credit-text').dataset.remainingMicros === '{left}'")
    page.wait_for_selector("#usage-table tbody tr")
    assert "cmpl-" in page.inner_text("#usage-table")
    direct = httpx.post(live + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                        json={"model": "gpt2-tiny", "prompt": "The capital of France is", **params}).json()
    assert shown == direct["choices"][0]["text"]
    # One chip per generated token, each with its top alternatives.
    assert page.locator("#tokens .tok").count() == direct["usage"]["completion_tokens"]
    page.locator("#tokens .tok").first.focus()
    assert "Top alternatives" in page.inner_text("#token-detail")


    page.screenshot(path=str(screenshot_dir / "model-page-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    page.screenshot(path=str(screenshot_dir / "model-page-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP)

    # Spend the credit: each run holds prompt + 2 x 60 micro-USD, so a few runs exhaust $0.0003.
    for _ in range(20):
        generate(page, "Once upon a time", max_tokens=60, seed="")
        if page.is_visible("#pg-error"):
            break
    message = page.inner_text("#pg-error")
    assert "Out of credit (402)" in message
    assert remaining_micros(live, key) < 6 + 2 * 60  # what the refused run would have held
    page.locator("#pg-error").scroll_into_view_if_needed()
    page.screenshot(path=str(screenshot_dir / "model-page-402.png"), full_page=False)


def test_bad_key_and_context_too_long_are_readable(page_factory, live):
    page = open_page(page_factory, live)
    page.fill("#key-input", "sk-not-a-real-key")
    page.press("#key-input", "Enter")
    generate(page, "Hello", max_tokens=4)
    assert "Your API key was not accepted (401)" in page.inner_text("#pg-error")

    page.click("#signup-btn")
    page.wait_for_selector("#new-key:not([hidden])")
    # 1024 new tokens after a prompt do not fit GPT-2's 1,024-token window.
    generate(page, "Hello " * 20, max_tokens=1024)
    assert "Too long for the model's context window" in page.inner_text("#pg-error")


def test_chat_mode_streams_like_the_api(page_factory, live):
    page = open_page(page_factory, live)
    page.click("#signup-btn")
    page.wait_for_selector("#new-key:not([hidden])")
    key = page.inner_text("#new-key-value")
    params = {"max_tokens": 6, "temperature": 0.7, "seed": 7}
    shown = generate(page, "Tell me a story.", mode="chat", probs=True, **params)
    assert page.is_hidden("#pg-error"), page.inner_text("#pg-error")
    direct = httpx.post(live + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                        json={"model": "gpt2-tiny", "messages": [{"role": "user", "content": "Tell me a story."}], **params}).json()
    assert shown == direct["choices"][0]["message"]["content"]
