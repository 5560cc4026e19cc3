"""The official `openai` client against a live server: completions and chat, streaming and not,
n > 1, logprobs, echo, stop, seed, usage; greedy parity with transformers; concurrency."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gpt2serve.model.tokenizer import Tokenizer

TOK = Tokenizer.default()
PROMPT = "The quick brown fox jumps over the"


def model_id(server) -> str:
    return server.ctx.model_name


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers, no cache: argmax of the full forward each step."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = hf_model(torch.tensor([ids])).logits[0, -1]
            t = int(torch.argmax(logits))
            out.append(t)
            ids.append(t)
    return out


def stream_text(client, **kw) -> tuple[dict[int, str], dict[int, str | None], list]:
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    chunks = list(client.completions.create(stream=True, **kw))
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return texts, finish, chunks


def test_greedy_matches_transformers_streamed_and_not(server, client, hf_model):
    m = model_id(server)
    ids = TOK.encode(PROMPT)
    want = TOK.decode(hf_greedy(hf_model, ids, 12))
    r = client.completions.create(model=m, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12
    assert r.usage.model_extra["cost"] == pytest.approx((len(ids) * 1 + 12 * 2) / 1e6)
    texts, finish, _ = stream_text(client, model=m, prompt=PROMPT, max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert texts == {0: want} and finish == {0: "length"}
    # token-id prompts are scored as given
    r2 = client.completions.create(model=m, prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert r2.choices[0].text == want


def test_chat_streamed_equals_not_streamed(server, client):
    m = model_id(server)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model=m, messages=msgs, max_completion_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    full = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    rendered = "System: Be brief.\nUser: Say hi\nAssistant:"
    assert r.usage.prompt_tokens == len(TOK.encode(rendered))
    chunks = list(client.chat.completions.create(model=m, messages=msgs, max_completion_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    # include_usage: the last chunk has no choices and the usage; the others have usage null
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.model_extra["cost"] > 0


def test_n_and_multiple_prompts_indices(server, client):
    m = model_id(server)
    kw = dict(model=m, prompt=["Hello", "Goodbye"], n=2, max_tokens=4, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16  # 2 prompts x n=2 x 4 tokens
    assert r.usage.prompt_tokens == len(TOK.encode("Hello")) + len(TOK.encode("Goodbye"))  # once per prompt
    texts, finish, chunks = stream_text(client, **kw)
    assert set(texts) == {0, 1, 2, 3} and set(finish) == {0, 1, 2, 3}
    assert all(len(c.choices) == 1 for c in chunks)  # one choice per chunk, as OpenAI
    # the same seed gives the same texts, streamed or not
    assert texts == {c.index: c.text for c in r.choices}


def test_seed_round_trip(server, client):
    m = model_id(server)
    kw = dict(model=m, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    c = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "x"}], max_tokens=8, seed=99, n=3)
    d = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "x"}], max_tokens=8, seed=99, n=3)
    assert [x.message.content for x in c.choices] == [x.message.content for x in d.choices]


def test_completion_logprobs_shape(server, client):
    m = model_id(server)
    r = client.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == len(PROMPT)  # offsets into prompt + completion, as OpenAI
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and math.isfinite(val) and val <= 0
        assert top[tok] == val == max(top.values())  # greedy: the sampled token is the argmax


def test_echo_and_max_tokens_zero(server, client):
    m = model_id(server)
    ids = TOK.encode(PROMPT)
    r = client.completions.create(model=m, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == len(ids) and c.logprobs.token_logprobs[0] is None
    assert c.logprobs.top_logprobs[0] is None and all(v is not None for v in c.logprobs.token_logprobs[1:])
    assert r.usage.completion_tokens == 0
    r = client.completions.create(model=m, prompt=PROMPT, echo=True, max_tokens=3, temperature=0)
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].text) > len(PROMPT)
    texts, _, _ = stream_text(client, model=m, prompt=PROMPT, echo=True, max_tokens=3, temperature=0)
    assert texts[0] == r.choices[0].text


def test_stop_strings(server, client):
    m = model_id(server)
    full = client.completions.create(model=m, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop
    r = client.completions.create(model=m, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzzz"],
                                  extra_body={"ignore_eos": True})
    want = full[: full.index(stop)]
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    texts, finish, _ = stream_text(client, model=m, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                   extra_body={"ignore_eos": True})
    assert texts[0] == want and finish[0] == "stop"


def test_chat_logprobs(server, client):
    m = model_id(server)
    r = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for e in content:
        assert len(e.top_logprobs) == 5
        if not e.token.startswith("bytes:"):
            assert bytes(e.bytes).decode() == e.token
        assert e.top_logprobs[0].logprob == e.logprob


def test_best_of(server, client):
    m = model_id(server)
    r = client.completions.create(model=m, prompt=PROMPT, max_tokens=4, n=2, best_of=4, temperature=1.0, seed=3,
                                  logprobs=0)
    assert [c.index for c in r.choices] == [0, 1]
    sums = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert sums[0] >= sums[1] - 1e-4  # ranked by cumulative logprob


def test_generation_id_header(server, client):
    m = model_id(server)
    raw = client.completions.with_raw_response.create(model=m, prompt="a", max_tokens=1)
    assert raw.headers["x-generation-id"] == raw.parse().id


def test_concurrent_equals_sequential(server, client):
    m = model_id(server)
    prompts = [f"Request number {i} says" for i in range(16)]

    def one(p: str) -> str:
        return client.completions.create(model=m, prompt=p, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    sequential = [one(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(one, prompts))
    assert concurrent == sequential


def test_models_and_tokenizer_routes(server, client):
    import httpx

    m = model_id(server)
    models = client.models.list()
    assert [x.id for x in models.data] == [m]
    card = client.models.retrieve(m)
    assert card.model_extra["context_length"] == 1024
    ext = card.model_extra["gpt2serve"]
    assert ext["n_layer"] == 2 and ext["n_embd"] == 64 and ext["vocab_size"] == 50257
    assert card.model_extra["pricing"]["prompt"] == "0.000001"
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT})
    assert r.json()["tokens"] == TOK.encode(PROMPT) and r.json()["max_model_len"] == 1024
    r = httpx.post(server.url + "/detokenize", json={"tokens": TOK.encode(PROMPT)})
    assert r.json() == {"prompt": PROMPT}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token_id"] == 50256 and "\nUser:" in info["chat_stop"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["running"] == 0 and h["model"] == m
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("gpt2serve_time_to_first_token_seconds_bucket", "gpt2serve_inter_token_latency_seconds_bucket",
                 "gpt2serve_e2e_request_latency_seconds_bucket", "gpt2serve_request_queue_time_seconds_bucket",
                 "gpt2serve_requests_running", "gpt2serve_requests_waiting", "gpt2serve_prompt_tokens_total",
                 "gpt2serve_generation_tokens_total"):
        assert name in metrics
