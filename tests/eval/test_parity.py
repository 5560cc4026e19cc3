"""Every metric of `gpt2serve eval`, run through its CLI on a tiny random GPT-2, equals an
independent computation written here directly with transformers (1e-4 relative).

Data: slices (--limit) of the real LAMBADA / WikiText-2 / WikiText-103 / PTB test files, and small
synthetic files in the formats of the sets that are not on this machine (1BW, enwik8, text8, CBT).
The LAMBADA file is the real one, except that for some examples the last word is replaced by the
tiny model's own greedy word, so the accuracy path (all target tokens argmax) is exercised with
hits, not only misses.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from gpt2serve.eval import data, detokenize
from gpt2serve.eval.cli import main
from gpt2serve.eval.scoring import get_tokenizer
from gpt2serve.eval.tasks import CBTTask

from .conftest import N_POSITIONS

LIMIT = 24
EOT = 50256
ALL_TASKS = ["lambada", "wikitext2", "wikitext103", "ptb", "1bw", "enwik8", "text8", "cbt-cn", "cbt-ne"]


# ---------------------------------------------------------------------------------------------
# independent reference, straight from transformers


@torch.no_grad()
def ref_logprobs(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob of ids[1:], ids[1:] is argmax) from one forward over ids."""
    logits = model(torch.tensor([ids])).logits[0, :-1].double()
    tgt = torch.tensor(ids[1:])
    lp = torch.log_softmax(logits, -1)[torch.arange(len(tgt)), tgt]
    return lp, logits.argmax(-1) == tgt


@torch.no_grad()
def ref_stream_nll(model, ids: list[int], window: int, stride: int) -> float:
    """NLL of ids after <|endoftext|>, Hugging Face perplexity-guide style: each window's labels
    are masked (-100) except the tokens not scored before; loss is transformers' own."""
    stream = [EOT] + ids
    nll, prev_end = 0.0, 1
    end = min(window, len(stream))
    while True:
        begin = max(0, end - window)
        x = torch.tensor([stream[begin:end]])
        labels = x.clone()
        n_new = end - prev_end
        labels[0, : x.shape[1] - n_new] = -100
        nll += model(x, labels=labels).loss.double().item() * n_new
        if end == len(stream):
            return nll
        prev_end, end = end, min(end + stride, len(stream))


def ref_pair(tok, model, ctx_text: str, cont_text: str) -> tuple[float, bool]:
    # trailing spaces of the context belong to the continuation; tokens from the whole string
    stripped = ctx_text.rstrip(" ")
    cont_text = ctx_text[len(stripped):] + cont_text
    whole = tok.encode(stripped + cont_text)
    n_ctx = len(tok.encode(stripped))
    keep = whole[max(0, len(whole) - N_POSITIONS):]
    n_cont = len(whole) - n_ctx
    lp, greedy = ref_logprobs(model, keep)
    return lp[-n_cont:].sum().item(), bool(greedy[-n_cont:].all())


