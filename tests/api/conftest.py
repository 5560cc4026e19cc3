"""A live server on loopback (uvicorn in a background thread, free port) serving a tiny random
GPT-2 saved with transformers' save_pretrained, so parity checks run against the same weights."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from gpt2serve.api.app import create_app
from gpt2serve.api.settings import Settings

ASSETS = Path(__file__).resolve().parents[2] / "gpt2serve" / "model" / "assets" / "gpt2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` in a daemon thread; `url` is ready once the model has loaded."""

    def __init__(self, app, wait_ready: bool = True):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.wait_ready = wait_ready

    def __enter__(self) -> "LiveServer":
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.server.started:
                if not self.wait_ready:
                    return self
                r = httpx.get(self.url + "/health")
                if r.status_code == 200:
                    return self
                if r.json().get("status") == "failed":
                    raise RuntimeError(r.text)
            time.sleep(0.05)
        raise TimeoutError("server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def ctx(self):
        return self.app.state.ctx


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4))
    model.save_pretrained(d)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(ASSETS / f, d / f)
    return d


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    import torch
    from transformers import GPT2LMHeadModel

    m = GPT2LMHeadModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    return m


def make_settings(tmp_path: Path, model: Path | str, **kw) -> Settings:
    base = dict(model=str(model), auth=False, database_url=f"sqlite:///{tmp_path / 'api.db'}", dtype="float32",
                device="cpu", keepalive_seconds=5.0, max_num_seqs=32, max_num_batched_tokens=512)
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    app = create_app(make_settings(tmp_path_factory.mktemp("db"), tiny_model_dir))
    with LiveServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
