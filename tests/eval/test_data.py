import zipfile

import pytest

from gpt2serve.eval import data


def test_search_order_data_then_env_then_shared(tmp_path, monkeypatch):
    a, b, cwd = tmp_path / "a", tmp_path / "b", tmp_path / "work" / "main"
    shared = tmp_path / "work" / "shared" / "data" / "eval"
    for root in (a, b, shared):
        (root / "ptb").mkdir(parents=True)
        (root / "ptb" / "ptb.test.txt").write_text(" x \n")
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(data.ENV_VAR, str(b))
    assert data.find("ptb", a) == a / "ptb" / "ptb.test.txt"
    assert data.find("ptb") == b / "ptb" / "ptb.test.txt"
    monkeypatch.delenv(data.ENV_VAR)
    assert data.find("ptb").resolve() == (shared / "ptb" / "ptb.test.txt").resolve()


def test_flat_layout_is_accepted(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    (tmp_path / "lambada_test.jsonl").write_text('{"text": "a b"}\n')
    assert data.find("lambada", tmp_path) == tmp_path / "lambada_test.jsonl"


@pytest.mark.parametrize("task, expect", [
    ("enwik8", "mattmahoney.net/dc/enwik8.zip"),
    ("text8", "mattmahoney.net/dc/text8.zip"),
    ("1bw", "news.en.heldout-00000-of-00050"),
    ("cbt-cn", "cbtest_CN_test_2500ex.txt"),
    ("cbt-ne", "CBTest.tgz"),
    ("lambada", "lambada_test.jsonl"),
])
def test_missing_file_names_the_file_the_places_and_the_source(tmp_path, monkeypatch, task, expect):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.MissingDataError) as e:
        data.find(task, tmp_path / "nowhere")
    msg = str(e.value)
    spec = data.FILES[task]
    assert f"{spec.subdir}/{spec.names[0]}" in msg
    assert str(tmp_path / "nowhere") in msg
    assert expect in msg
    assert "--data" in msg


def test_cli_reports_missing_data_before_loading_a_model(tmp_path, monkeypatch, capsys):
    from gpt2serve.eval.cli import main

    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["enwik8", "cbt-cn", "--model", "does-not-exist", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "enwik8/enwik8" in err and "cbt/cbtest_CN_test_2500ex.txt" in err


def _enwik8_like(n_lines: int) -> bytes:
    # XML-ish lines with multi-byte characters, so the 95% cut can land inside one
    lines = [f"<page id='{i}'>Zürich – 東京 line {i}</page>\n" for i in range(n_lines)]
    return "".join(lines).encode("utf-8")


def test_enwik8_test_split_is_last_5_percent_cut_to_whole_characters(tmp_path):
    raw = _enwik8_like(400)
    (tmp_path / "enwik8").write_bytes(raw)
    text = data.read_enwik8_test(tmp_path / "enwik8")
    tail = raw[len(raw) - len(raw) // 20 :]
    b = text.encode("utf-8")
    assert tail.endswith(b) and len(tail) - len(b) <= 3  # only a broken leading character may go
    assert raw.endswith(b)
    # zip gives the same text; --limit keeps whole lines
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as z:
        z.writestr("enwik8", raw)
    assert data.read_enwik8_test(tmp_path / "enwik8.zip") == text
    first3 = data.read_enwik8_test(tmp_path / "enwik8", limit=3)
    assert text.startswith(first3) and first3.count("\n") == 3


def test_text8_test_split_and_word_limit(tmp_path):
    words = [f"w{'abcdefghij'[i % 10]}{'xyz'[i % 3]}" for i in range(2000)]
    raw = (" " + " ".join(words)).encode("ascii")
    (tmp_path / "text8").write_bytes(raw)
    text = data.read_text8_test(tmp_path / "text8")
    assert text.encode() == raw[len(raw) - len(raw) // 20 :]
    five = data.read_text8_test(tmp_path / "text8", limit=5)
    assert text.startswith(five) and len(five.split()) == 5 and not five.endswith(" ")


def test_cbt_reader(tmp_path):
    ex = "".join(f"{i} Sentence number {i} , said Tom .\n" for i in range(1, 21))
    ex += "21 Then XXXXX went home .\tTom\t\tAnn|Bob|Tom|Sue|Max|Lia|Ned|Pam|Rex|Zoe\n\n"
    (tmp_path / "cbt.txt").write_text(ex * 3)
    got = data.read_cbt(tmp_path / "cbt.txt")
    assert len(got) == 3
    assert len(got[0].context) == 20 and got[0].context[0] == "Sentence number 1 , said Tom ."
    assert got[0].query == "Then XXXXX went home ." and got[0].answer == "Tom" and len(got[0].candidates) == 10
    assert len(data.read_cbt(tmp_path / "cbt.txt", limit=2)) == 2


def test_cbt_reader_rejects_an_answer_outside_the_candidates(tmp_path):
    ex = "".join(f"{i} s {i} .\n" for i in range(1, 21)) + "21 XXXXX .\tTom\t\tAnn|Bob\n"
    (tmp_path / "cbt.txt").write_text(ex)
    with pytest.raises(ValueError, match="malformed"):
        data.read_cbt(tmp_path / "cbt.txt")


def test_lambada_reader(real_data):
    texts = data.read_lambada(real_data / "lambada" / "lambada_test.jsonl")
    assert len(texts) == 5153 and texts[0].endswith("I don't care about signs")
    assert len(data.read_lambada(real_data / "lambada" / "lambada_test.jsonl", limit=7)) == 7
