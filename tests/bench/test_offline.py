"""`gpt2serve bench offline` end to end on a tiny model: a few tokens, every output file."""

from __future__ import annotations

import json

from gpt2serve.bench.cli import main


def test_offline_smoke(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["offline", "--model", str(tiny_model_dir), "--batch-sizes", "1,3", "--prompt-lens", "5,17",
               "--max-tokens", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "offline.json").read_text())
    assert report["mode"] == "offline" and report["dtype"] == "float32"
    shapes = [(r["prompt_len"], r["batch"]) for r in report["results"]]
    assert shapes == [(5, 1), (5, 3), (17, 1), (17, 3)]
    for r in report["results"]:
        assert r["max_tokens"] == 4 and r["seconds"] > 0
        assert r["output_tok_s"] == r["batch"] * 4 / r["seconds"]
        assert r["total_tok_s"] > r["output_tok_s"]
    assert report["peak_rss_bytes"] > 0
    md = (out / "offline.md").read_text()
    assert "| 17 | 3 |" in md and md.strip() in capsys.readouterr().out
    assert (out / "offline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_offline_skips_shapes_past_the_context(tiny_model_dir, tmp_path):
    # the tiny model has n_positions = 256: 250 + 8 does not fit
    rc = main(["offline", "--model", str(tiny_model_dir), "--batch-sizes", "2", "--prompt-lens", "8,250",
               "--max-tokens", "8", "--out", str(tmp_path), "--no-plot", "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "offline.json").read_text())
    assert [r["prompt_len"] for r in report["results"]] == [8]
    assert report["skipped"] == [{"prompt_len": 250, "batch": 2, "reason": "prompt + max_tokens > 256"}]
    assert not (tmp_path / "offline.png").exists()


def test_bad_batch_sizes_are_rejected(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["offline", "--batch-sizes", "1,zero"])
    assert e.value.code == 2
    assert "comma list of integers" in capsys.readouterr().err
