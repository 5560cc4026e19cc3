"""Scheduler output -> tensors -> one model step -> sampled tokens and logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gpt2serve.engine.outputs import TokenLogprob
from gpt2serve.engine.request import Sequence
from gpt2serve.engine.sampler import SampleResult, prompt_logprobs, sample
from gpt2serve.engine.scheduler import Chunk
from gpt2serve.model.gpt2 import AttentionMetadata, GPT2LMHeadModel, KVCache


@dataclass
class StepResult:
    sampled: dict[int, tuple[int, float | None, list[tuple[int, float]] | None]] = field(default_factory=dict)
    # seq_id -> (token, raw logprob or None, top list or None)
    prompt_lps: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # seq_id -> entries of this chunk


class ModelRunner:
    def __init__(self, model: GPT2LMHeadModel, cache: KVCache, eos_token_id: int):
        self.model = model
        self.cache = cache
        self.bs = cache.block_size
        self.eos = eos_token_id
        self.device = next(model.parameters()).device
        self.kernels = getattr(model, "kernels", None)  # set by prepare_for_serving, before the runner exists

    def _slots(self, blocks: list[int], start: int, end: int) -> list[int]:
        bs = self.bs
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], sample_seqs: list[tuple[Sequence, int]], plp_chunks: list[int]) -> StepResult:
        """chunks: decode chunks first. sample_seqs: (sequence, index of the chunk whose last row it
        samples from); forked sequences share their parent's row. plp_chunks: indices of chunks
        whose prompt logprobs are wanted."""
        dev, bs = self.device, self.bs
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        num_decode = 0
        dec_lens: list[int] = []
        dec_blocks: list[list[int]] = []
        prefills = []
        row_end: list[int] = []
        for c in chunks:
            s, a = c.seq, c.seq.num_computed
            b = a + c.num_tokens
            start = len(ids)
            ids.extend(s.token_ids[a:b])
            pos.extend(range(a, b))
            slots.extend(self._slots(s.blocks, a, b))
            if not s.in_prefill:  # decode: one token
                num_decode += 1
                dec_lens.append(b)
                dec_blocks.append(s.blocks)
            elif a == 0:
                prefills.append((start, start + c.num_tokens, None, None))
            else:  # a continuation chunk attends to the cached context too
                ctx = torch.tensor(self._slots(s.blocks, 0, b), device=dev)
                q_pos = torch.arange(a, b, device=dev)[:, None]
                mask = torch.arange(b, device=dev)[None, :] <= q_pos  # (T, L)
                prefills.append((start, start + c.num_tokens, ctx, mask))
            row_end.append(len(ids))

        dec_gather = dec_mask = None
        if num_decode:
            L = max(dec_lens)
            nb = -(-L // bs)
            bt = torch.tensor([blk[:nb] + [0] * (nb - len(blk[:nb])) for blk in dec_blocks], device=dev)  # (B, nb)
            p = torch.arange(L, device=dev)
            dec_gather = bt[:, p // bs] * bs + p % bs  # (B, L) flat cache slots
            if min(dec_lens) < L:
                dec_mask = (p[None, :] < torch.tensor(dec_lens, device=dev)[:, None])[:, None, None, :]  # (B, 1, 1, L)
        meta = AttentionMetadata(
            num_decode=num_decode,
            slot_mapping=torch.tensor(slots, device=dev),
            decode_gather=dec_gather,
            decode_mask=dec_mask,
            prefills=prefills,
            decode_lens=torch.tensor(dec_lens, device=dev) if num_decode else None,
        )
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), self.cache, meta)  # (N, C)

        result = StepResult()
        if sample_seqs:
            rows = torch.tensor([row_end[ci] - 1 for _, ci in sample_seqs], device=dev)
            logits = self.model.logits(hidden[rows])  # (M, V) fp32
            seqs = [s for s, _ in sample_seqs]
            r: SampleResult = sample(logits, seqs, self.eos, self.kernels)
            for j, s in enumerate(seqs):
                result.sampled[s.seq_id] = (
                    r.token_ids[j],
                    r.logprobs[j] if r.logprobs is not None else None,
                    r.top[j] if r.top is not None else None,
                )
        for ci in plp_chunks:
            c = chunks[ci]
            s, a = c.seq, c.seq.num_computed
            b = min(a + c.num_tokens, s.num_prompt - 1)  # the last prompt row predicts the first output
            if b <= a:
                continue
            start = row_end[ci] - c.num_tokens
            logits = self.model.logits(hidden[start : start + (b - a)])  # (T, V)
            result.prompt_lps[s.seq_id] = prompt_logprobs(logits, s.token_ids[a + 1 : b + 1], s.request.params.prompt_logprobs or 0)
        return result
