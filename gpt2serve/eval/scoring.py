"""Scoring backends: one small interface, three implementations.

    Scorer.score(requests: list[(context_ids, continuation_ids)]) -> list[Score]
    Score = (logprob_sum, all_greedy, token_logprobs)   # over the continuation tokens only

- `EngineScorer`: our engine in process (`gpt2serve.engine.LLM`, prompt_logprobs=1, max_tokens=0).
- `ApiScorer`: any OpenAI-compatible `/v1/completions` (token-id prompts, echo + logprobs), so a
  hosted deployment, ours or another provider's, is measured by the same task code.
- `TransformersScorer`: Hugging Face `transformers` directly; a reference backend (`--backend hf`).

Every request must fit the model's context: len(context) + len(continuation) <= max_length and
len(context) >= 1 (the first continuation token needs something to be predicted from). The tasks
guarantee it (sliding windows, left truncation); the scorers check it.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple, Protocol

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


class Score(NamedTuple):
    logprob_sum: float  # natural log, summed over the continuation tokens
    all_greedy: bool  # every continuation token was the argmax given what precedes it
    token_logprobs: list[float]  # one per continuation token


class Scorer(Protocol):
    max_length: int  # tokens the model sees at once (GPT-2: 1024)

    def score(self, requests: Sequence[Request]) -> list[Score]: ...

    def close(self) -> None: ...


def check_request(req: Request, max_length: int) -> None:
    ctx, cont = req
    if not ctx or not cont or len(ctx) + len(cont) > max_length:
        raise ValueError(
            f"scoring request must have 1+ context and 1+ continuation tokens and fit {max_length} tokens; "
            f"got {len(ctx)} + {len(cont)}"
        )


def get_tokenizer():
    """GPT-2 BPE: `encode(text) -> ids` with no special tokens parsed, `eos_token_id` 50256.

    Ours when the model package has it; else tiktoken's GPT-2 encoding built from the vocab files
    shipped with the package (identical ids, no download)."""
    try:
        from gpt2serve.model.tokenizer import Tokenizer

        return Tokenizer.default()
    except (ImportError, AttributeError):  # model package without its tokenizer: same ids from tiktoken
        pass
    return _TiktokenGPT2()


class _TiktokenGPT2:
    eos_token_id = 50256

    def __init__(self):
        from pathlib import Path

        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        assets = Path(__file__).resolve().parent.parent / "model" / "assets" / "gpt2"
        ranks = data_gym_to_mergeable_bpe_ranks(str(assets / "merges.txt"), str(assets / "vocab.json"))
        self._enc = tiktoken.Encoding(
            "gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
        )

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")


# ---------------------------------------------------------------------------------------------
# in process, through our engine


class EngineScorer:
    """`gpt2serve.engine.LLM`: each request is one prompt (context + continuation) with
    SamplingParams(max_tokens=0, prompt_logprobs=1); the engine batches them."""

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", **engine_config):
        from gpt2serve.engine import LLM

        self.llm = LLM(model=model, dtype=dtype, device=device, **engine_config)
        self.tokenizer = self.llm.tokenizer
        self.max_length = _n_positions(self.llm)
        self.shape = _shape(self.llm)

    def score(self, requests: Sequence[Request]) -> list[Score]:
        from gpt2serve.engine.sampling import SamplingParams

        for r in requests:
            check_request(r, self.max_length)
        params = SamplingParams(max_tokens=0, prompt_logprobs=1)
        outs = self.llm.generate([list(c) + list(k) for c, k in requests], params, progress=False)
        scores = []
        for (ctx, cont), out in zip(requests, outs, strict=True):
            plps = out.prompt_logprobs
            if plps is None or len(plps) != len(ctx) + len(cont):
                raise RuntimeError(f"engine returned {None if plps is None else len(plps)} prompt logprobs "
                                   f"for a {len(ctx) + len(cont)}-token prompt")
            tail = plps[len(ctx):]
            lps = [t.logprob for t in tail]
            # greedy: the token is the top-1 (ties count as greedy: its logprob equals the best)
            greedy = all(t.top and (t.top[0][0] == t.token_id or t.logprob >= t.top[0][1]) for t in tail)
            scores.append(Score(math.fsum(lps), greedy, lps))
        return scores

    def close(self) -> None:
        for name in ("shutdown", "close"):
            if hasattr(self.llm, name):
                getattr(self.llm, name)()
                return


def _n_positions(llm) -> int:
    for path in ("loaded.config.n_positions", "model_config.n_positions", "config.n_positions",
                 "engine.loaded.config.n_positions", "max_model_len"):
        obj = llm
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
            return int(obj)
        except AttributeError:
            continue
    return 1024


def _shape(llm) -> tuple[int, int] | None:
    for path in ("loaded.config", "config", "engine.loaded.config"):
        obj = llm
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
            return int(obj.n_layer), int(obj.n_embd)
        except AttributeError:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# transformers, directly (reference backend)


class TransformersScorer:
    """`transformers.GPT2LMHeadModel` with right-padded batches; the LM head runs only on the
    positions that predict continuation tokens (a 1024x50257 logit matrix per row is 200 MB)."""

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", batch_size: int = 8):
        import torch
        from transformers import GPT2LMHeadModel

        self.torch = torch
        self.device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = GPT2LMHeadModel.from_pretrained(model, torch_dtype=getattr(torch, dtype)).to(self.device).eval()
        self.max_length = int(self.model.config.n_positions)
        self.shape = (int(self.model.config.n_layer), int(self.model.config.n_embd))
        self.batch_size = batch_size

    def score(self, requests: Sequence[Request]) -> list[Score]:
        torch = self.torch
        for r in requests:
            check_request(r, self.max_length)
        order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
        out: list[Score | None] = [None] * len(requests)
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                seqs = [list(requests[i][0]) + list(requests[i][1]) for i in idx]
                T = max(map(len, seqs))
                ids = torch.zeros(len(seqs), T, dtype=torch.long)  # (B, T), right-padded
                mask = torch.zeros(len(seqs), T, dtype=torch.long)
                for r, s in enumerate(seqs):
                    ids[r, : len(s)] = torch.tensor(s)
                    mask[r, : len(s)] = 1
                h = self.model.transformer(ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
                for r, i in enumerate(idx):
                    ctx, cont = requests[i]
                    a, n = len(ctx), len(cont)
                    logits = self.model.lm_head(h[r, a - 1 : a - 1 + n]).float()  # (n, V): predicts cont
                    logp = torch.log_softmax(logits, dim=-1)
                    tgt = torch.tensor(cont, device=logp.device)
                    lps = logp.gather(1, tgt[:, None])[:, 0]
                    greedy = bool((lps >= logp.max(dim=-1).values).all())
                    vals = lps.double().tolist()
                    out[i] = Score(math.fsum(vals), greedy, vals)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# any OpenAI-compatible /v1/completions


class ApiError(RuntimeError):
    pass


class ApiScorer:
    """POST /v1/completions {"prompt": [[ids], ...], "echo": true, "logprobs": 1, "max_tokens": 0}.

    `token_logprobs[i]` is the logprob of prompt token i (None for the first); greedy is read from
    `top_logprobs[i]` by value (its keys are token *strings*, which can collide for byte tokens):
    the token is greedy when its logprob is >= the best alternative's (1e-6 slack for JSON round
    trips of float32). Servers that refuse max_tokens 0 get max_tokens 1 and the generated token
    is ignored. `prompts_per_request` prompts go in one HTTP request; `concurrency` requests are
    in flight at once; 429/5xx are retried with backoff (Retry-After honoured).
    """

    def __init__(self, url: str, model: str | None, api_key: str | None = None, max_length: int = 1024,
                 prompts_per_request: int = 8, concurrency: int = 4, timeout: float = 600.0, retries: int = 5,
                 transport=None):
        import httpx

        base = url.rstrip("/")
        if base.endswith("/completions"):
            self.endpoint = base
        elif base.endswith("/v1"):
            self.endpoint = base + "/completions"
        else:
            self.endpoint = base + "/v1/completions"
        key = api_key or os.environ.get("GPT2SERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout, transport=transport)
        self.model = model or self._served_model()
        self.max_length = max_length
        self.shape = None
        self.prompts_per_request = prompts_per_request
        self.concurrency = concurrency
        self.retries = retries
        self.max_tokens = 0  # becomes 1 if the server refuses 0
        self.pool = cf.ThreadPoolExecutor(max_workers=concurrency)

    def _served_model(self) -> str:
        """The first id of GET /v1/models, when no model name is given."""
        url = self.endpoint.rsplit("/completions", 1)[0] + "/models"
        r = self.client.get(url)
        if r.status_code != 200 or not r.json().get("data"):
            raise ApiError(f"no --model given and {url} answered {r.status_code}: {r.text[:300]}")
        return r.json()["data"][0]["id"]

    def _post(self, prompts: list[list[int]]) -> dict:
        for attempt in range(self.retries + 1):
            body = {"model": self.model, "prompt": prompts, "echo": True, "logprobs": 1,
                    "max_tokens": self.max_tokens, "temperature": 0}
            r = self.client.post(self.endpoint, json=body)
            if r.status_code == 200:
                return r.json()
            if r.status_code == 400 and self.max_tokens == 0 and "max_tokens" in r.text:
                self.max_tokens = 1
                continue
            if (r.status_code == 429 or r.status_code >= 500) and attempt < self.retries:
                wait = r.headers.get("retry-after")
                time.sleep(float(wait) if wait and wait.replace(".", "", 1).isdigit() else min(2.0**attempt, 30.0))
                continue
            raise ApiError(f"{self.endpoint} answered {r.status_code}: {r.text[:500]}")
        raise ApiError(f"{self.endpoint}: gave up after {self.retries} retries")

    def _score_batch(self, requests: Sequence[Request]) -> list[Score]:
        prompts = [list(c) + list(k) for c, k in requests]
        data = self._post(prompts)
        choices = sorted(data["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise ApiError(f"{len(choices)} choices for {len(prompts)} prompts")
        scores = []
        for (ctx, cont), ch in zip(requests, choices, strict=True):
            lp = ch.get("logprobs") or {}
            tlp, top = lp.get("token_logprobs"), lp.get("top_logprobs")
            n = len(ctx) + len(cont)
            if tlp is None or len(tlp) < n or (self.max_tokens == 0 and len(tlp) != n):
                raise ApiError(f"expected {n} echoed token logprobs, got {None if tlp is None else len(tlp)}; "
                               "does the server support echo with logprobs on token-id prompts?")
            lps = [float(x) for x in tlp[len(ctx) : n]]
            greedy = True
            for j in range(len(ctx), n):
                alts = top[j] if top else None
                if not alts:
                    raise ApiError("top_logprobs missing for a prompt token")
                if float(tlp[j]) < max(alts.values()) - 1e-6:
                    greedy = False
            scores.append(Score(math.fsum(lps), greedy, lps))
        return scores

    def score(self, requests: Sequence[Request]) -> list[Score]:
        for r in requests:
            check_request(r, self.max_length)
        k = self.prompts_per_request
        batches = [requests[i : i + k] for i in range(0, len(requests), k)]
        return [s for batch in self.pool.map(self._score_batch, batches) for s in batch]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


# ---------------------------------------------------------------------------------------------


def run_requests(scorer: Scorer, requests: Sequence[Request], batch_size: int = 32, desc: str = "",
                 progress: bool = True) -> tuple[list[Score], dict]:
    """Score all requests in chunks of `batch_size`, with a tqdm bar (stderr) counting tokens."""
    from tqdm import tqdm

    total = sum(len(c) + len(k) for c, k in requests)
    scores: list[Score] = []
    t0 = time.perf_counter()
    with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for i in range(0, len(requests), batch_size):
            chunk = requests[i : i + batch_size]
            scores.extend(scorer.score(chunk))
            bar.update(sum(len(c) + len(k) for c, k in chunk))
    dt = time.perf_counter() - t0
    return scores, {"requests": len(requests), "tokens_processed": total, "seconds": round(dt, 3),
                    "tokens_per_s": round(total / dt, 1) if dt > 0 else None}
