"""`gpt2serve generate` prints exactly transformers' greedy text for a checkpoint folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "gpt2serve" / "model" / "assets" / "gpt2"


def test_generate_matches_transformers_greedy(tmp_path):
    import transformers

    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4)).eval()
    hf.save_pretrained(tmp_path)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS / f, tmp_path / f)
    from tokenizers import Tokenizer as HFTokenizer  # the reference tokenizer, independent of ours

    tok = HFTokenizer.from_file(str(ASSETS.parents[3].parent / "shared" / "data" / "gpt2-tokenizer" / "tokenizer.json"))
    prompt = "The meaning of life is"
    ids = torch.tensor([tok.encode(prompt).ids])
    ref = hf.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=50256)[0, ids.shape[1]:]
    expected = tok.decode(ref.tolist())
    r = subprocess.run(
        [sys.executable, "-m", "gpt2serve.cli", "generate", "--model", str(tmp_path), "--temperature", "0", "--max-tokens", "40", prompt],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert "tok/s" in r.stderr  # diagnostics go to stderr, never into the text


def test_generate_same_seed_same_output_and_clear_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "gpt2serve.cli", "generate", *a], capture_output=True, text=True, timeout=300)
    a = run("--model", "random:gpt2-tiny", "--seed", "5", "--max-tokens", "12", "Hi")
    b = run("--model", "random:gpt2-tiny", "--seed", "5", "--max-tokens", "12", "Hi")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()
    bad = run("--model", str(tmp_path / "nowhere"), "Hi")
    assert bad.returncode != 0 and "nowhere" in bad.stderr and bad.stdout == ""