def reference(task: str, root, tok, model, stride: int) -> dict[str, float]:
    if task == "lambada":
        texts = [json.loads(x)["text"] for x in (root / "lambada" / "lambada_test.jsonl").read_text().splitlines()[:LIMIT]]
        res = [ref_pair(tok, model, t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in texts]
        n_tok = sum(len(tok.encode(" " + t.rsplit(" ", 1)[1])) for t in texts)
        total = sum(lp for lp, _ in res)
        return {"acc": 100 * sum(g for _, g in res) / len(res), "ppl": math.exp(-total / len(res)),
                "ppl_token": math.exp(-total / n_tok)}
    if task.startswith("cbt"):
        path = root / "cbt" / ("cbtest_CN_test_2500ex.txt" if task == "cbt-cn" else "cbtest_NE_test_2500ex.txt")
        examples = data.read_cbt(path, LIMIT)
        correct = 0
        for ex in examples:
            lps = [ref_pair(tok, model, *CBTTask.pair_texts(ex, c))[0] for c in ex.candidates]
            correct += ex.candidates[lps.index(max(lps))] == ex.answer
        return {"acc": 100 * correct / len(examples)}
    if task == "enwik8":
        raw = (root / "enwik8" / "enwik8").read_bytes()
        text = raw[len(raw) - len(raw) // 20:].decode("utf-8", errors="ignore")  # broken edge characters go
        text = "".join(text.splitlines(keepends=True)[:LIMIT])
        nll = ref_stream_nll(model, tok.encode(text), N_POSITIONS, stride)
        return {"bpb": nll / math.log(2) / len(text.encode("utf-8")), "nll": nll}
    if task == "text8":
        raw = (root / "text8" / "text8").read_bytes()
        text = raw[len(raw) - len(raw) // 20:].decode()
        text = text[: [m.end() for m in re.finditer(r"\S+", text)][LIMIT - 1]]
        nll = ref_stream_nll(model, tok.encode(text), N_POSITIONS, stride)
        return {"bpc": nll / math.log(2) / len(text), "nll": nll}
    file, detok = {
        "wikitext2": ("wikitext-2/wiki.test.tokens", detokenize.wikitext),
        "wikitext103": ("wikitext-103/wiki.test.tokens", detokenize.wikitext),
        "ptb": ("ptb/ptb.test.txt", detokenize.ptb),
        "1bw": ("1bw/news.en.heldout-00000-of-00050", detokenize.one_billion_word),
    }[task]
    lines = (root / file).read_text(encoding="utf-8").splitlines(keepends=True)[:LIMIT]
    original = "".join(lines)
    words = sum(len(line.split()) + 1 for line in lines)
    ids = tok.encode(detok(original))
    nll = ref_stream_nll(model, ids, N_POSITIONS, stride)
    return {"ppl": math.exp(nll / words), "ppl_token": math.exp(nll / len(ids)), "nll": nll}


# ---------------------------------------------------------------------------------------------
# the data root


def _greedy_word(tok, model, context: str) -> str | None:
    """The tiny model's argmax next token after `context`, if it is a whole " word"."""
    ids = tok.encode(context)[-(N_POSITIONS - 1):]
    with torch.no_grad():
        g = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    s = tok.decode([g])
    return s if re.fullmatch(r" [A-Za-z]+", s) and tok.encode(s) == [g] else None


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, real_data, hf_model):
    tok = get_tokenizer()
    root = tmp_path_factory.mktemp("evaldata")
    for sub in ("wikitext-2", "wikitext-103", "ptb"):
        (root / sub).symlink_to(real_data / sub)
    # LAMBADA: real examples; where the model's greedy next token is a whole word, end with it
    texts = []
    for i, line in enumerate((real_data / "lambada" / "lambada_test.jsonl").read_text().splitlines()[:LIMIT]):
        t = json.loads(line)["text"]
        w = _greedy_word(tok, hf_model, t.rsplit(" ", 1)[0]) if i % 2 else None
        texts.append(t if w is None else t.rsplit(" ", 1)[0] + w)
    (root / "lambada").mkdir()
    (root / "lambada" / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # 1BW: Moses-tokenized sentences, one per line
    sents = [t.replace(",", " ,").replace(".", " .").replace("'s", " 's").replace("n't", " n't")
             for t in texts[:LIMIT]]
    (root / "1bw").mkdir()
    (root / "1bw" / "news.en.heldout-00000-of-00050").write_text("".join(s + "\n" for s in sents))
    # enwik8 / text8: the standard split keeps the last 5%; make that part a few windows long
    body = "".join(f"<page><title>{t[:30]}</title> Zürich – 東京 {t}</page>\n" for t in texts) * 6
    (root / "enwik8").mkdir()
    (root / "enwik8" / "enwik8").write_bytes(body.encode("utf-8"))
    words = re.sub(r"[^a-z]+", " ", " ".join(texts).lower()).split()
    (root / "text8").mkdir()
    (root / "text8" / "text8").write_bytes((" " + " ".join(words * 20)).encode())
    # CBT: 20 story sentences + a query with XXXXX and 10 candidates (the answer among them)
    (root / "cbt").mkdir()
    for kind in ("CN", "NE"):
        blocks = []
        for e in range(4):
            story = [texts[(e * 21 + i) % len(texts)][:160] for i in range(20)]
            cands = sorted({w for w in " ".join(story).split() if w.isalpha()})[e: e + 10]
            query = f"`` Then , '' said {cands[3]} , `` XXXXX did n't go home . ''"
            lines = [f"{i + 1} {s}" for i, s in enumerate(story)]
            lines.append(f"21 {query}\t{cands[e]}\t\t{'|'.join(cands)}")
            blocks.append("\n".join(lines) + "\n")
        (root / "cbt" / f"cbtest_{kind}_test_2500ex.txt").write_text("\n".join(blocks))
    return root


def run_cli(tmp_path, model_dir, root, tasks, backend, extra=()):
    out = tmp_path / f"{backend}.json"
    rc = main([*tasks, "--model", str(model_dir), "--data", str(root), "--limit", str(LIMIT), "--output", str(out),
               "--backend", backend, "--device", "cpu", "--no-progress", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def assert_metrics_equal(ours: dict, ref: dict, task: str) -> None:
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, rel=1e-4, abs=1e-4), f"{task}.{k}: ours {ours[k]} reference {v}"


@pytest.fixture(scope="module")
def references(data_root, hf_model) -> dict[str, dict]:
    tok = get_tokenizer()
    return {task: reference(task, data_root, tok, hf_model, stride=N_POSITIONS // 2) for task in ALL_TASKS}


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_every_metric_equals_transformers(tmp_path, tiny_model_dir, data_root, references, backend):
    report = run_cli(tmp_path, tiny_model_dir, data_root, ALL_TASKS, backend)
    for task in ALL_TASKS:
        assert_metrics_equal(report["tasks"][task]["metrics"], references[task], task)
        assert report["tasks"][task]["timing"]["tokens_per_s"] > 0
    # the LAMBADA slice has greedy hits and misses, and they are counted right
    assert 0 < report["tasks"]["lambada"]["metrics"]["acc"] < 100
    # sliding windows were used: more BPE tokens than one window
    assert report["tasks"]["wikitext2"]["info"]["bpe_tokens"] > 3 * N_POSITIONS
    # table rows: one per headline metric, beside the published 124M numbers
    rows = {(r["task"], r["metric"]): r for r in report["table"]}
    assert rows[("lambada", "acc")]["published"] == 45.99 and rows[("wikitext2", "ppl")]["published"] == 29.41
    r = rows[("ptb", "ppl")]
    assert r["diff"] == pytest.approx(r["ours"] - 65.85) and r["diff_pct"] == pytest.approx(100 * (r["ours"] - 65.85) / 65.85)
    assert "| lambada (first 24) | acc |" in report["markdown"]


def test_stride_is_honoured(tmp_path, tiny_model_dir, hf_model, data_root):
    report = run_cli(tmp_path, tiny_model_dir, data_root, ["wikitext2", "enwik8"], "hf", ["--stride", "24"])
    tok = get_tokenizer()
    for task in ("wikitext2", "enwik8"):
        assert_metrics_equal(report["tasks"][task]["metrics"], reference(task, data_root, tok, hf_model, 24), task)
        assert report["tasks"][task]["info"]["stride"] == 24
