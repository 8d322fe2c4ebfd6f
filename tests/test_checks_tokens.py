"""Chapter 1's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import codecs
import math

import pytest
import torch

import kvlab
from kvlab.course.checks.tokens import (check_bpe_encode, check_domain_ratio, check_nats_per_char, check_stream_decode,
                                        other_text)
from kvlab.data import load_shakespeare_text, train_val_split


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


def merge_solution(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# --------------------------------------------------------------------------- BPE encode


def bpe_encode_solution(text, merges):
    ids = list(text.encode("utf-8"))
    for pair, new_id in sorted(merges.items(), key=lambda item: item[1]):
        ids = merge_solution(ids, pair, new_id)
    return ids


def bpe_encode_lowest_rank_first(text, merges):  # minbpe's loop: also right
    ids = list(text.encode("utf-8"))
    while len(ids) >= 2:
        pairs = set(zip(ids, ids[1:]))
        pair = min(pairs, key=lambda p: merges.get(p, float("inf")))
        if pair not in merges:
            break
        ids = merge_solution(ids, pair, merges[pair])
    return ids


def bpe_encode_dict_order(text, merges):  # trusts the dict's order
    ids = list(text.encode("utf-8"))
    for pair, new_id in merges.items():
        ids = merge_solution(ids, pair, new_id)
    return ids


def bpe_encode_code_points(text, merges):  # starts from characters, not bytes
    ids = [ord(c) for c in text]
    for pair, new_id in sorted(merges.items(), key=lambda item: item[1]):
        ids = merge_solution(ids, pair, new_id)
    return ids


def bpe_encode_one_pass(text, merges):  # a single left-to-right pass, merging any known pair
    ids, out, i = list(text.encode("utf-8")), [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) in merges:
            out.append(merges[(ids[i], ids[i + 1])])
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


@pytest.mark.parametrize("solution", [bpe_encode_solution, bpe_encode_lowest_rank_first])
def test_bpe_encode_check_passes_solutions(solution, capsys):
    check_bpe_encode(solution)
    assert "my_bpe_encode: all checks passed" in capsys.readouterr().out


def test_bpe_encode_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_bpe_encode(stub))


def test_bpe_encode_check_wants_the_learned_order():
    with pytest.raises(AssertionError, match="order they were learned"):
        check_bpe_encode(bpe_encode_dict_order)


def test_bpe_encode_check_wants_bytes():
    with pytest.raises(AssertionError, match="UTF-8 bytes"):
        check_bpe_encode(bpe_encode_code_points)


def test_bpe_encode_check_catches_a_single_pass():
    with pytest.raises(AssertionError, match="before the next merge"):
        check_bpe_encode(bpe_encode_one_pass)


# --------------------------------------------------------------------------- streaming decode


def stream_solution(pieces):
    decoder = codecs.getincrementaldecoder("utf-8")()
    return [decoder.decode(piece) for piece in pieces]


def stream_by_hand(pieces):  # the notebook's approach: cut before an unfinished character
    out, pending = [], b""
    for piece in pieces:
        pending += piece
        for cut in range(len(pending), max(len(pending) - 4, -1), -1):
            try:
                text = pending[:cut].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        out.append(text)
        pending = pending[cut:]
    return out


def stream_replace(pieces):  # each token decoded on its own: half characters become �
    return [piece.decode("utf-8", errors="replace") for piece in pieces]


def stream_ignore(pieces):  # each token decoded on its own, broken bytes dropped
    return [piece.decode("utf-8", errors="ignore") for piece in pieces]


def stream_all_at_the_end(pieces):  # right text, shown too late
    return [""] * (len(pieces) - 1) + [b"".join(pieces).decode("utf-8")]


@pytest.mark.parametrize("solution", [stream_solution, stream_by_hand])
def test_stream_decode_check_passes_solutions(solution, capsys):
    check_stream_decode(solution)
    assert "my_stream_decode: all checks passed" in capsys.readouterr().out


def test_stream_decode_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_stream_decode(stub))


@pytest.mark.parametrize("wrong, match", [
    (stream_replace, "replacement character"),
    (stream_ignore, "no byte may be dropped"),
    (stream_all_at_the_end, "too late"),
    (lambda pieces: "".join(stream_solution(pieces)), "one string per token"),
])
def test_stream_decode_check_catches_wrong_answers(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_stream_decode(wrong)


# --------------------------------------------------------------------------- nats per character


def test_nats_per_char_check_passes_a_solution(capsys):
    check_nats_per_char(lambda nats, n_tokens, n_chars: nats * n_tokens / n_chars)
    assert "my_nats_per_char: all checks passed" in capsys.readouterr().out


def test_nats_per_char_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_nats_per_char(stub))


@pytest.mark.parametrize("wrong, match", [
    (lambda nats, n_tokens, n_chars: nats * n_chars / n_tokens, "the wrong way"),
    (lambda nats, n_tokens, n_chars: nats * n_tokens / n_chars / math.log(2), "in bits"),
    (lambda nats, n_tokens, n_chars: nats / n_chars, "total loss"),
    (lambda nats, n_tokens, n_chars: "1.5", "return a number"),
])
def test_nats_per_char_check_catches_wrong_answers(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_nats_per_char(wrong)


# --------------------------------------------------------------------------- the domain experiment


@pytest.fixture(scope="module")
def domain_ratios():
    """(ratio on other_text, ratio on Shakespeare's validation split, our BPE's chars per token on
    other_text), measured the way a learner would, with the chapter's tokenizers."""
    train_text, val_text = train_val_split(load_shakespeare_text())
    bpe = kvlab.BPETokenizer.train(train_text, vocab_size=1024)
    gpt2 = kvlab.GPT2Tokenizer()
    text = other_text()
    return (len(bpe.encode(text)) / len(gpt2.encode(text)), len(bpe.encode(val_text)) / len(gpt2.encode(val_text)),
            len(text) / len(bpe.encode(text)))


def test_domain_ratio_check_passes_the_measurement(domain_ratios, capsys):
    check_domain_ratio(domain_ratios[0])
    assert "my_token_ratio: all checks passed" in capsys.readouterr().out
    assert domain_ratios[0] > domain_ratios[1]  # the gap grows away from Shakespeare


def test_domain_ratio_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_domain_ratio(None))


@pytest.mark.parametrize("which, match", [
    (lambda r: r[1], "Shakespeare's validation text"),
    (lambda r: 1 / r[0], "upside down"),
    (lambda r: r[2], "characters per token"),
    (lambda r: r[0] + 0.3, "divide the first count by the second"),
])
def test_domain_ratio_check_catches_wrong_answers(domain_ratios, which, match):
    with pytest.raises(AssertionError, match=match):
        check_domain_ratio(which(domain_ratios))


def test_checks_leave_the_global_random_state_alone():
    state = torch.random.get_rng_state()
    check_bpe_encode(bpe_encode_solution)
    check_stream_decode(stream_solution)
    assert torch.equal(torch.random.get_rng_state(), state)
