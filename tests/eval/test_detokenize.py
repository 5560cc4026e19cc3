from gpt2serve.eval import detokenize as d


def test_wikitext_number_separators_and_punctuation():
    src = " M @-@ 82 begins at 1 @,@ 000 m , about 3 @.@ 5 km west of Fremont . \n"
    assert d.wikitext(src) == "M-82 begins at 1,000 m, about 3.5 km west of Fremont.\n"


def test_wikitext_contractions_brackets_quotes_headings():
    src = (" = = Career = = \n"
           " He said \" I 'm here \" ( in 2004 ) ; the players ' union didn 't care ' Ode to Joy ' . \n")
    out = d.wikitext(src)
    assert out.splitlines()[0] == "== Career =="
    assert '"I\'m here"' in out
    assert "(in 2004);" in out
    assert "players' union" in out
    assert "'Ode to Joy'." in out


def test_wikitext_keeps_unk_and_line_structure():
    src = " = Robert <unk> = \n \n Robert <unk> is an actor . \n"
    out = d.wikitext(src)
    assert out == "= Robert <unk> =\n\nRobert <unk> is an actor.\n"
    assert out.count("\n") == src.count("\n")  # one "\n" per original <eos>


def test_ptb():
    src = " no it was n't black monday \n the dow fell N points to $ N in the N crash capital cities\\/abc 's \n"
    assert d.ptb(src) == "no it wasn't black monday\nthe dow fell 1 points to $1 in the 1 crash capital cities/abc's\n"


def test_ptb_only_the_number_token_changes():
    # "n" (lower case) is a word, only the standalone upper-case N is the number token
    assert d.ptb(" n. y. N \n") == "n. y. 1\n"


def test_one_billion_word():
    src = 'The U.S. economy grew 3 % , he said ( citing " official " data ) and it is n\'t $ 5 .\n'
    assert d.one_billion_word(src) == 'The U.S. economy grew 3%, he said (citing "official" data) and it isn\'t $5.\n'


def test_cbt():
    src = "`` I do n't know , '' said the -LRB- old -RRB- man ."
    assert d.cbt(src) == '"I don\'t know," said the (old) man.'


def test_count_words_matches_published_sizes(real_data):
    wt2 = (real_data / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8")
    wt103 = (real_data / "wikitext-103" / "wiki.test.tokens").read_text(encoding="utf-8")
    ptb = (real_data / "ptb" / "ptb.test.txt").read_text(encoding="utf-8")
    assert d.count_words(wt2) == 245_569
    assert d.count_words(wt103) == 245_569
    assert d.count_words(ptb) == 82_430


def test_detokenizers_keep_every_line(real_data):
    wt2 = (real_data / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8")
    ptb = (real_data / "ptb" / "ptb.test.txt").read_text(encoding="utf-8")
    assert d.wikitext(wt2).count("\n") == wt2.count("\n") == 4358
    assert d.ptb(ptb).count("\n") == ptb.count("\n") == 3761
    # the artifacts the paper's de-tokenizers exist for are gone
    out = d.wikitext(wt2)
    for artifact in (" @-@ ", " @,@ ", " @.@ ", " , ", " . \n", " 's "):
        assert artifact not in out
