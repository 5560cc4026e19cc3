"""lm-evaluation-harness, unchanged, against `gpt2serve serve`: its `local-completions` run of
LAMBADA (the local jsonl through gpt2serve/eval/lm_eval_tasks) gives the same ACC and PPL as
`gpt2serve eval lambada` in-process on the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2serve.eval.cli import main

from .conftest import N_POSITIONS
from .test_api import live_server  # noqa: F401  (the fixture: gpt2serve serve on the tiny model)

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO.parent / "shared" / "data" / "gpt2-tokenizer"
LIMIT = 20


def test_lm_eval_local_completions_equals_gpt2serve_eval(tmp_path, tiny_model_dir, real_data, live_server):  # noqa: F811
    assert (TOKENIZER / "tokenizer.json").is_file(), f"GPT-2 tokenizer files missing at {TOKENIZER}"
    data_file = real_data / "lambada" / "lambada_test.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    model_args = ",".join([
        f"model={tiny_model_dir.name}",
        f"base_url={live_server}/v1/completions",
        "tokenizer_backend=huggingface",
        f"tokenizer={TOKENIZER}",
        "num_concurrent=2",
        "max_retries=3",
        f"max_length={N_POSITIONS}",
    ])
    out = tmp_path / "lm_eval_out"
    r = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
         "--include_path", str(REPO / "gpt2serve" / "eval" / "lm_eval_tasks"), "--tasks", "lambada_local",
         "--limit", str(LIMIT), "--metadata", json.dumps({"data_file": str(data_file)}), "--output_path", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, f"lm_eval wrote no results under {out}: {r.stdout[-2000:]}"
    theirs = json.loads(files[-1].read_text())["results"]["lambada_local"]

    assert main(["lambada", "--data", str(real_data), "--limit", str(LIMIT), "--no-progress",
                 "--model", str(tiny_model_dir), "--device", "cpu", "--output", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())["tasks"]["lambada"]["metrics"]
    assert theirs["perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-4)
    assert 100 * theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-6)  # lm-eval: fraction; ours: percent
