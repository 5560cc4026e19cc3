"""Bad input: schemathesis over /openapi.json plus hand-written hostile requests.

Passes when no response is a 5xx, the server never dies, and every 4xx is in OpenAI's error shape
(and, for the hand-written cases, names the parameter at fault).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx

from stress.common import Server, auth, error_problem

GENERATING = {"/v1/completions", "/v1/chat/completions"}
VOCAB = 50257
CONTEXT = 1024


# --------------------------------------------------------------------------- schema-driven fuzzing


def _cap(body: Any, model: str) -> Any:
    """Keep valid generation requests short (the fuzz is about input handling, not decoding 1024
    tokens 128 times on a CPU); invalid values are left as they are."""
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = model
        for k in ("max_tokens", "max_completion_tokens"):
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 4:
                body[k] = 4
        for k in ("n", "best_of"):
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 2:
                body[k] = 2
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 4
    return body


def fuzz(server: Server, key: str | None, cases: int = 2000, seed: int = 0, time_limit: float = 1800.0) -> dict:
    """Run schemathesis rounds (positive and negative generation, every operation) until `cases`
    requests were sent or `time_limit` passed. Every 4xx is checked for OpenAI's error shape."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    headers = auth(key)
    per_round = max(5, math.ceil(cases / (2 * len(operations))))
    stats: dict[str, Any] = {"cases": 0, "statuses": {}, "per_operation": {}, "generated_200": 0, "rounds": 0}
    five_xx: list[str] = []
    bad_shape: list[str] = []
    t_end = time.monotonic() + time_limit
    rnd = 0
    while stats["cases"] < cases and time.monotonic() < t_end:
        before = stats["cases"]
        for op in operations:
            label = f"{op.method.upper()} {op.path}"
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if stats["cases"] >= cases or time.monotonic() >= t_end:
                    break

                @settings(max_examples=per_round, deadline=None, database=None, derandomize=False,
                          suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def run(case):
                    if op.path in GENERATING:
                        case.body = _cap(case.body, model)
                    h = dict(headers)
                    h.update(case.headers or {})
                    r = case.call(base_url=server.url, headers=h, timeout=120)
                    stats["cases"] += 1
                    stats["statuses"][r.status_code] = stats["statuses"].get(r.status_code, 0) + 1
                    stats["per_operation"][label] = stats["per_operation"].get(label, 0) + 1
                    if op.path in GENERATING and r.status_code == 200:
                        stats["generated_200"] += 1
                    what = f"{label} {str(case.body)[:200]} -> {r.status_code} {r.text[:200]}"
                    if r.status_code >= 500:
                        five_xx.append(what)
                    elif 400 <= r.status_code < 500:
                        problem = error_problem(_as_httpx(r))
                        if problem:
                            bad_shape.append(f"{what}: {problem}")

                try:
                    # a different hypothesis seed each round: new cases, not the same ones again
                    from hypothesis import seed as hseed

                    hseed(seed * 1000 + rnd)(run)()
                except Exception as e:  # schemathesis can't build negative cases for some operations
                    if "unsatisfiable" not in (type(e).__name__ + str(e)).lower():
                        raise
        rnd += 1
        stats["rounds"] = rnd
        if stats["cases"] == before:
            break
    stats["statuses"] = {str(k): v for k, v in sorted(stats["statuses"].items())}
    stats["operations"] = len(operations)
    stats["five_xx"] = len(five_xx)
    stats["bad_error_shape"] = len(bad_shape)
    stats["failures"] = five_xx[:20] + bad_shape[:20]
    stats["server_alive"] = server.alive()
    return stats


class _as_httpx:
    """schemathesis hands back a requests-like response; error_problem wants .headers and .json()."""

    def __init__(self, r):
        self._r = r
        self.headers = {k.lower(): v for k, v in r.headers.items()}
        if isinstance(next(iter(self.headers.values()), ""), list):
            self.headers = {k: v[0] for k, v in self.headers.items()}

    def json(self):
        return json.loads(self._r.text)


# ------------------------------------------------------------------------------ hostile requests


@dataclass
class Case:
    name: str
    path: str
    body: Any = None  # JSON-able, sent with json=
    raw: bytes | None = None  # sent as is (with content-type JSON)
    method: str = "POST"
    expect: tuple[int, ...] = (400,)  # acceptable statuses
    param: str | None | bool = False  # see error_problem
    headers: dict[str, str] | None = None
    chunked: bool = False  # send `raw` without Content-Length


def _nested(depth: int) -> bytes:
    return b'{"model": "M", "prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


def hostile_cases(model: str) -> list[Case]:
    m = model
    c = "/v1/completions"
    ch = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hello"}]
    ok = (200,)
    cases = [
        # wrong types
        Case("prompt is a number", c, {"model": m, "prompt": 12.5}, param="prompt"),
        Case("prompt is an object", c, {"model": m, "prompt": {"a": 1}}, param="prompt"),
        Case("max_tokens is a string", c, {"model": m, "prompt": "x", "max_tokens": "ten"}, param="max_tokens"),
        Case("temperature is a string", c, {"model": m, "prompt": "x", "temperature": "hot"}, param="temperature"),
        Case("n is a list", c, {"model": m, "prompt": "x", "n": [1]}, param="n"),
        Case("stream is a string", c, {"model": m, "prompt": "x", "stream": "yes please"}, param="stream"),
        Case("stop is a number", c, {"model": m, "prompt": "x", "stop": 7}, param="stop"),
        Case("logit_bias is a list", c, {"model": m, "prompt": "x", "logit_bias": [1, 2]}, param="logit_bias"),
        Case("messages is a string", ch, {"model": m, "messages": "hello"}, param="messages"),
        Case("message without role", ch, {"model": m, "messages": [{"content": "x"}]}, param="messages"),
        Case("message role unknown", ch, {"model": m, "messages": [{"role": "wizard", "content": "x"}]},
             param="messages"),
        Case("model is a number", c, {"model": 5, "prompt": "x"}, param="model"),
        Case("body is a JSON array", c, raw=b"[1, 2, 3]", param=False),
        Case("body is null", c, raw=b"null", param=False),
        Case("body is a string", c, raw=b'"hello"', param=False),
        Case("body is empty", c, raw=b"", param=False),
        Case("body is not JSON", c, raw=b"{model: gpt2, prompt: }", param=False),
        Case("truncated JSON", c, raw=b'{"model": "M", "prompt": "x', param=False),
        # huge numbers
        Case("max_tokens 1e30", c, {"model": m, "prompt": "x", "max_tokens": 10**30}, param="max_tokens"),
        Case("max_tokens 2**63", c, {"model": m, "prompt": "x", "max_tokens": 2**63}, param="max_tokens"),
        Case("n 10**6", c, {"model": m, "prompt": "x", "n": 10**6}, param="n"),
        Case("best_of 10**9", c, {"model": m, "prompt": "x", "best_of": 10**9}, param="best_of"),
        Case("seed 2**80", c, {"model": m, "prompt": "x", "seed": 2**80}, param="seed"),
        Case("temperature 1e308", c, {"model": m, "prompt": "x", "temperature": 1e308}, param="temperature"),
        Case("logprobs 10**9", c, {"model": m, "prompt": "x", "logprobs": 10**9}, param="logprobs"),
        Case("top_k 10**12", c, {"model": m, "prompt": "x", "top_k": 10**12, "max_tokens": 2}, expect=(200, 400),
             param="top_k"),
        Case("top_logprobs 10**6", ch, {"model": m, "messages": msgs, "logprobs": True, "top_logprobs": 10**6},
             param="top_logprobs"),
        Case("logit_bias 1e300", c, {"model": m, "prompt": "x", "logit_bias": {"11": 1e300}, "max_tokens": 2},
             expect=(200, 400), param="logit_bias"),
        Case("a 1000-digit integer", c, raw=b'{"model": "M", "prompt": "x", "max_tokens": ' + b"9" * 1000 + b"}",
             param="max_tokens"),
        # negative and NaN / infinite values
        Case("max_tokens -1", c, {"model": m, "prompt": "x", "max_tokens": -1}, param="max_tokens"),
        Case("temperature -1", c, {"model": m, "prompt": "x", "temperature": -1}, param="temperature"),
        Case("top_p -0.5", c, {"model": m, "prompt": "x", "top_p": -0.5}, param="top_p"),
        Case("n 0", c, {"model": m, "prompt": "x", "n": 0}, param="n"),
        Case("presence_penalty -3", c, {"model": m, "prompt": "x", "presence_penalty": -3}, param="presence_penalty"),
        Case("frequency_penalty 5", c, {"model": m, "prompt": "x", "frequency_penalty": 5}, param="frequency_penalty"),
        Case("min_tokens -5", c, {"model": m, "prompt": "x", "min_tokens": -5}, param="min_tokens"),
        Case("max_completion_tokens -1", ch, {"model": m, "messages": msgs, "max_completion_tokens": -1},
             param="max_completion_tokens"),
        Case("temperature NaN", c, raw=b'{"model": "M", "prompt": "x", "temperature": NaN}', param="temperature"),
        Case("top_p NaN", c, raw=b'{"model": "M", "prompt": "x", "top_p": NaN}', param="top_p"),
        Case("temperature Infinity", c, raw=b'{"model": "M", "prompt": "x", "temperature": Infinity}',
             param="temperature"),
        Case("presence_penalty -Infinity", c, raw=b'{"model": "M", "prompt": "x", "presence_penalty": -Infinity}',
             param="presence_penalty"),
        Case("logit_bias NaN", c, raw=b'{"model": "M", "prompt": "x", "logit_bias": {"11": NaN}}',
             param="logit_bias"),
        Case("logit_bias Infinity", c, raw=b'{"model": "M", "prompt": "x", "max_tokens": 2, '
             b'"logit_bias": {"11": Infinity}}', expect=(200, 400), param="logit_bias"),
        Case("repetition_penalty NaN", c, raw=b'{"model": "M", "prompt": "x", "repetition_penalty": NaN}',
             param="repetition_penalty"),
        Case("min_p NaN (chat)", ch, raw=b'{"model": "M", "messages": [{"role": "user", "content": "x"}], '
             b'"min_p": NaN}', param="min_p"),
        # big bodies and deep nesting
        Case("10 MB body (Content-Length)", c, raw=b'{"model": "M", "prompt": "' + b"a" * (10 * 2**20) + b'"}',
             expect=(413,), param=None),
        Case("10 MB body (chunked)", c, raw=b'{"model": "M", "prompt": "' + b"a" * (10 * 2**20) + b'"}',
             expect=(413,), param=None, chunked=True),
        Case("nested arrays 100,000 deep", c, raw=_nested(100_000), param=False),
        Case("nested arrays 1,000 deep", c, raw=_nested(1_000), param=False),
        Case("nested objects 100,000 deep", c, raw=b'{"model": "M", "prompt": "x", "user": ' + b'{"a":' * 100_000
             + b"1" + b"}" * 100_000 + b"}", param=False),
        Case("nested messages content", ch, raw=b'{"model": "M", "messages": [{"role": "user", "content": '
             + b"[" * 50_000 + b"]" * 50_000 + b"}]}", param=False),
        # encodings
        Case("invalid UTF-8 in prompt", c, raw=b'{"model": "M", "prompt": "\xff\xfe\xfd caf\xc3"}', param=False),
        Case("invalid UTF-8 in a key", c, raw=b'{"model": "M", "pro\xffmpt": "x"}', param=False),
        Case("UTF-16 body", c, raw=json.dumps({"model": m, "prompt": "x", "max_tokens": 2}).encode("utf-16"),
             expect=(200, 400), param=False),
        Case("lone surrogate in prompt", c, raw=b'{"model": "M", "prompt": "a\\ud800b", "max_tokens": 2}',
             expect=(200, 400), param="prompt"),
        Case("lone low surrogate in prompt", c, raw=b'{"model": "M", "prompt": "\\udfff", "max_tokens": 2}',
             expect=(200, 400), param="prompt"),
        Case("lone surrogate in a message", ch, raw=b'{"model": "M", "max_tokens": 2, "messages": [{"role": "user", '
             b'"content": "hi \\ud83d"}]}', expect=(200, 400), param="messages"),
        Case("lone surrogate in stop", c, raw=b'{"model": "M", "prompt": "x", "max_tokens": 2, "stop": ["\\ud800"]}',
             expect=(200, 400), param="stop"),
        Case("lone surrogate in /tokenize", "/tokenize", raw=b'{"model": "M", "prompt": "\\ud800"}',
             expect=(200, 400), param="prompt"),
        Case("lone surrogate in logit_bias key", c, raw=b'{"model": "M", "prompt": "x", "logit_bias": '
             b'{"\\ud800": 1}}', param="logit_bias"),
        Case("NUL characters", c, {"model": m, "prompt": "a\u0000b\u0000", "max_tokens": 2}, expect=ok),
        # token ids
        Case("token id = vocab size", c, {"model": m, "prompt": [VOCAB], "max_tokens": 2}, param="prompt"),
        Case("token id -1", c, {"model": m, "prompt": [1, -1], "max_tokens": 2}, param="prompt"),
        Case("token id 2**40", c, {"model": m, "prompt": [2**40], "max_tokens": 2}, param="prompt"),
        Case("token id 2**70", c, {"model": m, "prompt": [2**70], "max_tokens": 2}, param="prompt"),
        Case("token id out of range in a batch", c, {"model": m, "prompt": [[1, 2], [3, 99999]], "max_tokens": 2},
             param="prompt"),
        Case("token id as float", c, {"model": m, "prompt": [1.5, 2], "max_tokens": 2}, param="prompt"),
        Case("/detokenize out of range", "/detokenize", {"model": m, "tokens": [VOCAB + 5]}, param="tokens"),
        Case("/detokenize negative", "/detokenize", {"model": m, "tokens": [-3]}, param="tokens"),
        Case("logit_bias key out of range", c, {"model": m, "prompt": "x", "logit_bias": {"99999": 1}},
             param="logit_bias"),
        Case("logit_bias key negative", c, {"model": m, "prompt": "x", "logit_bias": {"-5": 1}}, param="logit_bias"),
        Case("logit_bias key not a number", c, {"model": m, "prompt": "x", "logit_bias": {"abc": 1}},
             param="logit_bias"),
        Case("stop_token_ids out of range", c, {"model": m, "prompt": "x", "stop_token_ids": [10**9]},
             param="stop_token_ids"),
        # empty prompts
        Case("empty prompt string", c, {"model": m, "prompt": "", "max_tokens": 2}, expect=ok),
        Case("empty prompt array", c, {"model": m, "prompt": [], "max_tokens": 2}, param="prompt"),
        Case("empty token array in a batch", c, {"model": m, "prompt": [[]], "max_tokens": 2}, param="prompt"),
        Case("batch of empty strings", c, {"model": m, "prompt": ["", ""], "max_tokens": 2}, expect=ok),
        Case("missing prompt", c, {"model": m}, param="prompt"),
        Case("empty messages", ch, {"model": m, "messages": []}, param="messages"),
        Case("empty message content", ch, {"model": m, "messages": [{"role": "user", "content": ""}],
                                           "max_tokens": 2}, expect=ok),
        # long prompts
        Case("1,024-token prompt + 1", c, {"model": m, "prompt": [11] * 1024, "max_tokens": 1}, param="max_tokens"),
        Case("1,023-token prompt + 1", c, {"model": m, "prompt": [11] * 1023, "max_tokens": 1}, expect=ok),
        Case("1,024-token prompt, max_tokens 0", c, {"model": m, "prompt": [11] * 1024, "max_tokens": 0},
             expect=(200, 400), param="max_tokens"),
        Case("1,024-token text prompt", c, {"model": m, "prompt": " the" * 1024, "max_tokens": 1},
             param="max_tokens"),
        Case("1,024-token chat message", ch, {"model": m, "messages": [{"role": "user", "content": " the" * 1024}]},
             param="messages"),
        Case("20,000-token prompt", c, {"model": m, "prompt": [11] * 20_000, "max_tokens": 1},
             expect=(400,), param=True),
        # stop strings and logit_bias at scale
        Case("5,000 stop strings", c, {"model": m, "prompt": "x", "max_tokens": 4,
                                        "stop": [f"stop{i}" for i in range(5000)]}, expect=(200, 400), param="stop"),
        Case("a 100,000-character stop string", c, {"model": m, "prompt": "x", "max_tokens": 4, "stop": "s" * 100_000},
             expect=(200, 400), param="stop"),
        Case("5,000 empty stop strings", c, {"model": m, "prompt": "x", "max_tokens": 4, "stop": [""] * 5000},
             expect=(200, 400), param="stop"),
        Case("logit_bias on every token", c, {"model": m, "prompt": "x", "max_tokens": 4,
                                              "logit_bias": {str(i): -1.0 for i in range(VOCAB)}},
             expect=(200, 400), param="logit_bias"),
        Case("logit_bias -100 on every token (chat)", ch, {"model": m, "messages": msgs, "max_tokens": 4,
                                                            "logit_bias": {str(i): -100 for i in range(VOCAB)}},
             expect=(200, 400), param="logit_bias"),
        # other abuse of the shape
        Case("unknown model", c, {"model": "gpt-4", "prompt": "x"}, expect=(404,), param="model"),
        Case("unknown route", "/v1/engines/davinci/completions", {"prompt": "x"}, expect=(404,), param=None),
        Case("GET on a POST route", c, None, method="GET", expect=(405,), param=None),
        Case("n=128 x best_of=128 x max_tokens=1024", c, {"model": m, "prompt": "x", "n": 128, "best_of": 128,
                                                          "max_tokens": 1000}, expect=(400, 402, 413, 429), param=True),
        Case("best_of < n", c, {"model": m, "prompt": "x", "n": 3, "best_of": 2}, param=True),
        Case("stream_options without stream", c, {"model": m, "prompt": "x", "stream_options":
                                                   {"include_usage": True}}, param="stream_options"),
        Case("generation id 10 kB", f"/v1/generation?id={'a' * 10_000}", None, method="GET", expect=(400, 401, 404)),
        Case("text/plain content-type", c, raw=json.dumps({"model": "M", "prompt": "x", "max_tokens": 2}).encode(),
             headers={"content-type": "text/plain"}, expect=(200, 400, 415)),
        Case("signup with a 10 kB label", "/v1/signup", {"label": "l" * 10_000}, expect=(400, 429), param=False),
        Case("signup body is a list", "/v1/signup", raw=b"[1]", expect=(400, 422, 429), param=False),
    ]
    for case in cases:  # the served model's name where the raw bodies say "M"
        if case.raw is not None and b'"model": "M"' in case.raw:
            case.raw = case.raw.replace(b'"model": "M"', json.dumps({"model": m})[1:-1].encode(), 1)
    return cases


def hostile(server: Server, key: str | None) -> dict:
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    results = []
    failures = []
    statuses: dict[str, int] = {}
    with httpx.Client(timeout=120) as client:
        for case in hostile_cases(model):
            headers = {"content-type": "application/json"} | auth(key) | (case.headers or {})
            t0 = time.monotonic()
            try:
                if case.raw is not None:
                    content: Any = case.raw
                    if case.chunked:
                        data = case.raw
                        content = (data[i:i + 65536] for i in range(0, len(data), 65536))
                    r = client.request(case.method, server.url + case.path, content=content, headers=headers)
                elif case.body is not None:
                    r = client.request(case.method, server.url + case.path, json=case.body, headers=headers)
                else:
                    r = client.request(case.method, server.url + case.path, headers=headers)
            except httpx.HTTPError as e:
                failures.append(f"{case.name}: transport error {type(e).__name__}: {e}")
                results.append({"case": case.name, "status": None, "error": str(e)})
                continue
            dt = time.monotonic() - t0
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            row = {"case": case.name, "status": r.status_code, "seconds": round(dt, 3)}
            if r.status_code >= 400:
                try:
                    row["param"] = r.json()["error"]["param"]
                except Exception:
                    row["param"] = "?"
            results.append(row)
            if r.status_code >= 500:
                failures.append(f"{case.name}: {r.status_code} {r.text[:200]}")
            elif r.status_code not in case.expect:
                failures.append(f"{case.name}: status {r.status_code}, expected {case.expect}: {r.text[:200]}")
            if 400 <= r.status_code < 500:
                p = case.param if r.status_code == 400 else (case.param if case.param is None else False)
                problem = error_problem(r, p)
                if problem:
                    failures.append(f"{case.name}: {problem}")
            if not server.alive():
                failures.append(f"{case.name}: the server died")
                break
    return {"cases": len(results), "statuses": statuses, "failures": failures, "results": results,
            "server_alive": server.alive()}
