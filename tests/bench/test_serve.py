"""`gpt2serve bench serve` against a live server (FastAPI app under uvicorn, no auth, tiny model)."""

from __future__ import annotations

import json
import os

from gpt2serve.bench.cli import main


def test_serve_smoke(live_server, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["serve", "--url", live_server, "--concurrency", "1,3", "--requests-per-client", "2",
               "--prompt-len", "6", "--max-tokens", "5", "--idle-requests", "2", "--server-pid", str(os.getpid()),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "serve.json").read_text())
    assert report["mode"] == "serve" and report["max_tokens"] == 5
    assert report["idle_ttft_ms"]["n"] == 2 and report["idle_ttft_ms"]["p50"] > 0
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    for lv in report["levels"]:
        n = 2 * lv["concurrency"]
        assert (lv["requests"], lv["ok"], lv["errors"]) == (n, n, 0)
        # usage chunk: exactly max_tokens per request, EOS ignored
        assert lv["completion_tokens"] == 5 * n
        assert lv["ttft_ms"]["n"] == n and lv["e2e_ms"]["n"] == n
        assert lv["ttft_ms"]["p50"] <= lv["e2e_ms"]["p50"]
        assert lv["tok_s"] > 0 and lv["ttft_p50_over_idle"] > 0
        assert lv["itl_ms"]["n"] >= 1
        assert lv["arrivals"] == ("burst" if lv["concurrency"] == 1 else "staggered")
        assert lv["client_cpu_cores"] > 0
    # concurrency 3, staggered: the window runs from the last lead-in's end to the first client's end
    lv3 = report["levels"][1]
    assert lv3["steady_window_s"] is not None and lv3["tok_s_wall"] > 0
    # the server runs in this process, so its peak RSS is ours
    assert report["server_pid"] == os.getpid() and report["server_peak_rss_bytes"] > 0
    assert "Server peak resident memory" in (out / "serve.md").read_text()
    assert "Load generator's own CPU" in (out / "serve.md").read_text()
    assert (out / "serve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 3 |" in capsys.readouterr().out


def test_serve_reports_errors_and_fails(live_server, tmp_path):
    # a model id the server does not serve: every request is a 404, reported and counted, exit 1
    rc = main(["serve", "--url", live_server, "--model", "no-such-model", "--concurrency", "2",
               "--requests-per-client", "1", "--max-tokens", "2", "--idle-requests", "1", "--no-warmup",
               "--out", str(tmp_path), "--no-plot", "--no-progress"])
    assert rc == 1
    report = json.loads((tmp_path / "serve.json").read_text())
    (lv,) = report["levels"]
    assert lv["errors"] == 2 and lv["ok"] == 0 and lv["tok_s"] == 0
    assert lv["error_samples"][0].startswith("HTTP 404")
    assert report["idle_ttft_ms"]["n"] == 0 and report["idle_errors"]


def test_serve_burst_arrivals(live_server, tmp_path):
    rc = main(["serve", "--url", live_server, "--concurrency", "3", "--requests-per-client", "1",
               "--prompt-len", "4", "--max-tokens", "3", "--idle-requests", "1", "--arrivals", "burst",
               "--out", str(tmp_path), "--no-plot", "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "serve.json").read_text())
    (lv,) = report["levels"]
    assert report["arrivals"] == "burst" and lv["arrivals"] == "burst" and lv["steady_window_s"] is None
    assert lv["completion_tokens"] == 9 and lv["tok_s"] == lv["tok_s_wall"]
