"""The maths behind the reports: percentiles, per-level summaries, model cost and ceilings."""

from __future__ import annotations

import math

import pytest

from gpt2serve.bench import hardware, peers
from gpt2serve.bench.serve import RequestResult, summarize_level, tokens_in_window
from gpt2serve.bench.stats import peak_rss_bytes, rss_bytes, summarize


def test_summarize_percentiles_interpolate_linearly():
    s = summarize([4, 1, 3, 2])
    assert s["n"] == 4 and s["min"] == 1 and s["max"] == 4 and s["mean"] == 2.5
    assert s["p50"] == 2.5
    assert s["p90"] == pytest.approx(3.7)  # rank 0.9 * 3 = 2.7 -> 3 + 0.7 * (4 - 3)
    assert s["p99"] == pytest.approx(3.97)
    s = summarize(range(101))
    assert (s["p50"], s["p90"], s["p99"]) == (50, 90, 99)


def test_summarize_single_and_empty():
    assert summarize([7.0]) == {"n": 1, "mean": 7.0, "min": 7.0, "max": 7.0, "p50": 7.0, "p90": 7.0, "p99": 7.0}
    empty = summarize(iter([]))
    assert empty["n"] == 0 and empty["p50"] is None and empty["mean"] is None


def test_summarize_level_counts_only_successful_requests():
    ok1 = RequestResult(ok=True, start=0.0, end=1.0, ttft=0.1, itl=[0.2, 0.3], tokens=3, end_of_text=0.6)
    ok2 = RequestResult(ok=True, start=0.5, end=2.0, ttft=0.3, itl=[0.4], tokens=2, end_of_text=1.2)
    bad = RequestResult(ok=False, start=0.0, end=0.1, error="HTTP 429: overloaded")
    lv = summarize_level([ok1, ok2, bad], wall=2.0, concurrency=2)
    assert lv["requests"] == 3 and lv["ok"] == 2 and lv["errors"] == 1
    assert lv["error_samples"] == ["HTTP 429: overloaded"]
    assert lv["completion_tokens"] == 5 and lv["tok_s"] == 2.5 and lv["requests_per_s"] == 1.0
    assert lv["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert lv["itl_ms"]["n"] == 3 and lv["itl_ms"]["p50"] == pytest.approx(300.0)
    assert lv["e2e_ms"]["max"] == pytest.approx(1500.0)
    # TPOT: (last text chunk - first) / (tokens - 1) = (0.6 - 0.1) / 2 and (0.7 - 0.3) / 1
    assert ok1.tpot == pytest.approx(0.25) and ok2.tpot == pytest.approx(0.4)
    assert lv["tpot_ms"]["mean"] == pytest.approx(325.0)


def test_steady_window_counts_tokens_by_chunk():
    # 4 tokens in 4 chunks at t=1..4, 6 tokens in 3 chunks (held-back UTF-8) at t=2, 3, 5
    a = RequestResult(ok=True, start=0.0, end=4.5, tokens=4, chunk_times=[1.0, 2.0, 3.0, 4.0])
    b = RequestResult(ok=True, start=0.0, end=5.5, tokens=6, chunk_times=[2.0, 3.0, 5.0])
    bad = RequestResult(ok=False, start=0.0, end=1.0, tokens=3, chunk_times=[2.5], error="x")
    assert tokens_in_window([a, b, bad], 2.0, 3.0) == pytest.approx(2 + 4)
    lv = summarize_level([a, b], wall=10.0, concurrency=2, window=(2.0, 3.0, 6.0))
    assert lv["tok_s"] == pytest.approx(6.0) and lv["tok_s_wall"] == pytest.approx(1.0)
    assert lv["steady_window_s"] == pytest.approx(1.0)
    # an empty window (a level too short to reach steady state) falls back to tokens / wall
    assert summarize_level([a, b], wall=10.0, concurrency=2, window=(3.0, 3.0, 0.0))["tok_s"] == pytest.approx(1.0)


def test_rss_readers():
    peak, now = peak_rss_bytes(), rss_bytes()
    assert peak is not None and now is not None and peak >= now > 0
    assert peak_rss_bytes(2**31 - 1) is None  # no such process


def test_gpt2_124m_cost_matches_the_published_shape():
    c = hardware.ModelCost()
    # 12 blocks x 12 d^2 + the tied lm_head (d x vocab)
    assert c.matmul_params() == 12 * 12 * 768**2 + 768 * 50257 == 123_532_032
    assert c.weight_bytes("float32") == 4 * c.matmul_params()
    assert c.weight_bytes("int8") * 4 == c.weight_bytes("float32")
    # ~251 MFLOP per decoded token at context 96 (PERF-NOTES)
    assert c.decode_flops_per_token(96) == pytest.approx(251e6, rel=0.01)
    # prefill: no lm_head per token, only once per prompt
    assert c.prefill_flops_per_token(512) == pytest.approx(2 * 12 * 12 * 768**2 + 4 * 12 * 256.5 * 768 + 2 * 768 * 50257 / 512)


def _flat_profile(cost, gflops: dict[str, float], rows, bw_gbs: float) -> hardware.HardwareProfile:
    """A profile where every shape runs at `gflops[dtype]`: the ceilings then have closed forms."""
    prof = hardware.HardwareProfile(threads=2, bandwidth={"read_gbs": bw_gbs, "copy_gbs": bw_gbs})
    for dtype, rate in gflops.items():
        prof.matmul[dtype] = {
            str(m): {f"{k}x{n}": {"gflops": rate, "seconds": 2 * m * k * n / (rate * 1e9), "layout": "kn"}
                     for k, n, _ in cost.shapes()} for m in rows}
    return prof


def test_measuring_into_a_profile_keeps_each_entrys_best():
    """The peers script measures the matmul table again before every round into the same profile:
    an entry measured slower than before keeps its old time, one measured faster takes the new one,
    and bandwidth=False leaves the bandwidth as it was."""
    cost = hardware.ModelCost(n_layer=1, n_embd=64, vocab_size=128, n_positions=64)
    shapes = [f"{k}x{n}" for k, n in sorted({(k, n) for k, n, _ in cost.shapes()})]
    slow, fast = shapes[0], shapes[1]
    prof = _flat_profile(cost, {"float32": 1.0}, rows=(4,), bw_gbs=35.0)  # 1 GFLOP/s: far slower than any CPU
    prof.matmul["float32"]["4"][fast] = {"gflops": 1e9, "seconds": 1e-15, "layout": "kn"}  # faster than any CPU
    before = prof.matmul["float32"]["4"][slow]["seconds"]
    got = hardware.measure(cost, dtypes=("float32",), rows=(4,), quick=True, passes=1, into=prof, bandwidth=False)
    assert got is prof and prof.bandwidth == {"read_gbs": 35.0, "copy_gbs": 35.0}
    table = prof.matmul["float32"]["4"]
    assert table[slow]["seconds"] < before and table[slow]["gflops"] > 1.0
    assert table[fast]["seconds"] == 1e-15
    assert set(table) == set(shapes)


def test_ceilings_are_the_lower_of_bandwidth_and_compute():
    cost = hardware.ModelCost()
    prof = _flat_profile(cost, {"float32": 190.0, "int8": 800.0}, rows=(1, 8, 32, 512), bw_gbs=35.0)
    c = hardware.ceilings(prof, cost, prompt_len=32, new_tokens=128, prefill_len=512, batches=(1, 8, 32))
    ctx = 32 + 64
    # batch 1: bandwidth only (weights + one sequence's KV)
    b1 = 35e9 / (cost.weight_bytes("float32") + cost.kv_bytes_per_token(ctx, "float32"))
    assert c["float32"]["decode_b1"] == pytest.approx(b1)
    assert 65 < b1 < 72  # ~71 tok/s in PERF-NOTES
    # batch 32 is compute-bound: rate / FLOPs per token
    assert c["float32"]["decode_b32"] == pytest.approx(190e9 / cost.decode_flops_per_token(ctx))
    assert c["int8"]["decode_b32"] == pytest.approx(800e9 / cost.decode_flops_per_token(ctx))
    # prefill: blocks at 512 rows (+ attention) at the matmul rate, the last row's lm_head at its weight read
    t = 512 * (2 * cost.matmul_params(lm_head=False) + cost.attention_flops(256.5)) / 190e9 + 768 * 50257 * 4 / 35e9
    assert c["float32"]["prefill_512"] == pytest.approx(512 / t, rel=1e-6)
    assert 1000 < c["float32"]["prefill_512"] < 1100  # ~1,060 in PERF-NOTES
    for d in c.values():
        assert all(math.isfinite(v) and v > 0 for v in d.values())
    assert "bandwidth" in hardware.format_report(prof, c).lower()


def test_bf16_compute_bound_is_the_faster_of_bf16_and_fp32():
    """bf16 weights can be widened and multiplied in fp32: where the CPU's fp32 products are faster
    (the Intel Xeon without AMX), the 16-bit ceiling follows them; where bf16 is faster, bf16."""
    cost = hardware.ModelCost()
    for bf16_rate, fp32_rate in ((160.0, 320.0), (430.0, 190.0)):
        prof = _flat_profile(cost, {"float32": fp32_rate, "bfloat16": bf16_rate}, rows=(32,), bw_gbs=35.0)
        c = hardware.ceilings(prof, cost, batches=(32,), prefill_len=0)
        assert c["bfloat16"]["decode_b32"] == pytest.approx(max(bf16_rate, fp32_rate) * 1e9 / cost.decode_flops_per_token(96))
        assert c["float32"]["decode_b32"] == pytest.approx(fp32_rate * 1e9 / cost.decode_flops_per_token(96))


def test_peers_summary_ratios():
    report = {
        "workload": {"batches": [1], "prompt_len": 32, "new_tokens": 8, "prefill_len": 0},
        "engines": [{"engine": "transformers", "version": "transformers x", "errors": {}},
                    {"engine": "ours", "version": "gpt2serve y", "errors": {"int8": "ValueError: no"}}],
        "ceilings": {"float32": {"decode_b1": 80.0}},
        "date": "today", "threads": 2,
        "results": [
            {"engine": "transformers", "dtype": "float32", "class": "float32", "metric": "decode_b1", "tok_s": 25.0, "first_tokens": [1, 2, 3]},
            {"engine": "transformers", "dtype": "bfloat16", "class": "bfloat16", "metric": "decode_b1", "tok_s": 30.0, "first_tokens": [1, 2, 9]},
            {"engine": "ours", "dtype": "float32", "class": "float32", "metric": "decode_b1", "tok_s": 50.0, "first_tokens": [1, 2, 3]},
        ],
    }
    peers.summarize(report)
    hf32, hf16, ours = report["results"]
    assert hf32["ratio_to_ours"] == 0.5 and hf16["ratio_to_ours"] is None and ours["ratio_to_ours"] is None
    (s,) = report["summary"]
    assert s["ours_over_best_peer"] == 2.0 and s["fraction_of_ceiling"] == 0.625
    assert (hf32["agree_with_hf_fp32"], hf16["agree_with_hf_fp32"], ours["agree_with_hf_fp32"]) == (3, 2, 3)
    md = peers.format_markdown(report)
    assert "**2.00x**" in md and "**62%**" in md and "25 (0.50x)" in md and "ours int8: ValueError: no" in md


def test_rss_of_a_wrapper_counts_the_process_it_forked():
    """`bench serve --server-pid` may be given a wrapper's pid (a pyenv shim forks the server): the
    memory of its descendants counts, not the wrapper's own 2 MiB."""
    import subprocess
    import sys
    import time

    code = "import sys, time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print(1, flush=True); time.sleep(30)"
    p = subprocess.Popen(["bash", "-c", f'"{sys.executable}" -c "{code}"; true'], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "1"  # the child has touched its 200 MiB
        time.sleep(0.1)
        assert peak_rss_bytes(p.pid) > 200 * 2**20 and rss_bytes(p.pid) > 200 * 2**20
    finally:
        subprocess.run(["pkill", "-P", str(p.pid)])
        p.wait(timeout=10)
