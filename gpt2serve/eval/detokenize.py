"""Invertible de-tokenizers: undo the word tokenization of the LM benchmarks before GPT-2 sees them.

The GPT-2 paper (section 3.1) runs "invertible de-tokenizers which remove as many of these
tokenization / pre-processing artifacts as possible" and reports gains of 2.5 to 5 perplexity from
them, but never published the rules. The de facto standard is the WikiText/PTB detokenizer of
Megatron-LM's zero-shot GPT-2 evaluation, also used by lm-evaluation-harness's `wikitext` task; we
follow it, with these deliberate differences (each is a bug in that version for our data):
- contractions (" 's", " n't", " 're", ...) are joined *before* quote pairing, so a possessive is
  never taken for an opening single quote; single quotes are paired only when both are standalone
  tokens (WikiText writes quotes as "' Ode to Joy '");
- quote / bracket pairing never crosses a line;
- PTB's number token `N` becomes `1` as a whole word ("about N million" -> "about 1 million";
  Megatron's `" N " -> "1 "` gave "about1 million"), then "$ 1" -> "$1", "# 1" -> "#1";
- `<unk>` is kept literally everywhere (the model pays for it; WikiText-2 has 15k of them).
Every function maps str -> str and keeps line breaks, so the per-line <eos> of the original still
has a token ("\n") to carry its loss. "Invertible" holds up to the whitespace these rules remove:
the original token sequence is recoverable from the output plus the (public) tokenization rules,
which is all the paper's argument needs (the probability of the dataset is still defined).
"""

from __future__ import annotations

import re

# " 's" " 're" " 've" " 'll" " 'd" " 'm" " n't" " 't" -> attached to the previous word.
# WikiText splits "don 't", PTB/CBT/1BW "do n't": both end up "don't".
_CONTRACTION = re.compile(r" (n't|'(?:s|re|ve|ll|d|m|t))(?=\s|$)", re.IGNORECASE)
# Plural possessive: "players ' union" -> "players' union" (a standalone ' after a word ending in s).
_PLURAL_POSSESSIVE = re.compile(r"(?<=s) '(?=\s)")


def _join_contractions(s: str) -> str:
    s = _CONTRACTION.sub(r"\1", s)
    return _PLURAL_POSSESSIVE.sub("'", s)


def _pair(s: str, open_: str, close: str) -> str:
    """Remove the spaces just inside matched pairs on one line: "( a b )" -> "(a b)"."""
    o, c = re.escape(open_), re.escape(close)
    inner = f"[^{o}{c}\\n]" if open_ != close else f"[^{o}\\n]"
    return re.sub(f"{o}[ \\t]*({inner}*?)[ \\t]*{c}", f"{open_}\\1{close}", s)


def _line_edges(s: str) -> str:
    # Each line of these files starts and ends with a space (" = Title = \n").
    s = re.sub(r"[ \t]+\n", "\n", s)
    s = re.sub(r"\n[ \t]+", "\n", s)
    return s.lstrip(" \t")


def wikitext(s: str) -> str:
    """WikiText (Merity et al. 2016) tokenized text -> natural text."""
    # number separators: "1 @,@ 000" "3 @.@ 5" "M @-@ 82"
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = _join_contractions(s)
    # punctuation attaches to the word before it
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = _pair(s, "(", ")")
    s = _pair(s, "[", "]")
    s = _pair(s, "{", "}")
    s = _pair(s, '"', '"')
    # single quotes: only a pair of standalone ' tokens is a quotation
    s = re.sub(r"(^|[ \n])' ([^'\n]*?) '(?=[ \n.,;:!?)\]]|$)", r"\1'\2'", s)
    # section headings: " = = Career = = " -> "== Career =="
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    return _line_edges(s)


def ptb(s: str) -> str:
    """Penn Treebank (Mikolov's LM version: lower-case, no punctuation, `N` for numbers)."""
    s = s.replace("\\/", "/")  # PTB escapes slashes: "cities\/abc"
    s = _join_contractions(s)
    s = re.sub(r"(?<!\S)N(?!\S)", "1", s)  # only uppercase letter in the corpus: the number token
    s = s.replace("$ 1", "$1").replace("# 1", "#1")
    return _line_edges(s)


def one_billion_word(s: str) -> str:
    """One Billion Word benchmark (Moses-style tokenized news sentences, one per line)."""
    s = _join_contractions(s)
    s = re.sub(r" ([.,;:!?%)\]}])(?=\s|$)", r"\1", s)  # closing punctuation attaches left
    s = re.sub(r"(^|\s)([(\[{$]) ", r"\1\2", s)  # opening brackets and $ attach right
    s = _pair(s, '"', '"')
    return _line_edges(s)


def cbt(s: str) -> str:
    """Children's Book Test (PTB-style tokens: `` '' quotes, -LRB- -RRB-, spaced punctuation)."""
    s = s.replace("-LRB-", "(").replace("-RRB-", ")").replace("-LSB-", "[").replace("-RSB-", "]")
    s = s.replace("``", '"').replace("''", '"')
    s = _join_contractions(s)
    s = re.sub(r" ([.,;:!?)\]}])(?=\s|$|[\"'])", r"\1", s)
    s = re.sub(r"(^|\s)([(\[{]) ", r"\1\2", s)
    s = _pair(s, '"', '"')
    return _line_edges(s)


def identity(s: str) -> str:
    return s


def count_words(original: str) -> int:
    """Words of the original tokenized text plus one <eos> per line: the usual normaliser.

    WikiText-2/103 test: 245,569; PTB test: 82,430 (the published sizes).
    """
    return sum(len(line.split()) + 1 for line in original.splitlines())
