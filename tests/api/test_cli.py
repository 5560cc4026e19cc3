"""`gpt2serve serve` as a real process: serves (here with an int8 KV cache), stops on SIGTERM; exits 1 when
the model can't load, 2 on a bad setting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from .conftest import free_port


def serve(args: list[str], tmp_path) -> subprocess.Popen:
    env = dict(os.environ, GPT2SERVE_DATABASE_URL=f"sqlite:///{tmp_path / 'cli.db'}")
    return subprocess.Popen([sys.executable, "-m", "gpt2serve.cli", "serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_serve_answers_and_stops(tiny_model_dir, tmp_path):
    port = free_port()
    p = serve(["--model", str(tiny_model_dir), "--port", str(port), "--no-auth", "--max-num-seqs", "4",
               "--dtype", "float32", "--device", "cpu", "--kv-cache-dtype", "int8"], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert p.poll() is None, p.stdout.read()
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": tiny_model_dir.name, "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    # uvicorn re-raises the signal once it has shut down cleanly (so the exit shows as SIGTERM)
    assert p.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert "(torch.int8)" in out  # the engine's KV-cache line: --kv-cache-dtype reached it


def test_serve_refuses_an_unknown_kv_cache_dtype(tmp_path):
    p = serve(["--model", "random:gpt2-tiny", "--port", str(free_port()), "--no-auth", "--kv-cache-dtype", "fp8"], tmp_path)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "kv_cache_dtype" in out and "'auto' or 'int8'" in out


def test_serve_exits_1_when_the_model_cannot_load(tmp_path):
    p = serve(["--model", str(tmp_path / "missing-model"), "--port", str(free_port()), "--no-auth"], tmp_path)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1 and "missing-model" in out
