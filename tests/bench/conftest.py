"""Fixtures for the bench tests: a tiny random GPT-2 checkpoint and a live server serving it."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from gpt2serve.bench.peers import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"), seed=0, **TINY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tiny_model_dir, tmp_path_factory):
    """`gpt2serve serve --no-auth` in-process: create_app under uvicorn in a daemon thread on a free port."""
    import httpx
    import uvicorn

    from gpt2serve.api.app import create_app
    from gpt2serve.api.settings import Settings

    settings = Settings(model=str(tiny_model_dir), auth=False, dtype="float32", device="cpu",
                        database_url=f"sqlite:///{tmp_path_factory.mktemp('db') / 'bench.db'}",
                        max_num_seqs=8, max_num_batched_tokens=256)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        if server.started:
            r = httpx.get(url + "/health")
            if r.status_code == 200:
                break
            assert r.json().get("status") != "failed", r.text
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=30)
