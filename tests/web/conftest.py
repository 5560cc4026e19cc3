"""Headless Chromium (Debian's /usr/bin/chromium driven by Playwright's Python package) and a
loopback uvicorn server in a thread, shared by the browser tests.

Playwright's own browser download is never used: `executable_path` points at the system chromium
(`apt-get install chromium`), so the tests run offline.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("GPT2SERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}  # an iPhone 12-14 sized viewport

_SHOTS: list[Path] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="gpt2serve-web-screenshots-"))
    _SHOTS.append(d)
    print(f"\nscreenshots: {d}")
    return d


def pytest_terminal_summary(terminalreporter):
    for d in _SHOTS:
        files = sorted(p.name for p in d.glob("*.png"))
        if files:
            terminalreporter.write_line(f"web screenshots in {d}: {', '.join(files)}")


class ThreadServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def page_factory(browser) -> Iterator:
    """new_page(viewport) -> a page in a fresh context (own sessionStorage); all closed at the end."""
    contexts = []

    def new_page(viewport=DESKTOP):
        ctx = browser.new_context(viewport=viewport)
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        return page

    yield new_page
    for ctx in contexts:
        ctx.close()


def open_page(page_factory, url: str, viewport=DESKTOP):
    """The model page at `url`, once /v1/page-info has rendered."""
    page = page_factory(viewport)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    return page


def generate(page, prompt: str, probs: bool = False, mode: str = "completion", **fields) -> str:
    """Fill the playground (fields: max_tokens, temperature, top_p, top_k, seed, stop), press
    Generate, wait for the stream to end; returns the output text exactly as shown."""
    page.check(f"input[name=mode][value={mode}]")
    page.fill("#prompt", prompt)
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))
    page.set_checked("#show-probs", probs)
    page.click("#generate")
    page.wait_for_selector("#output[data-done=true]")
    return page.eval_on_selector("#output", "e => e.textContent")
