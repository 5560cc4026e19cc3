"""Sampling, vectorised over the batch: one set of tensor ops per step, whatever the batch size.

Order of operations (as OpenAI/vLLM): raw log-softmax for logprobs first (untouched by anything
below), then logit_bias, min_tokens suppression, repetition/presence/frequency penalties, then
greedy argmax or temperature -> top-k -> min-p -> top-p -> a draw.

The draw is argmax(logits + Gumbel noise) (the Gumbel-max trick, equivalent to sampling from the
softmax). Seeded sequences take their noise from their own torch.Generator, so a seeded request gives
the same tokens whatever else shares the batch; unseeded rows share one batched draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2serve.engine.outputs import TokenLogprob
from gpt2serve.engine.request import Sequence

NEG_INF = float("-inf")


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # raw logprob of each chosen token (when any row needs it)
    top: list[list[tuple[int, float]]] | None  # per row, its requested top-k (raw logprobs)


def seed_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    # distinct, reproducible streams for the n sequences of one seeded request
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator(device=device).manual_seed(mixed)


def top_logprobs(lp_row_values: torch.Tensor, lp_row_ids: torch.Tensor, k: int) -> list[tuple[int, float]]:
    return list(zip(lp_row_ids[:k].tolist(), lp_row_values[:k].tolist()))


def _argmax(x: torch.Tensor, ops=None) -> torch.Tensor:
    """Index of each row's maximum, the first on ties (as argmax). With the kernels (`ops`, CPU
    logits) their argmax_rows: torch's max(dim).indices took 0.8-0.9 ms for 32 rows of 50,257 on
    AMD Zen 4, 2-3% of a batch-32 step. Without them max's indices: torch's CPU argmax is 2.8x
    slower still (32 rows: 1.13 vs 0.40 ms on an Intel Xeon)."""
    if ops is not None and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        return ops.argmax_rows(x.contiguous())
    return x.max(dim=-1).indices


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_id: int, ops=None) -> SampleResult:
    """logits: (M, V) float32, one row per sequence in `seqs` (modified in place). ops: the kernels'
    namespace (gpt2serve.kernels.gemv()) where the model runs them, for the argmax."""
    M, V = logits.shape
    dev = logits.device
    params = [s.request.params for s in seqs]

    want_lp = any(p.logprobs is not None or p.num_sequences > 1 for p in params)
    raw_lp = torch.log_softmax(logits, dim=-1) if want_lp else None  # (M, V)

    # -- logit_bias ------------------------------------------------------------------------------
    if any(p.logit_bias for p in params):
        rows, toks, vals = [], [], []
        for i, p in enumerate(params):
            for t, b in p.logit_bias.items():
                rows.append(i), toks.append(t), vals.append(b)
        logits.index_put_(
            (torch.tensor(rows, device=dev), torch.tensor(toks, device=dev)),
            torch.tensor(vals, dtype=logits.dtype, device=dev),
            accumulate=True,
        )

    # -- min_tokens: no EOS / stop token before the minimum ----------------------------------------
    rows, toks = [], []
    for i, (s, p) in enumerate(zip(seqs, params)):
        if s.num_output < p.min_tokens:
            for t in [eos_token_id, *p.stop_token_ids]:
                rows.append(i), toks.append(t)
    if rows:
        logits[torch.tensor(rows, device=dev), torch.tensor(toks, device=dev)] = NEG_INF

    # -- penalties ---------------------------------------------------------------------------------
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        # HF/CTRL: seen tokens (prompt + output) have positive logits divided, negative multiplied
        seen = torch.zeros(len(rep), V, dtype=torch.bool, device=dev)
        for j, i in enumerate(rep):
            seen[j, torch.tensor(seqs[i].token_ids, device=dev)] = True
        r = torch.tensor(rep, device=dev)
        pen = torch.tensor([params[i].repetition_penalty for i in rep], device=dev)[:, None]
        sub = logits[r]
        sub = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
        logits[r] = sub
    pf = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    if pf:
        counts = torch.zeros(len(pf), V, device=dev)
        for j, i in enumerate(pf):
            out = seqs[i].output_ids
            if out:
                counts[j].index_add_(0, torch.tensor(out, device=dev), torch.ones(len(out), device=dev))
        r = torch.tensor(pf, device=dev)
        fp = torch.tensor([params[i].frequency_penalty for i in pf], device=dev)[:, None]
        pp = torch.tensor([params[i].presence_penalty for i in pf], device=dev)[:, None]
        logits[r] -= fp * counts + pp * (counts > 0).float()

    # -- choose ------------------------------------------------------------------------------------
    greedy = [p.temperature == 0.0 for p in params]
    if all(greedy):
        chosen = _argmax(logits, ops)
    else:
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
        scaled = logits / temps[:, None]
        top_k = [p.top_k if p.top_k > 0 else V for p in params]
        if min(top_k) < V:
            k = torch.tensor(top_k, device=dev)
            kth = scaled.topk(int(max(top_k)), dim=-1).values.gather(1, (k - 1)[:, None])  # (M, 1)
            scaled = scaled.masked_fill(scaled < kth, NEG_INF)
        min_p = [p.min_p for p in params]
        top_p = [p.top_p for p in params]
        if max(min_p) > 0 or min(top_p) < 1.0:
            probs = torch.softmax(scaled, dim=-1)
            if max(min_p) > 0:
                mp = torch.tensor(min_p, device=dev)[:, None]
                scaled = scaled.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, NEG_INF)
                probs = torch.softmax(scaled, dim=-1)
            if min(top_p) < 1.0:
                tp = torch.tensor(top_p, device=dev)[:, None]
                sp, order = probs.sort(dim=-1, descending=True)
                drop_sorted = (sp.cumsum(dim=-1) - sp) > tp  # keep the smallest prefix reaching top_p
                drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
                scaled = scaled.masked_fill(drop, NEG_INF)
        # Gumbel noise: -log(Exp(1))
        noise = torch.empty_like(scaled)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            if len(unseeded) == M:
                noise.exponential_()
            else:
                noise[torch.tensor(unseeded, device=dev)] = torch.empty(len(unseeded), V, device=dev).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                noise[i].exponential_(generator=s.generator)
        sampled = _argmax(scaled - noise.log(), ops)
        if any(greedy):
            chosen = torch.where(torch.tensor(greedy, device=dev), _argmax(logits, ops), sampled)
        else:
            chosen = sampled

    token_ids = chosen.tolist()
    if raw_lp is None:
        return SampleResult(token_ids, None, None)
    chosen_lp = raw_lp.gather(1, chosen[:, None]).squeeze(1).tolist()
    kmax = max((p.logprobs or 0) for p in params)
    top = None
    if kmax:
        tv, ti = raw_lp.topk(kmax, dim=-1)
        tv, ti = tv.tolist(), ti.tolist()
        top = [list(zip(ti[i][: p.logprobs or 0], tv[i][: p.logprobs or 0])) for i, p in enumerate(params)]
    return SampleResult(token_ids, chosen_lp, top)


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """Raw logprobs of each target token given the rows' contexts: logits (T, V), targets (T,)."""
    lp = torch.log_softmax(logits, dim=-1)
    t = torch.tensor(targets, device=logits.device)
    chosen = lp.gather(1, t[:, None]).squeeze(1).tolist()
    if k:
        tv, ti = lp.topk(k, dim=-1)
        tv, ti = tv.tolist(), ti.tolist()
        return [TokenLogprob(tok, c, list(zip(ti[j], tv[j]))) for j, (tok, c) in enumerate(zip(targets, chosen))]
    return [TokenLogprob(tok, c, []) for tok, c in zip(targets, chosen)]
