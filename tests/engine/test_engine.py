"""The engine against transformers on the same tiny random weights: cache == recompute,
batched == sequential, chunked prefill, n/best_of forks, stop strings, logprobs, memory budget."""

from __future__ import annotations

import asyncio

import pytest
import torch

from gpt2serve.engine import LLM, AsyncEngine, ContextLengthExceeded, EngineConfig, EngineOverloaded, ParamError, SamplingParams

from .conftest import hf_logprobs

PROMPTS = [
    "Hello world, this is",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "A",
    "Once upon a time, in a land far away, there lived",
]


def greedy(max_tokens=24, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


@pytest.fixture()
def llm(tiny):
    return LLM(loaded=tiny, max_num_seqs=8, max_num_batched_tokens=256)


def test_greedy_equals_transformers_generate(tiny, hf_tiny, llm):
    ids = [tiny.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(ids, greedy())
    for p, o in zip(ids, outs):
        ref = hf_tiny.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
        assert o.outputs[0].token_ids == ref[0, len(p):].tolist()
        assert o.outputs[0].text == tiny.tokenizer.decode(o.outputs[0].token_ids)
        assert o.outputs[0].finish_reason == "length"


def test_cached_decode_equals_full_recomputation(tiny, hf_tiny, llm):
    p = tiny.tokenizer.encode(PROMPTS[3])
    out = llm.generate([p], greedy(max_tokens=30, logprobs=0))[0].outputs[0]
    full = hf_logprobs(hf_tiny, p + out.token_ids)  # one forward over everything, no cache
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == tok
        assert abs(lp.logprob - full[len(p) - 1 + i, tok].item()) < 1e-4


def test_batch_of_different_lengths_equals_one_by_one(tiny, llm):
    ids = [tiny.tokenizer.encode(p) for p in PROMPTS]
    batched = [o.outputs[0].token_ids for o in llm.generate(ids, greedy())]
    single = [llm.generate([p], greedy())[0].outputs[0].token_ids for p in ids]
    assert batched == single


def test_chunked_prefill_gives_the_same_prompt_logprobs(tiny, hf_tiny):
    p = tiny.tokenizer.encode(PROMPTS[1])
    assert len(p) > 40
    small = LLM(loaded=tiny, max_num_seqs=4, max_num_batched_tokens=16)  # the prompt takes several steps
    out = small.generate([p], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    ref = hf_logprobs(hf_tiny, p)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for i in range(1, len(p)):
        e = out.prompt_logprobs[i]
        assert e.token_id == p[i]
        assert abs(e.logprob - ref[i - 1, p[i]].item()) < 1e-4
        assert e.top[0][0] == int(ref[i - 1].argmax())
    assert out.outputs[0].token_ids == [int(ref[-1].argmax())]


def test_echo_only_max_tokens_zero(tiny, llm):
    p = tiny.tokenizer.encode("Scoring only")
    o = llm.generate([p], SamplingParams(max_tokens=0, prompt_logprobs=0, n=2))[0]
    assert [s.token_ids for s in o.outputs] == [[], []]
    assert all(s.finish_reason == "length" for s in o.outputs)
    assert len(o.prompt_logprobs) == len(p)


def test_n_shares_prefill_and_seeded_sampling_ignores_batch(tiny, llm):
    p = tiny.tokenizer.encode(PROMPTS[0])
    sp = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7, ignore_eos=True)
    alone = llm.generate([p], sp)[0]
    crowd = llm.generate([tiny.tokenizer.encode(x) for x in PROMPTS[1:]] + [p], [greedy()] * 3 + [sp])[-1]
    assert [s.token_ids for s in alone.outputs] == [s.token_ids for s in crowd.outputs]
    assert len({tuple(s.token_ids) for s in alone.outputs}) == 3  # the n sequences differ
    g = llm.generate([p], greedy(n=2))[0]
    assert g.outputs[0].token_ids == g.outputs[1].token_ids == llm.generate([p], greedy())[0].outputs[0].token_ids
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


def test_best_of_returns_all_with_cumulative_logprobs(tiny, llm):
    p = tiny.tokenizer.encode(PROMPTS[0])
    o = llm.generate([p], SamplingParams(max_tokens=5, temperature=1.0, n=1, best_of=3, seed=1, ignore_eos=True))[0]
    assert len(o.outputs) == 3 and all(s.cumulative_logprob < 0 for s in o.outputs)


def test_stop_strings_are_cut_and_never_streamed(tiny, llm):
    p = tiny.tokenizer.encode(PROMPTS[2])
    free = llm.generate([p], greedy(max_tokens=40))[0].outputs[0].text
    stop = free[10:14]  # a stop string that the greedy text contains
    cut = free[: free.index(stop)]
    deltas = [o.outputs[0].text for o in llm.stream(p, greedy(max_tokens=40, stop=["zzz-not-there", stop]))]
    assert "".join(deltas) == cut
    last = llm.generate([p], greedy(max_tokens=40, stop=[stop]))[0].outputs[0]
    assert last.text == cut and last.finish_reason == "stop" and last.stop_reason == stop
    incl = llm.generate([p], greedy(max_tokens=40, stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert incl.text == cut + stop


def test_logit_bias_min_tokens_and_stop_token_ids(tiny, llm):
    p = tiny.tokenizer.encode(PROMPTS[0])
    forced = llm.generate([p], greedy(max_tokens=5, logit_bias={464: 100.0}))[0].outputs[0]
    assert forced.token_ids == [464] * 5
    # EOS is pushed to the top but min_tokens keeps it out until 4 tokens exist
    eos = tiny.tokenizer.eos_token_id
    o = llm.generate([p], SamplingParams(max_tokens=10, temperature=0, logit_bias={eos: 100.0}, min_tokens=4))[0].outputs[0]
    assert len(o.token_ids) == 5 and o.token_ids[-1] == eos and o.finish_reason == "stop"
    o = llm.generate([p], SamplingParams(max_tokens=10, temperature=0, logit_bias={77: 100.0}, stop_token_ids=[77]))[0].outputs[0]
    assert o.token_ids == [77] and o.text == "" and o.stop_reason == 77


def test_context_and_parameter_errors(tiny, llm):
    with pytest.raises(ContextLengthExceeded) as e:
        llm.engine.add_request("x", [1] * 1000, SamplingParams(max_tokens=100))
    assert "1024" in str(e.value) and "1100" in str(e.value)
    with pytest.raises(ParamError) as e:
        llm.engine.add_request("y", [1, 2], SamplingParams(top_p=0.0))
    assert e.value.param == "top_p"
    with pytest.raises(ParamError) as e:
        llm.engine.add_request("z", [60000], SamplingParams())
    assert e.value.param == "prompt"


def test_kv_budget_is_respected_and_excess_requests_wait(tiny):
    per_token = 2 * tiny.config.n_layer * tiny.config.n_embd * 4
    budget = per_token * 1024 * 2  # two full contexts
    llm = LLM(loaded=tiny, max_num_seqs=8, kv_cache_memory=budget)
    assert llm.engine.cache.k.numel() * 4 * 2 <= budget
    ids = [tiny.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(ids, greedy(max_tokens=1000 - 60))  # each reserves ~a full context: at most 2 run at once
    assert all(len(o.outputs[0].token_ids) == 940 for o in outs)
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


def test_int8_kv_cache_holds_more_tokens_and_forks_with_its_scales(tiny):
    """--kv-cache-dtype int8: within the same budget the cache holds as many more tokens as its bytes
    per token allow (int8 K/V plus an fp32 scale per head, against fp32 K/V), never more than the
    budget; n=2 greedy sequences (the fork copies the prompt's partial last block, values and
    scales) both equal the greedy sequence alone, logprobs included; and greedy decoding over it stays near the fp32
    cache's (random tiny weights: near-ties can flip a token, so most, not all, prompts)."""
    c = tiny.config
    budget = 16 * 2**20
    f32 = LLM(loaded=tiny, kv_cache_memory=budget)
    q8 = LLM(loaded=tiny, max_num_seqs=8, kv_cache_memory=budget, kv_cache_dtype="int8")
    cache = q8.engine.cache
    assert cache.kv.dtype == torch.int8 and cache.scale.shape == cache.kv.shape[:-1]
    assert cache.kv.numel() + 4 * cache.scale.numel() == q8.engine.kv_cache_bytes <= budget
    per_f32, per_q8 = 2 * c.n_layer * c.n_embd * 4, 2 * c.n_layer * (c.n_embd + 4 * c.n_head)
    bs = cache.block_size
    assert abs(cache.kv.shape[1] - f32.engine.cache.kv.shape[1] * per_f32 / per_q8) <= bs
    p = tiny.tokenizer.encode(PROMPTS[0])
    assert len(p) % bs  # a partial last block, which the fork copies
    two = q8.generate([p], greedy(n=2, logprobs=0))[0]
    one = q8.generate([p], greedy(logprobs=0))[0].outputs[0]
    assert two.outputs[0].token_ids == two.outputs[1].token_ids == one.token_ids
    for out in two.outputs:  # the child's copied block attends as the parent's does
        assert max(abs(a.logprob - b.logprob) for a, b in zip(out.logprobs, one.logprobs)) < 1e-4
    # torch ops' path (KVCache.write / rows: quantize_kv, the same bits as kv_write) agrees with the kernels'
    plain = LLM(loaded=tiny, kv_cache_memory=budget, kv_cache_dtype="int8", kernels="torch").generate([p], greedy(logprobs=0))[0].outputs[0]
    assert plain.token_ids == one.token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(plain.logprobs, one.logprobs)) < 1e-3
    ids = [tiny.tokenizer.encode(x) for x in PROMPTS]
    same = [a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(f32.generate(ids, greedy()), q8.generate(ids, greedy()))]
    assert sum(same) >= len(same) - 1
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")


async def test_async_engine_streams_aborts_and_sheds_load(tiny):
    eng = AsyncEngine(tiny, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_queue=2)).start()
    try:
        p = tiny.tokenizer.encode(PROMPTS[0])
        text = ""
        async for out in eng.generate(p, greedy(max_tokens=8)):
            text += out.outputs[0].text if out.outputs else ""
        sync = LLM(loaded=tiny).generate([p], greedy(max_tokens=8))[0].outputs[0].text
        assert text == sync
        # a consumer that leaves early aborts its request and frees its blocks
        gen = eng.generate(p, greedy(max_tokens=500))
        await gen.__anext__()
        await gen.aclose()
        for _ in range(100):
            s = eng.stats()
            if s["running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]:
                break
            await asyncio.sleep(0.02)
        assert s["running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
        # a full queue answers EngineOverloaded instead of growing
        eng._waiting_estimate = 2
        with pytest.raises(EngineOverloaded):
            await eng.generate(p, greedy(max_tokens=1)).__anext__()
        eng._waiting_estimate = 0
    finally:
        eng.shutdown()


def test_int64_tensor_matches_torch_tensor_and_owns_its_memory():
    import gc

    from gpt2serve.engine.runner import int64_tensor

    values = [3, -1, 2**40, 0, 7]
    t = int64_tensor(values, torch.device("cpu"))
    gc.collect()  # the array behind the tensor is referenced by the tensor alone
    assert t.dtype == torch.int64 and t.is_contiguous()
    assert torch.equal(t, torch.tensor(values))
    assert torch.equal(t[1:3] * 2, torch.tensor([-2, 2**41]))  # views of it, as the runner takes them
    empty = int64_tensor([], torch.device("cpu"))
    assert empty.dtype == torch.int64 and empty.numel() == 0
