"""Abuse: wrong, revoked and other accounts' keys; sign-up floods; key-check timing; secrets in logs.

  * N requests with invalid credentials over the billed and account routes: 0 accepted (every
    answer a 401 in OpenAI's shape, or a 404 for another account's generation).
  * M sign-ups from one address: at most the per-hour limit succeed, the rest get 429 + Retry-After.
  * Timing: /v1/key with keys that differ from a real one in their last character, in their first
    secret character, or everywhere (random), interleaved over many rounds; the medians must agree
    within a generous ratio (a distribution comparison, not a timed assertion).
  * The server's log at its default level holds no key and no prompt text.
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import string
import time
import uuid

import httpx

from stress.common import Server, auth, error_problem, median, percentile

KEY_RE = re.compile(r"sk-[0-9a-fA-F]{16,}")


def flip(key: str, i: int) -> str:
    c = key[i]
    return key[:i] + ("0" if c != "0" else "1") + key[i + 1:]


def random_key() -> str:
    return "sk-" + secrets.token_hex(24)


def bad_credentials(valid: str, revoked: str, rng: random.Random) -> list[tuple[str, dict[str, str]]]:
    """(kind, headers) for every way of not holding a usable key."""
    garbage = "".join(rng.choice(string.ascii_letters + string.digits + "-_.~+/=") for _ in range(rng.randint(1, 80)))
    return [
        ("random well-formed key", auth(random_key())),
        ("last character wrong", auth(flip(valid, len(valid) - 1))),
        ("first secret character wrong", auth(flip(valid, 11))),
        ("prefix wrong", auth(flip(valid, 3))),
        ("upper-cased key", auth(valid.upper())),
        ("key + 1 character", auth(valid + "0")),
        ("key - 1 character", auth(valid[:-1])),
        ("prefix only", auth(valid[:11])),
        ("revoked key", auth(revoked)),
        ("garbage token", auth(garbage)),
        ("SQL in the token", {"Authorization": "Bearer sk-' OR '1'='1"}),
        ("Basic scheme", {"Authorization": f"Basic {valid}"}),
        ("bare key, no scheme", {"Authorization": valid}),
        ("empty bearer", {"Authorization": "Bearer"}),
        ("no Authorization header", {}),
    ]


async def run_abuse(server: Server, *, requests: int = 10_000, concurrency: int = 32, signups: int = 50,
                    timing_rounds: int = 300, seed: int = 0) -> dict:
    rng = random.Random(seed)
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    valid = server.create_key(10.0)
    other = server.create_key(10.0)
    revoked = server.create_key(10.0)
    server.revoke_key(revoked)
    canary = f"CANARY-{uuid.uuid4().hex}"
    problems: list[str] = []

    # a generation of the valid key's account (another account must not see it) + canary prompts
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(server.url + "/v1/completions", headers=auth(valid),
                            json={"model": model, "prompt": f"{canary} completion", "max_tokens": 2})
        r.raise_for_status()
        gid = r.headers["x-generation-id"]
        await http.post(server.url + "/v1/chat/completions", headers=auth(valid), json={
            "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": f"{canary} chat"}]})
        await http.post(server.url + "/v1/completions", headers=auth(valid),  # a 400 that echoes nothing
                        json={"model": model, "prompt": f"{canary} bad", "temperature": "hot"})
        await http.post(server.url + "/v1/completions", headers=auth(valid), json={
            "model": model, "prompt": f"{canary} stream", "max_tokens": 2, "stream": True})

    routes = [
        ("POST", "/v1/completions", {"model": model, "prompt": f"{canary} abuse", "max_tokens": 1}),
        ("POST", "/v1/chat/completions", {"model": model, "max_tokens": 1,
                                          "messages": [{"role": "user", "content": f"{canary} abuse"}]}),
        ("GET", "/v1/key", None),
        ("GET", "/v1/credits", None),
        ("GET", f"/v1/generation?id={gid}", None),
    ]
    accepted: list[str] = []
    statuses: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    bad_shape: list[str] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, http: httpx.AsyncClient) -> None:
        r_rng = random.Random(seed * 7919 + i)
        creds = bad_credentials(valid, revoked, r_rng) + [("other account's key", auth(other))]
        kind, headers = creds[i % len(creds)]
        method, path, body = routes[(i // len(creds)) % len(routes)]
        if kind == "other account's key" and not path.startswith("/v1/generation"):
            path, method, body = f"/v1/generation?id={gid}", "GET", None  # its own key is valid elsewhere
        async with sem:
            r = await http.request(method, server.url + path, json=body, headers=headers)
        statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
        by_kind[kind] = by_kind.get(kind, 0) + 1
        expect = 404 if kind == "other account's key" else 401
        if r.status_code < 300:
            accepted.append(f"{kind} {method} {path} -> {r.status_code}")
        elif r.status_code != expect:
            problems.append(f"{kind} {method} {path} -> {r.status_code}, expected {expect}: {r.text[:150]}")
        else:
            problem = error_problem(r, None if expect == 401 else "id")
            if problem:
                bad_shape.append(f"{kind} {method} {path}: {problem}")

    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await asyncio.gather(*(one(i, http) for i in range(requests)))
    bad_key_s = time.monotonic() - t0
    problems += accepted[:20] + bad_shape[:20]

    # sign-up flood from one address (127.0.0.1)
    signup_status: dict[str, int] = {}
    retry_after_missing = 0
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(signups):
            r = await http.post(server.url + "/v1/signup", json={"label": "flood"})
            signup_status[str(r.status_code)] = signup_status.get(str(r.status_code), 0) + 1
            if r.status_code == 429:
                if "retry-after" not in r.headers:
                    retry_after_missing += 1
                p = error_problem(r)
                if p:
                    problems.append(f"sign-up 429: {p}")
    limit = int(server.env.get("GPT2SERVE_SIGNUP_RATE_PER_HOUR", "5"))
    if signup_status.get("200", 0) > limit:
        problems.append(f"{signup_status.get('200')} sign-ups from one address accepted (limit {limit}/hour)")
    if signup_status.get("429", 0) < signups - limit:
        problems.append(f"sign-up flood: {signup_status}")
    if retry_after_missing:
        problems.append(f"{retry_after_missing} sign-up 429s without Retry-After")

    timing = key_timing(server, valid, timing_rounds, rng)
    problems += timing.pop("failures")

    log = server.log_text()
    leaks = sorted({m for m in KEY_RE.findall(log)})
    leaked_secrets = [k for k in (valid, other, revoked) if k in log or k[3:] in log]
    canary_lines = [line for line in log.splitlines() if canary in line or "CANARY-" in line]
    if leaks or leaked_secrets:
        problems.append(f"keys in the server log: {[k[:14] + '...' for k in leaks + leaked_secrets][:5]}")
    if canary_lines:
        problems.append(f"prompt text in the server log: {canary_lines[:3]}")
    if not server.alive():
        problems.append("the server died")
    return {
        "bad_key_requests": requests, "accepted": len(accepted), "statuses": statuses, "credential_kinds": by_kind,
        "bad_error_shape": len(bad_shape), "bad_key_requests_per_s": round(requests / bad_key_s, 1),
        "signups_sent": signups, "signup_statuses": signup_status, "signup_limit_per_hour": limit,
        "timing": timing, "log_bytes": len(log), "keys_in_log": len(leaks) + len(leaked_secrets),
        "prompt_lines_in_log": len(canary_lines), "failures": problems,
    }


TIMING_RATIO = 1.5  # medians of two wrong-key classes may differ by at most this factor


def key_timing(server: Server, valid: str, rounds: int, rng: random.Random) -> dict:
    """Median seconds of GET /v1/key per key class, classes interleaved in random order each round
    (so drift in machine load hits every class alike); one keep-alive connection."""
    classes = {
        "valid": lambda: valid,
        "last_char_wrong": lambda: flip(valid, len(valid) - 1),
        "first_secret_char_wrong": lambda: flip(valid, 11),
        "random_key": random_key,
    }
    times: dict[str, list[float]] = {k: [] for k in classes}
    with httpx.Client(timeout=30) as http:
        for name, make in classes.items():  # warm the connection and caches
            http.get(server.url + "/v1/key", headers=auth(make()))
        for _ in range(rounds):
            order = list(classes)
            rng.shuffle(order)
            for name in order:
                h = auth(classes[name]())
                t0 = time.perf_counter()
                http.get(server.url + "/v1/key", headers=h)
                times[name].append(time.perf_counter() - t0)
    med = {k: median(v) for k, v in times.items()}
    out = {"rounds": rounds,
           "median_ms": {k: round(v * 1000, 3) for k, v in med.items()},
           "p90_ms": {k: round(percentile(v, 90) * 1000, 3) for k, v in times.items()}}
    pairs = [("last_char_wrong", "first_secret_char_wrong"), ("last_char_wrong", "random_key"),
             ("first_secret_char_wrong", "random_key")]
    ratios = {f"{a}/{b}": round(med[a] / med[b], 3) for a, b in pairs}
    out["ratios"] = ratios
    out["valid_over_wrong"] = round(med["valid"] / med["last_char_wrong"], 3)
    out["failures"] = [f"key-check medians differ by more than x{TIMING_RATIO}: {k} = {v}"
                       for k, v in ratios.items() if not 1 / TIMING_RATIO <= v <= TIMING_RATIO]
    return out


def abuse(server: Server, **kw) -> dict:
    return asyncio.run(run_abuse(server, **kw))
