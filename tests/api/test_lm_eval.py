"""lm-evaluation-harness `local-completions` contract: the payload it sends for loglikelihood and
what it reads back (lm_eval/models/api_models.py + openai_completions.py parse_logprobs)."""

from __future__ import annotations

import httpx
import pytest
import torch

from gpt2serve.model.tokenizer import Tokenizer

TOK = Tokenizer.default()


def lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval's parse_logprobs for one choice (continuation = tokens ctxlen..-1)."""
    lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    is_greedy = all(tok == max(top.values()) for tok, top in zip(lps, tops))
    return sum(lps), is_greedy


def hf_loglik(hf_model, ids: list[int], ctxlen: int) -> tuple[float, bool]:
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), dim=-1)  # (T, V)
    tgt = torch.tensor(ids[ctxlen:])
    rows = logp[ctxlen - 1: len(ids) - 1]
    return float(rows[torch.arange(len(tgt)), tgt].sum()), bool((rows.argmax(-1) == tgt).all())


def test_lm_eval_loglikelihood_payload(server, hf_model):
    texts = [("The capital of France is", " Paris"), ("One, two, three,", " four, five"),
             ("<|endoftext|> stays plain text here", " and ends")]
    batch, ctxlens = [], []
    for ctx, cont in texts:
        c, k = TOK.encode(ctx), TOK.encode(cont)
        batch.append(c + k)
        ctxlens.append(len(c))
    batch.append([50256, 464, 50256, 3290, 318])  # 50256 allowed inside a prompt, scored as given
    ctxlens.append(2)
    payload = {"model": server.ctx.model_name, "prompt": batch, "echo": True, "logprobs": 1, "max_tokens": 1,
               "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(len(batch)))  # one choice per prompt, in order
    for ids, ctxlen, choice in zip(batch, ctxlens, choices):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 == len(lp["top_logprobs"]) == len(lp["tokens"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        # the top entry is the argmax; where the scored token is the argmax, its value is the same float
        for tok_id, val, top in zip(ids[1:] + [None], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert len(top) == 1
            assert val <= max(top.values()) + 1e-6
        gen_top = lp["top_logprobs"][-1]
        assert list(gen_top.values())[0] == lp["token_logprobs"][-1]  # greedy: generated == argmax, bit-identical
        got, greedy = lm_eval_parse(choice, ctxlen)
        want, want_greedy = hf_loglik(hf_model, ids, ctxlen)
        assert got == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_argmax_prompt_token_is_bit_identical(server, hf_model):
    """A continuation made of greedy tokens: every entry is its own top-1, with the same value."""
    ctx = TOK.encode("Hello there, my friend")
    with torch.no_grad():
        ids = list(ctx)
        for _ in range(5):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": server.ctx.model_name, "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0})
    choice = r.json()["choices"][0]
    _, greedy = lm_eval_parse(choice, len(ctx))
    assert greedy
    for val, top in zip(choice["logprobs"]["token_logprobs"][len(ctx):], choice["logprobs"]["top_logprobs"][len(ctx):]):
        assert max(top.values()) == val


def test_generated_endoftext_is_kept(server):
    """Even when the one generated token is <|endoftext|> (which ends the sequence), it has its
    entry: lm-eval slices [ctxlen:-1] and would drop a real token otherwise."""
    ids = TOK.encode("Some prompt")
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": server.ctx.model_name, "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
        "temperature": 0, "logit_bias": {"50256": 100}})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["tokens"][-1] == "<|endoftext|>"
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_real_lm_eval_local_completions(server, hf_model):
    """lm-eval's own `local-completions` model, with only model, base_url and max_length (as on
    its command line): it finds our /tokenizer_info + /tokenize (remote tokenizer), sends the
    payload above and parses the answer; its log-likelihoods match transformers'."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(model=server.ctx.model_name, base_url=server.url + "/v1/completions", max_length=1024)
    assert lm.tokenizer_backend == "remote" and lm.eot_token_id == 50256
    pairs = [("The capital of France is", " Paris"), ("Once upon a time there was", " a princess who lived")]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    results = lm.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, results):
        c, k = TOK.encode(ctx), TOK.encode(cont)
        want, want_greedy = hf_loglik(hf_model, c + k, len(c))
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_tokenizer_info_chat_template_renders_our_prompt(server):
    import jinja2

    from gpt2serve.api import protocol as P

    info = httpx.get(server.url + "/tokenizer_info").json()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "U"}]},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "B"}]
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(messages=msgs, add_generation_prompt=True)
    assert rendered == P.render_chat([P.ChatMessage(**m) for m in msgs])
    r = httpx.post(server.url + "/tokenize", json={"messages": msgs})
    assert r.json()["tokens"] == TOK.encode(rendered)
    assert httpx.post(server.url + "/tokenize", json={"prompt": "a<|endoftext|>b"}).json()["tokens"] == \
        TOK.encode("a") + [50256] + TOK.encode("b")
