import pytest

from gpt2serve.eval.scoring import get_tokenizer
from gpt2serve.eval.tasks import EOT, LambadaTask, encode_pair, left_truncate, rolling_windows


@pytest.mark.parametrize("n", [1, 5, 127, 128, 129, 300, 1000])
@pytest.mark.parametrize("window, stride", [(128, 64), (128, 32), (16, 15), (1024, 512)])
def test_rolling_windows_score_every_token_once_with_enough_context(n, window, stride):
    ids = list(range(n))
    reqs = rolling_windows(ids, window, stride)
    stream = [EOT] + ids
    scored = []
    for ctx, cont in reqs:
        assert 1 <= len(ctx) and len(ctx) + len(cont) <= window
        start = len(scored) + 1  # position of cont[0] in the stream
        assert ctx == stream[start - len(ctx) : start]  # the context is what precedes, contiguous
        # at least `window - stride` tokens of context whenever that many precede (first window: all)
        assert len(ctx) >= min(start, window - stride) or start + len(cont) <= window
        scored += cont
    assert scored == ids
    if n + 1 > window:
        assert all(len(c) + len(k) == window for c, k in reqs)  # every window is full


def test_stride_512_gives_512_tokens_of_context():
    reqs = rolling_windows(list(range(3000)), 1024, 512)
    assert [len(c) for c, _ in reqs] == [1, 512, 512, 512, 1024 - (3001 - 2560)]
    assert [len(k) for _, k in reqs] == [1023, 512, 512, 512, 3001 - 2560]


def test_encode_pair_moves_trailing_space_and_matches_whole_string():
    tok = get_tokenizer()
    ctx, cont = encode_pair(tok, "He looked at the ", "dog")
    assert ctx == tok.encode("He looked at the") and cont == tok.encode(" dog")
    ctx, cont = encode_pair(tok, "He looked at the", " dog")
    assert ctx + cont == tok.encode("He looked at the dog")


def test_lambada_split_and_truncation():
    assert LambadaTask.split("a b  c d") == ("a b  c", " d")
    assert left_truncate((list(range(10)), [7, 8]), 5) == ([7, 8, 9], [7, 8])
    with pytest.raises(ValueError):
        left_truncate(([1], [1, 2, 3]), 3)


def test_tokenizer_is_gpt2():
    tok = get_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") != [50256]  # never parsed as the special token
