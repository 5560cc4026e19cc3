"""The peers script, --quick, restricted to transformers and ours on a tiny config: one real run."""

from __future__ import annotations

import json

from gpt2serve.bench import peers

from .conftest import TINY


def test_peers_quick_transformers_and_ours(tmp_path, capsys):
    out = tmp_path / "bench-results" / "peers.json"  # a folder not there yet, as on a fresh clone
    rc = peers.main(["--quick", "--engines", "transformers,ours", "--dtypes", "transformers:float32,ours:float32,ours:bfloat16",
                     "--config", json.dumps(TINY), "--batches", "1,2", "--new-tokens", "4", "--prefill-len", "16",
                     "--work-dir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(tmp_path / "bench-results" / "peers.md")])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model"]["n_layer"] == 2 and report["workload"]["new_tokens"] == 4
    assert {e["engine"]: e["errors"] for e in report["engines"]} == {"transformers": {}, "ours": {}}
    got = {(r["engine"], r["dtype"], r["metric"]) for r in report["results"]}
    for eng, dt in (("transformers", "float32"), ("ours", "float32"), ("ours", "bfloat16")):
        assert {(eng, dt, m) for m in ("prefill_16", "decode_b1", "decode_b2")} <= got
    for r in report["results"]:
        assert r["tok_s"] > 0
        if r["metric"].startswith("decode_b"):
            assert r["tokens"] == 4 * int(r["metric"][len("decode_b"):])
        if r["engine"] == "transformers":
            assert r["ratio_to_ours"] > 0
    # same weights, same prompt: our fp32 greedy tokens match transformers'
    ours32 = next(r for r in report["results"] if r["engine"] == "ours" and r["dtype"] == "float32" and r["metric"] == "decode_b1")
    assert ours32["agree_with_hf_fp32"] == 4
    # hardware measured in the same run, ceilings for every class and figure
    assert report["hardware"]["bandwidth"]["read_gbs"] > 0
    assert set(report["ceilings"]["float32"]) == {"decode_b1", "decode_b2", "prefill_16"}
    assert {(s["class"], s["metric"]) for s in report["summary"]} >= {("float32", "decode_b1"), ("bfloat16", "decode_b2")}
    md = (tmp_path / "bench-results" / "peers.md").read_text()
    assert "ours / best peer" in md and "Hardware ceilings" in md
    assert md.strip() in capsys.readouterr().out


def test_peers_rounds_take_turns_and_keep_each_figures_best(tmp_path, capsys):
    out = tmp_path / "peers.json"
    rc = peers.main(["--quick", "--rounds", "2", "--engines", "transformers,ours", "--dtypes", "transformers:float32,ours:float32",
                     "--config", json.dumps(TINY), "--batches", "1", "--new-tokens", "4", "--prefill-len", "16",
                     "--work-dir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(tmp_path / "peers.md")])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["rounds"] == 2
    # one record per figure, holding both rounds' figures and the best of them
    keys = [(r["engine"], r["dtype"], r["metric"]) for r in report["results"]]
    assert len(keys) == len(set(keys)) == 4
    for r in report["results"]:
        assert len(r["rounds"]) == 2 and all(x > 0 for x in r["rounds"])
        assert r["tok_s"] == max(r["rounds"]) and r["round"] == r["rounds"].index(r["tok_s"])
    # the bandwidth measured before each round, the ceilings from the best
    bw = report["hardware"]["bandwidth_rounds"]
    assert len(bw) == 2 and report["hardware"]["bandwidth"]["read_gbs"] == max(bw)
    # and the matmul table again before the second round (hardware.measure(into=...), tested in test_stats)
    assert "measuring memory bandwidth and matmul throughput again" in capsys.readouterr().err
    s = next(s for s in report["summary"] if s["metric"] == "decode_b1")
    ours = next(r for r in report["results"] if r["engine"] == "ours" and r["metric"] == "decode_b1")
    hf = next(r for r in report["results"] if r["engine"] == "transformers" and r["metric"] == "decode_b1")
    assert s["ours_over_best_peer_by_round"] == [o / h for o, h in zip(ours["rounds"], hf["rounds"])]
    md = (tmp_path / "peers.md").read_text()
    assert "best of 2 rounds" in md and "each round" in md


def test_merge_rounds_keeps_the_best_round_and_marks_missing_ones():
    rs = [{"engine": "ours", "dtype": "int8", "metric": "decode_b1", "tok_s": 100.0, "round": 0},
          {"engine": "ours", "dtype": "int8", "metric": "decode_b1", "tok_s": 120.0, "round": 1},
          {"engine": "ours", "dtype": "int8", "metric": "decode_b8", "tok_s": 500.0, "round": 1}]
    merged = {r["metric"]: r for r in peers.merge_rounds(rs)}
    assert merged["decode_b1"]["tok_s"] == 120.0 and merged["decode_b1"]["rounds"] == [100.0, 120.0]
    assert merged["decode_b8"]["rounds"] == [None, 500.0]


def test_default_set_leaves_transformers_bf16_out_without_native_bf16(tmp_path, monkeypatch, capsys):
    """On a CPU without native bf16 the default dtype set skips transformers bf16 (torch's scalar bf16
    matmuls: hours for the full workload) and says so in the log and the report's notes; named in
    --dtypes it runs, and with native bf16 nothing is left out."""
    monkeypatch.setattr(peers, "native_bf16", lambda: False)
    out = tmp_path / "peers.json"
    rc = peers.main(["--engines", "transformers", "--config", json.dumps(TINY), "--batches", "1", "--new-tokens", "2",
                     "--prefill-len", "0", "--no-hardware", "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {r["dtype"] for r in report["results"]} == {"float32"}
    assert any("transformers bfloat16" in n and "no native bf16" in n for n in report["notes"])
    assert "left out: transformers bfloat16" in capsys.readouterr().err
    slow = peers.SLOW_WITHOUT_NATIVE_BF16
    assert peers._dtypes_for("transformers", None, False, slow) == ["float32"]
    assert peers._dtypes_for("transformers", None, False) == ["float32", "bfloat16"]  # native bf16: nothing left out
    assert peers._dtypes_for("transformers", "transformers:bfloat16,ours:int8", False, slow) == ["bfloat16"]  # named: runs
