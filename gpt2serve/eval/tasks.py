"""The zero-shot tasks of the GPT-2 paper's Table 3: requests to score, and metrics from the scores.

Each task turns its data file into `(context_ids, continuation_ids)` requests (see scoring.py) and
a `finish(scores) -> metrics` function. Methods and the choices where the paper is vague are in
METHODS.md next to this file; the short version:

- Perplexity tasks (wikitext2, wikitext103, ptb, 1bw; enwik8, text8): the whole test file is one
  token stream, de-tokenized (detokenize.py), BPE-encoded, preceded by <|endoftext|>, and scored
  with sliding windows of `window` (1024) tokens advancing by `stride` (default window // 2 = 512):
  every token is scored exactly once, with at least `stride` tokens of context once that many
  precede it. Total NLL (nats) is normalised by the ORIGINAL units: words + one <eos> per line
  (ppl = exp(nll / words)), bytes (enwik8 bpb = nll / ln 2 / bytes), characters (text8 bpc).
- lambada: context = text up to the last space, target = " " + last word; acc = all target tokens
  are the argmax (the whole word predicted greedily); ppl = exp(-mean over examples of the target
  word's summed logprob), lm-eval's `lambada_openai` definition (per word, not per BPE token;
  `ppl_token` is reported too).
- cbt-cn / cbt-ne: for each of the 10 candidates, score candidate + rest of the query sentence
  given the 20 story sentences and the query up to the blank; predict the highest total logprob.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpt2serve.eval import data, detokenize
from gpt2serve.eval.scoring import Request, Score

EOT = 50256


@dataclass
class Prepared:
    requests: list[Request]
    finish: Callable[[list[Score]], dict[str, float]]
    info: dict = field(default_factory=dict)  # sizes of the data actually used


def encode_pair(tok, context: str, continuation: str) -> Request:
    """Tokens of context and continuation, split where the BPE of the *whole* string splits (as
    lm-evaluation-harness does): trailing spaces of the context move to the continuation."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    if whole[: len(ctx)] != ctx:  # BPE merged across the boundary; keep the whole-string tokens
        k = 0
        while k < min(len(ctx), len(whole)) and ctx[k] == whole[k]:
            k += 1
        ctx = whole[:k]
    return ctx, whole[len(ctx) :]


def left_truncate(req: Request, max_length: int) -> Request:
    ctx, cont = req
    keep = max_length - len(cont)
    if keep < 1:
        raise ValueError(f"continuation of {len(cont)} tokens does not fit a {max_length}-token window")
    return ctx[-keep:], cont


def rolling_windows(ids: list[int], window: int, stride: int, prefix: int = EOT) -> list[Request]:
    """Requests that score every token of `ids` once, in order.

    The stream is [prefix] + ids. The first request scores tokens 1..window-1 given the prefix;
    each next one scores the next `stride` tokens given the up-to-(window - stride) tokens before
    them, so the window always ends at the last scored token and spans `window` tokens where it can.
    """
    if not 0 < stride < window:
        raise ValueError(f"stride must be in (0, {window}), got {stride}")
    stream = [prefix] + list(ids)
    reqs: list[Request] = []
    a, b = 1, min(window, len(stream))
    while a < len(stream):
        reqs.append((stream[max(0, b - window) : a], stream[a:b]))
        a, b = b, min(b + stride, len(stream))
    return reqs


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerplexityTask:
    name: str
    unit: str  # "word" -> ppl, "byte" -> bpb, "char" -> bpc
    detokenizer: Callable[[str], str] = detokenize.identity

    @property
    def metric(self) -> str:
        return {"word": "ppl", "byte": "bpb", "char": "bpc"}[self.unit]

    def read(self, path: Path, limit: int | None) -> str:
        if self.name == "enwik8":
            return data.read_enwik8_test(path, limit)
        if self.name == "text8":
            return data.read_text8_test(path, limit)
        return data.read_lines(path, limit)

    def prepare(self, path: Path, tok, limit: int | None, window: int, stride: int) -> Prepared:
        original = self.read(path, limit)
        text = self.detokenizer(original)
        ids = tok.encode(text)
        if self.unit == "word":
            units = detokenize.count_words(original)
        elif self.unit == "byte":
            units = len(original.encode("utf-8"))
        else:
            units = len(original)
        reqs = rolling_windows(ids, window, stride)
        info = {"bpe_tokens": len(ids), {"word": "words", "byte": "bytes", "char": "chars"}[self.unit]: units,
                "window": window, "stride": stride}

        def finish(scores: list[Score]) -> dict[str, float]:
            nll = -math.fsum(s.logprob_sum for s in scores)
            out = {"nll": nll, "ppl_token": math.exp(nll / len(ids))}
            if self.unit == "word":
                out["ppl"] = math.exp(nll / units)
            else:
                out[self.metric] = nll / math.log(2) / units
            return out

        return Prepared(reqs, finish, info)


