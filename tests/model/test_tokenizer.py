"""The GPT-2 tokenizer: ids equal `tokenizers`' GPT-2 on real text, round trips, streaming decode."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from gpt2serve.model.tokenizer import PACKAGED_DIR, IncrementalDetokenizer, Tokenizer, TokenizerError
from .helpers import shared_data_or_fail


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def hf(shared_data) -> HFTokenizer:
    return HFTokenizer.from_file(str(shared_data / "gpt2-tokenizer" / "tokenizer.json"))


def hf_ids(hf: HFTokenizer, texts: list[str]) -> list[list[int]]:
    # the reference: HF's GPT-2 fast tokenizer, special tokens not added
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_basics(tok):
    assert tok.backend == "tiktoken"
    assert tok.vocab_size == 50257 and tok.eos_token_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert tok.encode("") == [] and tok.decode([]) == ""
    assert tok.token_bytes(50256) == b"<|endoftext|>"
    assert tok.token_str(15496) == "Hello"
    assert tok.decode(torch.tensor([15496, 995])) == tok.decode((15496, 995)) == "Hello world"
    assert Tokenizer.default() is tok  # built once per process


def test_special_tokens_are_plain_text(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"
    assert tok.decode([50256]) == "<|endoftext|>"


def test_wikitext2_test_file_ids_equal_tokenizers(tok, hf, shared_data):
    text = (shared_data / "eval" / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert len(ids) > 280_000
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_lambada_ids_equal_tokenizers(tok, hf, shared_data):
    lines = (shared_data / "eval" / "lambada" / "lambada_test.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert len(texts) == 5153
    ours = tok.encode_batch(texts)
    assert ours == [tok.encode(t) for t in texts[:50]] + ours[50:]
    assert ours == hf_ids(hf, texts)


def test_from_dir_file_variants(tmp_path, hf, shared_data, tok):
    text = "Tokenizers from folders: vocab.json + merges.txt, or tokenizer.json — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🙂 日本語"
    only_json = tmp_path / "json"
    only_json.mkdir()
    shutil.copy(shared_data / "gpt2-tokenizer" / "tokenizer.json", only_json)
    from_json = Tokenizer.from_dir(only_json)
    from_shared = Tokenizer.from_dir(shared_data / "gpt2-tokenizer")
    for t in (from_json, from_shared):
        assert t.backend == "tiktoken" and t.vocab_size == 50257 and t.eos_token_id == 50256
        assert t.encode(text) == tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        Tokenizer.from_dir(tmp_path / "nothing")


def test_bad_tokenizer_files(tmp_path):
    shutil.copy(PACKAGED_DIR / "vocab.json", tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nthis line has three\n")
    with pytest.raises(TokenizerError, match=r"merges.txt:3"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\n")
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="vocab.json"):
        Tokenizer.from_dir(tmp_path)


def _write_bpe(folder, vocab: dict[str, int], merges: list[str]) -> None:
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def test_folder_not_in_merge_order_falls_back_to_tokenizers(tmp_path, tok):
    # swap the ids of two merged tokens: ids no longer follow merges.txt, so tiktoken's rank rule
    # would be wrong; the tokenizer must notice and apply the merges literally (tokenizers)
    vocab = json.loads((PACKAGED_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (PACKAGED_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    inv = {i: t for t, i in vocab.items()}
    a, b = 318, 11  # " is" and ","
    vocab[inv[a]], vocab[inv[b]] = b, a
    _write_bpe(tmp_path / "swapped", vocab, merges)
    swapped = Tokenizer.from_dir(tmp_path / "swapped")
    assert swapped.backend == "tokenizers"
    text = "This is it, the text, which is tokenized; <|endoftext|> stays text."
    perm = {a: b, b: a}
    expected = [perm.get(i, i) for i in tok.encode(text)]
    assert a in tok.encode(text) and b in tok.encode(text)
    assert swapped.encode(text) == expected
    assert swapped.decode(expected) == text


def test_truncated_vocab_in_merge_order_matches_tokenizers(tmp_path):
    # a smaller byte-level BPE (first 2000 merges) laid out like GPT-2's: tiktoken runs it and it
    # must equal the literal merges
    vocab = json.loads((PACKAGED_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (PACKAGED_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:2001]
    small = {t: i for t, i in vocab.items() if i < 256 + 2000} | {"<|endoftext|>": 256 + 2000}
    _write_bpe(tmp_path / "small", small, merges)
    ours = Tokenizer.from_dir(tmp_path / "small")
    assert ours.backend == "tiktoken" and ours.vocab_size == 2257 and ours.eos_token_id == 2256
    ref = HFTokenizer(models.BPE.from_file(str(tmp_path / "small" / "vocab.json"), str(tmp_path / "small" / "merges.txt")))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = (PACKAGED_DIR / "LICENSE").read_text() + " Ünïcödé 🙂 日本語 \n\n  spaces   "
    assert ours.encode(text) == ref.encode(text).ids
    assert ours.decode(ours.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_unicode(s):
    tok = Tokenizer.default()
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_ids_equal_tokenizers_on_arbitrary_unicode(s):
    tok = Tokenizer.default()
    assert tok.encode(s) == _hf_ref().encode(s, add_special_tokens=False).ids


@lru_cache(maxsize=1)
def _hf_ref() -> HFTokenizer:
    # hypothesis tests cannot take function-scoped fixtures
    hf = HFTokenizer.from_file(str(shared_data_or_fail() / "gpt2-tokenizer" / "tokenizer.json"))
    # ours never parses special tokens in text (hypothesis draws "<|endoftext|>" too): nor may the reference
    hf.encode_special_tokens = True
    return hf


def test_token_ids_out_of_range(tok):
    for bad in (-1, 50257):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([1, bad])
        with pytest.raises(ValueError, match="out of range"):
            tok.token_bytes(bad)


# -- incremental detokenization ------------------------------------------------------------------

STREAM_TEXTS = [
    "Emoji: 🙂👍🏽👨‍👩‍👧‍👦 and flags 🇯🇵🇫🇷!",
    "中文文本，日本語のテキスト、한국어 텍스트.",
    "Combining: é (e + U+0301), Zalgo: Z̷̢͎a̴l̵g̶o̸",
    "Math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da = Q,  n → ∞, ∑ f(i) = ∏ g(i)",
    "Plain ASCII text with <|endoftext|> inside.",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_token_by_token_never_breaks_a_character(tok, text):
    ids = tok.encode(text)
    # these texts do put a character across token boundaries (otherwise the test proves nothing)
    if not text.isascii():
        assert any("\ufffd" in tok.token_str(i) for i in ids)
    det = IncrementalDetokenizer(tok)
    pieces = [det.feed([i]) for i in ids]
    pieces.append(det.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


@settings(max_examples=200, deadline=None)
@given(st.text(), st.data())
def test_stream_any_split_of_valid_text(s, data):
    tok = Tokenizer.default()
    ids = tok.encode(s)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=8)))
    det = tok.detokenizer()
    out = []
    for lo, hi in zip([0] + cuts, cuts + [len(ids)]):
        out.append(det.feed(ids[lo:hi]))
    assert not det.pending
    out.append(det.flush())
    assert all("\ufffd" not in p for p in out)
    assert "".join(out) == s


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50256), max_size=30), st.data())
def test_stream_equals_decode_for_any_ids(ids, data):
    # arbitrary model output (invalid UTF-8 included): streamed text == one-shot decode
    tok = Tokenizer.default()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=8)))
    det = tok.detokenizer()
    out = [det.feed(ids[lo:hi]) for lo, hi in zip([0] + cuts, cuts + [len(ids)])]
    out.append(det.flush())
    assert "".join(out) == tok.decode(ids)


def test_flush_replaces_an_unfinished_character(tok):
    lead = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"\xe6")  # first byte of a CJK char
    det = tok.detokenizer()
    assert det.feed(tok.encode("ok ")) == "ok "
    assert det.feed([lead]) == "" and det.pending
    assert det.flush() == "\ufffd"
    assert tok.token_str(lead) == "\ufffd"
