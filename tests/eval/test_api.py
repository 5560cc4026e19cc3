"""`--api`: the same tasks scored through an OpenAI-compatible /v1/completions.

1. Against `gpt2serve serve` (create_app, live on loopback) on the tiny model: the numbers equal
   the in-process engine's on the same weights.
2. Against a scripted server (httpx.MockTransport): the max_tokens 0 -> 1 fallback, retries on
   429, greedy read from top_logprobs by value, batching and order of choices.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest

from gpt2serve.eval.cli import main
from gpt2serve.eval.scoring import ApiError, ApiScorer

from .conftest import N_POSITIONS

TASKS = ["lambada", "wikitext2", "ptb"]
LIMIT = 12


@pytest.fixture(scope="module")
def live_server(tiny_model_dir, tmp_path_factory):
    import uvicorn

    from gpt2serve.api.app import create_app
    from gpt2serve.api.settings import Settings

    db = tmp_path_factory.mktemp("db") / "api.db"
    app = create_app(Settings(model=str(tiny_model_dir), auth=False, database_url=f"sqlite:///{db}",
                              dtype="float32", device="cpu", max_num_seqs=16, max_num_batched_tokens=512))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if server.started and httpx.get(url + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("gpt2serve serve did not become ready")
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def test_api_equals_in_process(tmp_path, tiny_model_dir, real_data, live_server):
    common = [*TASKS, "--data", str(real_data), "--limit", str(LIMIT), "--no-progress"]
    assert main([*common, "--model", str(tiny_model_dir), "--device", "cpu", "--output", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--api", live_server, "--window", str(N_POSITIONS),
                 "--prompts-per-request", "3", "--concurrency", "2", "--output", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())["tasks"]
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["backend"] == "api" and b["api"] == live_server and b["model"] == tiny_model_dir.name
    for task in TASKS:
        for k, v in a[task]["metrics"].items():
            assert b["tasks"][task]["metrics"][k] == pytest.approx(v, rel=1e-4), (task, k)


# ---------------------------------------------------------------------------------------------
# a scripted server


def scripted(refuse_zero: bool, fail_first: int = 0):
    """A /v1/completions that echoes logprobs: token t gets logprob -t/100; the top alternative is
    token 0 (logprob 0) except where t is even, which is its own top (so: greedy iff all even)."""
    calls = {"n": 0, "bodies": []}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls["n"] += 1
        calls["bodies"].append(body)
        if calls["n"] <= fail_first:
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "slow down"}})
        if refuse_zero and body["max_tokens"] == 0:
            return httpx.Response(400, json={"error": {"message": "max_tokens must be at least 1", "param": "max_tokens"}})
        choices = []
        for i, p in enumerate(body["prompt"]):
            toks = p + [7] * body["max_tokens"]
            tlp = [None] + [-t / 100 for t in toks[1:]]
            top = [None] + [{f"t{t}": -t / 100} if t % 2 == 0 else {"t0": 0.0} for t in toks[1:]]
            choices.append({"index": i, "text": "", "logprobs": {"tokens": [f"t{t}" for t in toks],
                                                                 "token_logprobs": tlp, "top_logprobs": top}})
        return httpx.Response(200, json={"choices": choices[::-1]})  # order must come from "index"

    return calls, httpx.MockTransport(handler)


@pytest.mark.parametrize("refuse_zero", [False, True])
def test_scripted_server(refuse_zero):
    calls, transport = scripted(refuse_zero, fail_first=1)
    scorer = ApiScorer("http://x/v1", "m", max_length=64, prompts_per_request=2, concurrency=1, transport=transport)
    reqs = [([1, 2], [4, 6]), ([3], [5, 8, 10]), ([9, 9, 9], [2])]
    got = scorer.score(reqs)
    scorer.close()
    assert [s.token_logprobs for s in got] == [[-0.04, -0.06], [-0.05, -0.08, -0.10], [-0.02]]
    assert [s.all_greedy for s in got] == [True, False, True]
    assert math.isclose(got[1].logprob_sum, -0.23)
    bodies = calls["bodies"]
    assert bodies[0]["echo"] is True and bodies[0]["logprobs"] == 1 and bodies[0]["prompt"] == [[1, 2, 4, 6], [3, 5, 8, 10]]
    assert bodies[-1]["max_tokens"] == (1 if refuse_zero else 0)


def test_scripted_server_errors_are_reported():
    transport = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": {"message": "bad key"}}))
    scorer = ApiScorer("http://x", "m", transport=transport)
    with pytest.raises(ApiError, match="401"):
        scorer.score([([1], [2])])
    scorer.close()


def test_api_and_engine_agree_on_greedy_continuations(tiny_model_dir, hf_model, live_server):
    import torch

    from gpt2serve.eval.scoring import EngineScorer, get_tokenizer

    tok = get_tokenizer()
    reqs = []
    for text in ("The cat sat on the", "In 1990 the company", "She opened the door and"):
        ids = tok.encode(text)
        cont = []
        with torch.no_grad():
            for _ in range(3):  # the model's own greedy continuation: every token is the argmax
                cont.append(int(hf_model(torch.tensor([ids + cont])).logits[0, -1].argmax()))
        reqs += [(ids, cont), (ids, cont[:2] + [(cont[2] + 1) % 50257])]  # ... and one that is not
    api = ApiScorer(live_server, None, max_length=N_POSITIONS)
    engine = EngineScorer(str(tiny_model_dir), device="cpu")
    a, e = api.score(reqs), engine.score(reqs)
    api.close()
    engine.close()
    assert [s.all_greedy for s in a] == [s.all_greedy for s in e] == [True, False] * 3
    for x, y in zip(a, e):
        assert x.token_logprobs == pytest.approx(y.token_logprobs, rel=1e-5, abs=1e-5)
