"""The GPT-2 tokenizer: byte-level BPE, run by tiktoken, built from a model folder's own files.

GPT-2's vocab.json numbers its tokens in merge order: ids 0..255 are the 256 single bytes and merge
i of merges.txt makes token 256 + i. tiktoken ranks a pair by the id of the token the pair makes,
so for such a vocab the ids *are* tiktoken's ranks and the encoding equals the reference BPE (tested
on all of WikiText-2 and LAMBADA against `tokenizers`). At load we check that ordering against
merges.txt; a folder whose files are ordered otherwise (a retrained or extended byte-level BPE) is
run by the `tokenizers` library instead, which applies the merges list literally.

Special tokens are never parsed out of text: "<|endoftext|>" typed by a user is seven ordinary
tokens, as with OpenAI's API. The end-of-text id is only ever produced by the model.
"""

from __future__ import annotations

import codecs
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex, as tiktoken spells it

PACKAGED_DIR = Path(__file__).parent / "assets" / "gpt2"
ENDOFTEXT = "<|endoftext|>"


class TokenizerError(ValueError):
    """The tokenizer files of a folder are missing, unreadable or inconsistent."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte -> the byte (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_to_bytes(token: str) -> bytes:
    dec = _byte_decoder()
    try:
        return bytes(dec[ch] for ch in token)
    except KeyError:
        # not a byte-level string (e.g. an added special token with unusual characters): its text
        return token.encode("utf-8")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file: {e}") from e


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file: {e}") from e
    merges = []
    for lineno, line in enumerate(lines, 1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{lineno}: a merge line must be two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int]]:
    d = _read_json(path)
    model = d.get("model") if isinstance(d, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path}: not a BPE tokenizer.json (model.type must be BPE with a vocab)")
    pre = d.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        raise TokenizerError(f"{path}: pre_tokenizer is {pre.get('type')!r}; GPT-2 needs a ByteLevel BPE")
    # merges: "a b" strings (tokenizers < 0.20) or [a, b] pairs (newer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{path}: malformed entry in model.merges")
    added = {t["content"]: t["id"] for t in d.get("added_tokens", []) if isinstance(t, dict)}
    return model["vocab"], merges, added


def _merge_ordered(vocab: dict[str, int], merges: list[tuple[str, str]]) -> bool:
    """True when ids 0..255 are the single bytes and merge i makes token 256 + i (GPT-2's layout)."""
    dec = _byte_decoder()
    if sorted(v for k, v in vocab.items() if len(k) == 1 and k in dec) != list(range(256)):
        return False
    return all(vocab.get(a + b) == 256 + i for i, (a, b) in enumerate(merges))


class Tokenizer:
    """GPT-2 byte-level BPE. `encode` never parses special tokens; `decode` replaces broken UTF-8."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added: dict[str, int] | None = None,
                 source: str = "<memory>"):
        self.source = source
        added = dict(added or {})
        ids = sorted(set(vocab.values()) | set(added.values()))
        if not ids or ids != list(range(len(ids))):
            raise TokenizerError(f"{source}: token ids must be exactly 0..N-1 (got {len(ids)} distinct ids)")
        self.vocab_size = len(ids)
        # id -> the token's bytes, a plain list: decode is a join over list lookups
        self._bytes: list[bytes] = [b""] * self.vocab_size
        for tok, i in vocab.items():
            self._bytes[i] = _token_to_bytes(tok)
        for tok, i in added.items():
            self._bytes[i] = tok.encode("utf-8")

        eos = added.get(ENDOFTEXT, vocab.get(ENDOFTEXT))
        if eos is None:
            raise TokenizerError(f"{source}: no {ENDOFTEXT} token in the vocabulary")
        self.eos_token_id: int = eos

        n_ranked = 256 + len(merges)
        self.backend: str
        if _merge_ordered(vocab, merges) and all(i >= n_ranked for i in added.values()):
            ranks = {self._bytes[i]: i for i in range(n_ranked)}
            specials = {tok: i for tok, i in vocab.items() if i >= n_ranked} | {t: i for t, i in added.items()}
            self._tt = tiktoken.Encoding(
                name=f"gpt2serve:{source}", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens=specials
            )
            self._encode = self._tt.encode_ordinary
            self._encode_batch = lambda texts: self._tt.encode_ordinary_batch(texts)
            self.backend = "tiktoken"
        else:
            self._encode, self._encode_batch = self._hf_backend(vocab, merges)
            self.backend = "tokenizers"

    @staticmethod
    def _hf_backend(vocab, merges):
        # The merges list applied literally. No added tokens are registered, so "<|endoftext|>" in
        # text stays plain text here too.
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        hf = HFTokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        return (lambda text: hf.encode(text, add_special_tokens=False).ids,
                lambda texts: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)])

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """From vocab.json + merges.txt (preferred), else tokenizer.json, in folder `path`."""
        path = Path(path)
        vocab_file, merges_file, json_file = path / "vocab.json", path / "merges.txt", path / "tokenizer.json"
        if vocab_file.is_file() and merges_file.is_file():
            vocab = _read_json(vocab_file)
            if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
                raise TokenizerError(f"{vocab_file}: must be a JSON object mapping token -> id")
            added = {}
            if json_file.is_file():  # vocab.json lacks the added-token flags; tokenizer.json has them
                added = {k: v for k, v in _read_tokenizer_json(json_file)[2].items() if vocab.get(k, v) == v}
            return cls(vocab, _read_merges_txt(merges_file), added, source=str(path))
        if json_file.is_file():
            vocab, merges, added = _read_tokenizer_json(json_file)
            return cls(vocab, merges, added, source=str(path))
        raise TokenizerError(f"{path}: no tokenizer files (need vocab.json + merges.txt, or tokenizer.json)")

    @classmethod
    def has_files(cls, path: str | Path) -> bool:
        path = Path(path)
        return ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()) or (path / "tokenizer.json").is_file()

    @classmethod
    def default(cls) -> "Tokenizer":
        """The GPT-2 tokenizer shipped in the package (shared, built once per process)."""
        return _default()

    # -- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once (tiktoken spreads them over threads)."""
        return self._encode_batch(list(texts))

    def _check(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range [0, {self.vocab_size})")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if not isinstance(ids, list):
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors, arrays: plain ints
        self._check(ids)
        return b"".join([self._bytes[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return self._bytes[token_id]

    def token_str(self, token_id: int) -> str:
        """One token's text; a token holding part of a UTF-8 character shows U+FFFD for it."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def detokenizer(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, backend={self.backend!r}, source={self.source!r})"


@lru_cache(maxsize=1)
def _default() -> Tokenizer:
    return Tokenizer.from_dir(PACKAGED_DIR)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text without ever splitting a UTF-8 character.

    A character may span tokens (emoji, CJK: byte-level BPE cuts anywhere); its bytes are held
    until complete. Invalid bytes are replaced by U+FFFD as soon as they are known to be invalid,
    so the concatenated output (feeds + flush) always equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int]) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """The end of the stream: bytes of an unfinished character come out as U+FFFD."""
        return self._decoder.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._decoder.getstate()[0])
