"""The scheduler and block accounting alone: no model, no tensors."""

from __future__ import annotations

import pytest

from gpt2serve.engine.kv_cache import BlockAllocator
from gpt2serve.engine.request import Request, Sequence, Status
from gpt2serve.engine.sampling import SamplingParams
from gpt2serve.engine.scheduler import Scheduler, SchedulerConfig


def make(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int = 4, n: int = 1) -> Request:
    req = Request(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, n=n, temperature=1.0))
    req.seqs.append(Sequence(hash(rid) & 0xFFFF, req, 0, list(req.prompt_token_ids)))
    sched.add(req)
    return req


def step_done(chunks):
    for c in chunks:
        c.seq.num_computed += c.num_tokens


def test_chunked_prefill_respects_token_budget_and_decodes_first():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10, prefill_first_tokens=0), BlockAllocator(64, 4))
    a = make(s, "a", 3)
    b = make(s, "b", 25)
    chunks = s.schedule()
    assert [(c.seq.request.request_id, c.num_tokens) for c in chunks] == [("a", 3), ("b", 7)]
    step_done(chunks)
    a.seqs[0].token_ids.append(1)  # a sampled its first token
    chunks = s.schedule()
    # a decodes (1 token, first), b continues its prompt with the rest of the budget
    assert [(c.seq.request.request_id, c.num_tokens) for c in chunks] == [("a", 1), ("b", 9)]
    assert not chunks[1].completes_prompt
    step_done(chunks)
    a.seqs[0].token_ids.append(1)
    chunks = s.schedule()
    assert [(c.seq.request.request_id, c.num_tokens) for c in chunks] == [("a", 1), ("b", 9)]
    assert chunks[1].completes_prompt


def test_short_new_prompts_get_a_step_of_their_own_but_never_two_in_a_row():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, prefill_first_tokens=8), BlockAllocator(64, 4))
    a = make(s, "a", 3)
    step_done(s.schedule())
    a.seqs[0].token_ids.append(1)  # a decodes from now on
    make(s, "b", 5)
    chunks = s.schedule()  # b's 5 prompt tokens <= 8: they go alone, a skips this step
    assert [(c.seq.request.request_id, c.num_tokens) for c in chunks] == [("b", 5)]
    step_done(chunks)
    s.running[1].token_ids.append(1)
    make(s, "c", 2)
    chunks = s.schedule()  # c is short too, but the last step was prompts only: mixed
    assert [(c.seq.request.request_id, c.num_tokens) for c in chunks] == [("a", 1), ("b", 1), ("c", 2)]
    step_done(chunks)
    for q in s.running:
        q.token_ids.append(1)
    make(s, "d", 6)
    make(s, "e", 6)
    chunks = s.schedule()  # 12 pending prompt tokens > 8: mixed, decodes first
    assert [(c.seq.request.request_id, c.num_tokens) for c in chunks] == [("a", 1), ("b", 1), ("c", 1), ("d", 6), ("e", 6)]
    step_done(chunks)
    for q in s.running:
        q.token_ids.append(1)
    chunks = s.schedule()  # nothing pending: plain decode
    assert [c.seq.request.request_id for c in chunks] == ["a", "b", "c", "d", "e"]
    # a waiting request that cannot be admitted (no free sequence slot) does not hold the decodes back
    s.config.max_num_seqs = 5
    step_done(chunks)
    for q in s.running:
        q.token_ids.append(1)
    make(s, "f", 2)
    chunks = s.schedule()
    assert [c.seq.request.request_id for c in chunks] == ["a", "b", "c", "d", "e"]


def test_admission_caps_running_sequences_and_is_first_come_first_served():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, prefill_first_tokens=0), BlockAllocator(64, 4))
    reqs = [make(s, f"r{i}", 2) for i in range(4)]
    chunks = s.schedule()
    assert {c.seq.request.request_id for c in chunks} == {"r0", "r1"}
    assert [r.request_id for r in s.waiting] == ["r2", "r3"]
    reqs[0].seqs[0].finish(Status.FINISHED_LENGTH)
    s.release(reqs[0].seqs[0])
    step_done(chunks)
    reqs[1].seqs[0].token_ids.append(0)
    chunks = s.schedule()
    assert [c.seq.request.request_id for c in chunks] == ["r1", "r2"]


def test_blocks_reserved_for_worst_case_and_returned():
    alloc = BlockAllocator(10, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), alloc)
    r1 = make(s, "a", 6, max_tokens=10)  # 16 tokens -> 4 blocks
    r2 = make(s, "b", 6, max_tokens=30)  # 36 tokens -> 9 blocks: must wait for a
    chunks = s.schedule()
    assert [c.seq.request.request_id for c in chunks] == ["a"]
    assert alloc.num_free == 6 and len(s.waiting) == 1
    r1.seqs[0].finish(Status.FINISHED_STOPPED)
    s.release_request(r1)
    assert alloc.num_free == 10
    step_done(chunks)
    assert [c.seq.request.request_id for c in s.schedule()] == ["b"]
    assert alloc.num_free == 1


def test_forks_share_full_prompt_blocks_and_copy_the_partial_one():
    alloc = BlockAllocator(32, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), alloc)
    req = make(s, "a", 10, max_tokens=6, n=3)  # 16 tokens: 4 blocks for the first; 2 shared full prompt blocks
    first, rest = s.blocks_needed(req)
    assert (first, rest) == (4, 2 * (4 - 2))
    chunks = s.schedule()
    step_done(chunks)
    parent = req.seqs[0]
    copies = []
    for k in (1, 2):
        child = Sequence(100 + k, req, k, list(req.prompt_token_ids))
        req.seqs.append(child)
        copies.append(s.fork(parent, child))
        assert child.blocks[:2] == parent.blocks[:2] and child.blocks[2:] != parent.blocks[2:]
        assert copies[-1] == (parent.blocks[2], child.blocks[2])  # the half-full third block is copied
    assert req.reserve_blocks == []
    assert alloc.num_free == 32 - 8
    for seq in req.seqs:
        seq.finish(Status.FINISHED_LENGTH)
        s.release(seq)
    s.release_request(req)
    assert alloc.num_free == 32


def test_unfittable_request_is_recognised():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, prefill_first_tokens=0), BlockAllocator(4, 4))
    big = Request("x", list(range(10)), SamplingParams(max_tokens=10))
    many = Request("y", [1], SamplingParams(max_tokens=1, n=3))
    ok = Request("z", [1, 2], SamplingParams(max_tokens=2))
    assert not s.can_ever_fit(big) and not s.can_ever_fit(many) and s.can_ever_fit(ok)


def test_double_free_is_a_loud_bug():
    a = BlockAllocator(4, 4)
    blocks = a.allocate(2)
    a.free(blocks)
    with pytest.raises(RuntimeError):
        a.free(blocks)