@dataclass(frozen=True)
class LambadaTask:
    name: str = "lambada"

    @staticmethod
    def split(text: str) -> tuple[str, str]:
        ctx, word = text.rsplit(" ", 1)
        return ctx, " " + word

    def prepare(self, path: Path, tok, limit: int | None, window: int, stride: int) -> Prepared:
        texts = data.read_lambada(path, limit)
        reqs = [left_truncate(encode_pair(tok, *self.split(t)), window) for t in texts]

        def finish(scores: list[Score]) -> dict[str, float]:
            lp = [s.logprob_sum for s in scores]
            n_tok = sum(len(s.token_logprobs) for s in scores)
            return {
                "acc": 100.0 * sum(s.all_greedy for s in scores) / len(scores),
                "ppl": math.exp(-math.fsum(lp) / len(lp)),
                "ppl_token": math.exp(-math.fsum(lp) / n_tok),
            }

        return Prepared(reqs, finish, {"examples": len(texts)})


@dataclass(frozen=True)
class CBTTask:
    name: str  # cbt-cn | cbt-ne

    @staticmethod
    def pair_texts(ex: data.CBTExample, candidate: str) -> tuple[str, str]:
        # De-tokenize the whole story + query with the blank still in it, so spacing around the
        # blank is decided once for all candidates; then split at the blank.
        full = detokenize.cbt(" ".join(ex.context + [ex.query]))
        pre, _, post = full.partition("XXXXX")
        return pre, candidate + post

    def prepare(self, path: Path, tok, limit: int | None, window: int, stride: int) -> Prepared:
        examples = data.read_cbt(path, limit)
        reqs: list[Request] = []
        for ex in examples:
            for cand in ex.candidates:
                reqs.append(left_truncate(encode_pair(tok, *self.pair_texts(ex, cand)), window))

        def finish(scores: list[Score]) -> dict[str, float]:
            correct, i = 0, 0
            for ex in examples:
                lps = [s.logprob_sum for s in scores[i : i + len(ex.candidates)]]
                i += len(ex.candidates)
                correct += ex.candidates[max(range(len(lps)), key=lps.__getitem__)] == ex.answer
            return {"acc": 100.0 * correct / len(examples)}

        return Prepared(reqs, finish, {"examples": len(examples)})


TASKS = {
    "lambada": LambadaTask(),
    "cbt-cn": CBTTask("cbt-cn"),
    "cbt-ne": CBTTask("cbt-ne"),
    "wikitext2": PerplexityTask("wikitext2", "word", detokenize.wikitext),
    "ptb": PerplexityTask("ptb", "word", detokenize.ptb),
    "enwik8": PerplexityTask("enwik8", "byte"),
    "text8": PerplexityTask("text8", "char"),
    "wikitext103": PerplexityTask("wikitext103", "word", detokenize.wikitext),
    "1bw": PerplexityTask("1bw", "word", detokenize.one_billion_word),
}
