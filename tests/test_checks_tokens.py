"""Chapter 1's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

from collections import Counter

import pytest
import torch

from kvlab.checks.tokens import (check_bpe_encode, check_char_tokenizer, check_get_batch, check_merge,
                                 check_most_frequent_pair)
from kvlab.data import get_batch


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


# --------------------------------------------------------------------------- character tokenizer


def char_tokenizer_solution(text):
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return (lambda s: [stoi[c] for c in s]), (lambda ids: "".join(chars[i] for i in ids))


def char_tokenizer_first_seen(text):  # ids in order of first appearance: round-trips, wrong ids
    chars = list(dict.fromkeys(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return (lambda s: [stoi[c] for c in s]), (lambda ids: "".join(chars[i] for i in ids))


def char_tokenizer_set_order(text):  # the order of a set: changes from run to run
    chars = list(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return (lambda s: [stoi[c] for c in s]), (lambda ids: "".join(chars[i] for i in ids))


def char_tokenizer_one_based(text):  # ids 1..V: an embedding table of V rows has no row V
    chars = sorted(set(text))
    stoi = {c: i + 1 for i, c in enumerate(chars)}
    return (lambda s: [stoi[c] for c in s]), (lambda ids: "".join(chars[i - 1] for i in ids))


def char_tokenizer_lossy_decode(text):  # decode drops newlines
    encode, decode = char_tokenizer_solution(text)
    return encode, (lambda ids: decode(ids).replace("\n", ""))


def char_tokenizer_returns_class(text):  # an object, not the (encode, decode) pair asked for
    return text


def test_char_tokenizer_check_passes_a_solution(capsys):
    check_char_tokenizer(char_tokenizer_solution)
    assert "my_char_tokenizer: all checks passed" in capsys.readouterr().out


def test_char_tokenizer_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_char_tokenizer(stub))


@pytest.mark.parametrize("wrong", [char_tokenizer_first_seen, char_tokenizer_set_order])
def test_char_tokenizer_check_wants_sorted_ids(wrong):
    with pytest.raises(AssertionError, match="sorted"):
        check_char_tokenizer(wrong)


def test_char_tokenizer_check_wants_ids_from_zero():
    with pytest.raises(AssertionError, match="should be 0"):
        check_char_tokenizer(char_tokenizer_one_based)


def test_char_tokenizer_check_wants_an_exact_round_trip():
    with pytest.raises(AssertionError, match="did not give the text back"):
        check_char_tokenizer(char_tokenizer_lossy_decode)


def test_char_tokenizer_check_wants_a_pair():
    with pytest.raises(AssertionError, match="pair of functions"):
        check_char_tokenizer(char_tokenizer_returns_class)


# --------------------------------------------------------------------------- most frequent pair


def most_frequent_pair_solution(ids):
    counts = Counter(zip(ids, ids[1:]))
    return max(counts, key=counts.get)


def most_frequent_pair_largest_on_tie(ids):  # ties go to the largest pair, not the first seen
    counts = Counter(zip(ids, ids[1:]))
    return max(counts, key=lambda p: (counts[p], p))


def most_frequent_pair_skips_last(ids):  # off by one: the last pair is never counted
    counts = Counter((ids[i], ids[i + 1]) for i in range(len(ids) - 2))
    return max(counts, key=counts.get) if counts else (ids[0], ids[1])


def most_frequent_pair_reversed(ids):  # (b, a) instead of (a, b)
    a, b = most_frequent_pair_solution(ids)
    return b, a


def test_most_frequent_pair_check_passes_a_solution(capsys):
    check_most_frequent_pair(most_frequent_pair_solution)
    assert "my_most_frequent_pair: all checks passed" in capsys.readouterr().out


def test_most_frequent_pair_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_most_frequent_pair(stub))


def test_most_frequent_pair_check_names_the_tie_break():
    with pytest.raises(AssertionError, match="tie"):
        check_most_frequent_pair(most_frequent_pair_largest_on_tie)


def test_most_frequent_pair_check_catches_the_missing_last_pair():
    with pytest.raises(AssertionError, match="last pair"):
        check_most_frequent_pair(most_frequent_pair_skips_last)


def test_most_frequent_pair_check_wants_the_pair_in_order():
    with pytest.raises(AssertionError, match="not a pair of neighbours"):
        check_most_frequent_pair(most_frequent_pair_reversed)


# --------------------------------------------------------------------------- merge


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


def merge_overlapping(ids, pair, new_id):  # merges at every matching position: 1, 1, 1 -> new, new
    out = []
    for i in range(len(ids) - 1):
        out.append(new_id if (ids[i], ids[i + 1]) == tuple(pair) else ids[i])
    return out + ids[-1:] if ids and (len(ids) < 2 or (ids[-2], ids[-1]) != tuple(pair)) else out


def merge_drops_last(ids, pair, new_id):  # off by one: the loop stops before the last id
    out, i = [], 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_in_place(ids, pair, new_id):  # right answer, but it edits the caller's list
    result = merge_solution(ids, pair, new_id)
    ids[:] = result
    return ids


def merge_first_only(ids, pair, new_id):  # list.index finds the first occurrence only
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            return ids[:i] + [new_id] + ids[i + 2:]
    return list(ids)


def merge_as_text(ids, pair, new_id):  # str.replace on "1 2 3": also matches inside "11 2" or "1 23"
    text = " ".join(map(str, ids)).replace(f"{pair[0]} {pair[1]}", str(new_id))
    return [int(t) for t in text.split()]


def test_merge_check_passes_a_solution(capsys):
    check_merge(merge_solution)
    assert "my_merge: all checks passed" in capsys.readouterr().out


def test_merge_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_merge(stub))


def test_merge_check_catches_overlapping_merges():
    with pytest.raises(AssertionError, match="one merge only"):
        check_merge(merge_overlapping)


def test_merge_check_catches_the_lost_last_id():
    with pytest.raises(AssertionError, match="end of the list"):
        check_merge(merge_drops_last)


def test_merge_check_catches_a_single_merge():
    with pytest.raises(AssertionError, match="not merged"):
        check_merge(merge_first_only)


def test_merge_check_catches_text_replacement():
    with pytest.raises(AssertionError, match="expected"):
        check_merge(merge_as_text)


def test_merge_check_wants_the_input_untouched():
    with pytest.raises(AssertionError, match="changed the ids"):
        check_merge(merge_in_place)


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


# --------------------------------------------------------------------------- batches


def get_batch_solution(data, batch_size, block_size, generator):
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + block_size + 1] for s in starts.tolist()])
    return x, y


def get_batch_kvlab(data, batch_size, block_size, generator):
    return get_batch(data, batch_size, block_size, generator=generator)


def get_batch_not_shifted(data, batch_size, block_size, generator):
    x, _ = get_batch_solution(data, batch_size, block_size, generator)
    return x, x.clone()


def get_batch_past_the_end(data, batch_size, block_size, generator):  # one offset too many
    starts = torch.randint(len(data) - block_size + 1, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + block_size + 1] for s in starts.tolist()])
    return x, y


def get_batch_clamped_past_the_end(data, batch_size, block_size, generator):  # pads the overrun
    starts = torch.randint(len(data) - block_size + 1, (batch_size,), generator=generator)
    padded = torch.cat([data, data[-1:]])
    x = torch.stack([padded[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([padded[s + 1:s + block_size + 1] for s in starts.tolist()])
    return x, y


def get_batch_one_short(data, batch_size, block_size, generator):  # the last window never comes up
    n_starts = max(len(data) - block_size - 1, 1)
    starts = torch.randint(n_starts, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + block_size + 1] for s in starts.tolist()])
    return x, y


def get_batch_global_rng(data, batch_size, block_size, generator):  # ignores the generator
    starts = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + block_size + 1] for s in starts.tolist()])
    return x, y


def get_batch_int32(data, batch_size, block_size, generator):
    x, y = get_batch_solution(data, batch_size, block_size, generator)
    return x.int(), y.int()


@pytest.mark.parametrize("solution", [get_batch_solution, get_batch_kvlab])
def test_get_batch_check_passes_solutions(solution, capsys):
    check_get_batch(solution)
    assert "my_get_batch: all checks passed" in capsys.readouterr().out


def test_get_batch_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_get_batch(stub))


def test_get_batch_check_catches_unshifted_targets():
    with pytest.raises(AssertionError, match="shifted by one"):
        check_get_batch(get_batch_not_shifted)


@pytest.mark.parametrize("wrong", [get_batch_past_the_end, get_batch_clamped_past_the_end])
def test_get_batch_check_catches_windows_past_the_end(wrong):
    with pytest.raises(AssertionError, match="block_size \\+ 1"):
        check_get_batch(wrong)


def test_get_batch_check_catches_offsets_one_short():
    with pytest.raises(AssertionError, match="one short"):
        check_get_batch(get_batch_one_short)


def test_get_batch_check_wants_the_generator():
    with pytest.raises(AssertionError, match="generator"):
        check_get_batch(get_batch_global_rng)


def test_get_batch_check_wants_int64():
    with pytest.raises(AssertionError, match="torch.long"):
        check_get_batch(get_batch_int32)


def test_checks_leave_the_global_random_state_alone():
    state = torch.random.get_rng_state()
    check_get_batch(get_batch_solution)
    check_merge(merge_solution)
    assert torch.equal(torch.random.get_rng_state(), state)
