"""Continuous batching: which tokens of which sequences go into the next forward step (no torch).

Contract: the engine calls `schedule()` once per step; it returns the chunks to compute, decode
sequences (one token each) first, then prefill chunks. There is no separate prefill phase: each
sequence's computed-token count catches up with its length, a prompt longer than the step's token
budget is simply computed over several steps (chunked prefill), and new requests are admitted at
every step while running ones decode.

Short prompts first: when the prompt tokens waiting are few (<= prefill_first_tokens), the step
computes only them and the running sequences skip that one step. A new request's first token then
costs one short prefill step instead of a step holding every running sequence's decode as well,
which at 32 streams is what time to first token is made of; the decodes lose one short step. Never
two such steps in a row, so a steady flow of arrivals cannot stall the decodes, and longer prompt
work goes into mixed, chunked steps as before (a long prefill-only step would stall them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from gpt2serve.engine.kv_cache import BlockAllocator
from gpt2serve.engine.request import Request, Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step (decode tokens + prefill chunks)
    prefill_first_tokens: int = 256  # pending prompt tokens up to which a step is prompts only; 0: never


@dataclass
class Chunk:
    seq: Sequence
    num_tokens: int  # tokens of seq computed in this step, from seq.num_computed

    @property
    def completes_prompt(self) -> bool:
        return self.seq.in_prefill and self.seq.num_computed + self.num_tokens == self.seq.num_prompt


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self._last_prefill_only = False

    # -- admission ---------------------------------------------------------------------------

    def blocks_needed(self, req: Request) -> tuple[int, int]:
        """(blocks of the first sequence, blocks reserved for the others): the worst case."""
        bs = self.allocator.block_size
        total = len(req.prompt_token_ids) + max(req.params.max_tokens, 1)
        first = self.allocator.blocks_for(total)
        shared = len(req.prompt_token_ids) // bs  # full prompt blocks, shared by forks
        return first, (req.params.num_sequences - 1) * (first - shared)

    def can_ever_fit(self, req: Request) -> bool:
        first, rest = self.blocks_needed(req)
        return first + rest <= self.allocator.num_blocks and req.params.num_sequences <= self.config.max_num_seqs

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def _try_admit(self, req: Request) -> Sequence | None:
        if len(self.running) + req.params.num_sequences > self.config.max_num_seqs:
            return None
        first, rest = self.blocks_needed(req)
        if first + rest > self.allocator.num_free:
            return None
        seq = req.seqs[0]
        seq.blocks = self.allocator.allocate(first)
        req.reserve_blocks = self.allocator.allocate(rest)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return seq

    # -- the step ----------------------------------------------------------------------------

    def _pending_prompt_tokens(self, limit: int) -> int:
        """Prompt tokens not yet computed (running and waiting), counted up to just past limit."""
        n = 0
        for s in self.running:
            if s.in_prefill:
                n += s.num_prompt - s.num_computed
        for req in self.waiting:
            if n > limit:
                break
            if not req.aborted:
                n += len(req.prompt_token_ids)
        return n

    def schedule(self) -> list[Chunk]:
        budget = self.config.max_num_batched_tokens
        decode = [Chunk(s, 1) for s in self.running if not s.in_prefill]
        first = min(self.config.prefill_first_tokens, budget)  # all of it must fit in this one step
        prefill_only = bool(decode) and not self._last_prefill_only and first > 0 \
            and 0 < self._pending_prompt_tokens(first) <= first
        if not prefill_only:
            budget -= len(decode)
        prefill: list[Chunk] = []
        for s in self.running:
            if s.in_prefill and budget > 0:
                n = min(s.num_prompt - s.num_computed, budget)
                prefill.append(Chunk(s, n))
                budget -= n
        # admit in arrival order; stop at the first that does not fit (no overtaking, no starvation)
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if req.aborted:
                self.waiting.popleft()
                continue
            seq = self._try_admit(req)
            if seq is None:
                break
            self.waiting.popleft()
            n = min(seq.num_prompt, budget)
            prefill.append(Chunk(seq, n))
            budget -= n
        self._last_prefill_only = prefill_only and bool(prefill)
        if self._last_prefill_only:
            return prefill  # the decodes wait this one short step
        return decode + prefill  # (a prefill-only step that admitted nothing spent no budget)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give a forked child of parent's request its blocks once the prompt is cached.

        Returns (src_block, dst_block) when the partial last prompt block must be copied, else None.
        """
        req = parent.request
        bs = self.allocator.block_size
        shared = parent.num_prompt // bs
        own = len(parent.blocks) - shared
        mine = req.reserve_blocks[:own]  # handed over: the child frees them, the request no longer does
        del req.reserve_blocks[:own]
        child.blocks = self.allocator.share(parent.blocks[:shared]) + mine
        child.num_computed = parent.num_computed
        child.status = Status.RUNNING
        self.running.append(child)
        if parent.num_prompt % bs and own:
            return parent.blocks[shared], mine[0]
        return None

    def release(self, seq: Sequence) -> None:
        """Free a finished sequence's blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []

    def release_request(self, req: Request) -> None:
        """Free everything a request holds (abort, or a request that ends before forking)."""
        if req in self.waiting:
            self.waiting.remove(req)
        for s in req.seqs:
            self.release(s)
        if req.reserve_blocks:
            self.allocator.free(req.reserve_blocks)
            req.reserve_blocks = []

    @property
    def num_running_requests(self) -> int:
        return len({id(s.request) for s in self.running})
