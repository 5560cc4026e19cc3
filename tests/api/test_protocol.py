"""Protocol types, the chat template, token display strings, error paths and the serve CLI,
without a server."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from gpt2serve.api import protocol as P
from gpt2serve.api.app import _loc
from gpt2serve.api.cli import parser, settings_from_args
from gpt2serve.api.serving import TokenText, _lp, _nchars
from gpt2serve.engine.sampling import ParamError
from gpt2serve.model.tokenizer import Tokenizer


def test_completion_request_to_sampling_params():
    r = P.CompletionRequest(model="m", prompt="x", logprobs=2, echo=True, stop="END", logit_bias={"50256": -100},
                            top_k=5, min_tokens=1, ignore_eos=True, stop_token_ids=[13], unknown_field=1)
    p = r.to_sampling_params()
    assert p.max_tokens == 16  # OpenAI's default
    assert p.logprobs == 2 and p.prompt_logprobs == 2  # echo + logprobs scores the prompt
    assert p.stop == ["END"] and p.logit_bias == {50256: -100.0} and p.top_k == 5 and p.ignore_eos
    assert p.stop_token_ids == [13] and p.min_tokens == 1
    assert r.model_extra == {"unknown_field": 1}  # accepted, ignored
    assert P.CompletionRequest(model="m", prompt="x").to_sampling_params().prompt_logprobs is None


@pytest.mark.parametrize("prompt", ["a", ["a", "b"], [1, 2], [[1], [2, 3]]])
def test_prompt_forms(prompt):
    assert P.CompletionRequest(model="m", prompt=prompt).prompt == prompt


def test_cross_field_errors_name_the_param():
    for kw, param in [({"suffix": "s"}, "suffix"), ({"best_of": 1, "n": 2}, "best_of"),
                      ({"best_of": 3, "stream": True}, "best_of")]:
        with pytest.raises(ValidationError) as e:
            P.CompletionRequest(model="m", prompt="x", **kw)
        assert e.value.errors()[0]["ctx"]["error"].param == param
    with pytest.raises(ValidationError):
        P.CompletionRequest(model="m", prompt="x", temperature=float("nan"))


def test_chat_template_and_params():
    msgs = [P.ChatMessage(role="developer", content="Be nice."), P.ChatMessage(role="user", content=[
        P.ContentPart(type="text", text="Hi "), P.ContentPart(type="text", text="there")]),
        P.ChatMessage(role="assistant", content="Hello."), P.ChatMessage(role="user", content="Bye")]
    assert P.render_chat(msgs) == "System: Be nice.\nUser: Hi there\nAssistant: Hello.\nUser: Bye\nAssistant:"
    r = P.ChatCompletionRequest(model="m", messages=msgs, stop="!", max_tokens=7, logprobs=True)
    p = r.to_sampling_params(default_max_tokens=100)
    assert p.stop == ["!", *P.CHAT_STOP] and p.max_tokens == 7 and p.logprobs == 0
    r = P.ChatCompletionRequest(model="m", messages=msgs, max_tokens=7, max_completion_tokens=3)
    assert r.to_sampling_params(100).max_tokens == 3  # max_completion_tokens wins
    assert P.ChatCompletionRequest(model="m", messages=msgs).to_sampling_params(100).max_tokens == 100


def test_logit_bias_keys_must_be_ids():
    with pytest.raises(ParamError) as e:
        P.CompletionRequest(model="m", prompt="x", logit_bias={"the": 1}).to_sampling_params()
    assert e.value.param == "logit_bias"


def test_delta_drops_nulls():
    assert P.DeltaMessage().model_dump() == {}
    assert P.DeltaMessage(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}


def test_token_strings_are_unique_even_for_partial_utf8():
    """lm-eval keys top_logprobs by token string: two tokens holding different parts of UTF-8
    characters must not collapse into one U+FFFD key."""
    tok = Tokenizer.default()
    tt = TokenText(tok)
    partial = [i for i in range(tok.vocab_size) if tok.token_str(i) == "\ufffd"][:50]
    assert len(partial) > 2
    strs = [tt.str(i) for i in partial]
    assert len(set(strs)) == len(strs) and all(s.startswith("bytes:\\x") for s in strs)
    top = tt.top_dict([(partial[0], -1.0), (partial[1], -2.0)])
    assert list(top.values()) == [-1.0, -2.0]
    all_strs = [tt.str(i) for i in range(tok.vocab_size)]
    assert len(set(all_strs)) == tok.vocab_size


def test_logprob_values_are_json_safe():
    assert _lp(-math.inf) == P.LOGPROB_FLOOR and _lp(math.nan) == P.LOGPROB_FLOOR and _lp(-1.5) == -1.5
    assert _nchars("é".encode()) == 1 and _nchars(b"\xa9") == 0 and _nchars(b"ab") == 2


def test_param_paths():
    assert _loc(("body", "messages", 0, "role")) == "messages[0].role"
    assert _loc(("body", "temperature")) == "temperature"
    assert _loc(("body",)) is None


def test_cli_flags_override_environment(monkeypatch):
    monkeypatch.setenv("GPT2SERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("GPT2SERVE_PORT", "9999")
    args = parser().parse_args(["--model", "random:gpt2", "--port", "8123", "--no-auth", "--max-queue", "3",
                                "--kv-cache-memory", "1GiB", "--database-url", "sqlite:///x.db"])
    s = settings_from_args(args)
    assert (s.model, s.port, s.auth, s.max_queue, s.max_num_seqs) == ("random:gpt2", 8123, False, 3, 7)
    assert s.kv_cache_memory == "1GiB" and s.database_url == "sqlite:///x.db"
    assert settings_from_args(parser().parse_args([])).auth is True


def test_cli_rejects_a_negative_prefill_first_budget(capsys):
    from gpt2serve.api.cli import main

    assert settings_from_args(parser().parse_args(["--prefill-first-tokens", "0"])).prefill_first_tokens == 0
    assert main(["--prefill-first-tokens", "-1"]) == 2  # before loading anything
    assert "prefill_first_tokens" in capsys.readouterr().err
