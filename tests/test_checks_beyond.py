"""Chapter 10's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import math

import pytest
import torch

from kvlab.course.checks.beyond import (ROUND_K, ROUND_P, ROUND_Q, acceptance_rate_k, check_accept_sampled,
                                        check_acceptance_rate, check_greedy_round, check_int8_bytes_per_token,
                                        check_int8_parting, check_int8_quantizer, check_reorder_cache,
                                        check_tokens_per_round, draws_needed, int8_parting, tokens_per_round_simulated)


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


# --------------------------------------------------------------------------- reorder the cache


def reorder_solution(cache, index):
    for layer in cache.layers:
        n = layer.length
        layer.k[:, :, :n] = layer.k[:, :, :n].index_select(0, index)
        layer.v[:, :, :n] = layer.v[:, :, :n].index_select(0, index)


def reorder_whole_tensors(cache, index):  # also right: new tensors, whole buffers
    for layer in cache.layers:
        layer.k, layer.v = layer.k[index], layer.v[index]


def reorder_keys_only(cache, index):
    for layer in cache.layers:
        layer.k = layer.k[index]


def reorder_first_layer_only(cache, index):
    layer = cache.layers[0]
    layer.k, layer.v = layer.k[index], layer.v[index]


def reorder_scatter(cache, index):  # sends row i to index[i] instead of fetching it
    for layer in cache.layers:
        k, v = layer.k.clone(), layer.v.clone()
        layer.k[index], layer.v[index] = k, v


def reorder_nothing(cache, index):
    pass


def reorder_and_reset(cache, index):
    reorder_solution(cache, index)
    cache.reset()


def test_reorder_check_passes_solutions(capsys):
    check_reorder_cache(reorder_solution)
    check_reorder_cache(reorder_whole_tensors)
    assert capsys.readouterr().out.count("my_reorder_cache: all checks passed") == 2


def test_reorder_check_reports_the_stub_as_not_done(capsys):
    check_reorder_cache(stub)  # does not raise
    assert "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, hint", [
    (reorder_keys_only, "values"),
    (reorder_first_layer_only, "every layer"),
    (reorder_scatter, "wrong way"),
    (reorder_nothing, "not reordered"),
    (reorder_and_reset, "cache.length"),
])
def test_reorder_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_reorder_cache(wrong)


# --------------------------------------------------------------------------- the experiment


@pytest.fixture(scope="module")
def measured():
    return acceptance_rate_k(8), acceptance_rate_k(4)


def test_acceptance_check_passes_the_measured_rate(measured, capsys):
    check_acceptance_rate(measured[0]["acceptance_rate"])
    check_acceptance_rate(round(measured[0]["acceptance_rate"], 2))
    assert capsys.readouterr().out.count("my_acceptance_rate: all checks passed") == 2


def test_acceptance_check_reports_none_as_not_done(capsys):
    check_acceptance_rate(None)
    assert "not done yet" in capsys.readouterr().out


def test_acceptance_check_fails_wrong_answers(measured):
    at_8, at_4 = measured
    if abs(at_8["acceptance_rate"] - at_4["acceptance_rate"]) > 0.02:
        with pytest.raises(AssertionError, match="k=4"):
            check_acceptance_rate(at_4["acceptance_rate"])
    with pytest.raises(AssertionError, match="percentage"):
        check_acceptance_rate(100 * at_8["acceptance_rate"])
    with pytest.raises(AssertionError, match="tokens per target forward"):
        check_acceptance_rate(at_8["tokens_per_target_forward"])
    with pytest.raises(AssertionError, match="k=8"):
        check_acceptance_rate(at_8["acceptance_rate"] + 0.1)
    with pytest.raises(AssertionError, match="number"):
        check_acceptance_rate("0.5")


# --------------------------------------------------------------------------- int8 bytes per token


def test_int8_bytes_check_passes_the_answer(capsys):
    check_int8_bytes_per_token(12 * 2 * 12 * (64 + 2 * (2 + 2)))  # two groups of 32: a float16 step and minimum each
    assert "my_int8_bytes_per_token: all checks passed" in capsys.readouterr().out


def test_int8_bytes_check_reports_none_as_not_done(capsys):
    check_int8_bytes_per_token(None)
    assert "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, hint", [
    (12 * 12 * 72, "values"),
    (12 * 2 * 12 * 64, "steps and minimums"),
    (12 * 2 * 12 * 68, "float16 minimum"),
    (12 * 2 * 12 * 80, "2 bytes each"),
    (12 * 2 * (768 + 8), "each head"),
    (12 * 2 * 12 * 64 * 4, "float32 cache"),
    (12345, "not the int8"),
    ("19584", "number"),
])
def test_int8_bytes_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_int8_bytes_per_token(wrong)


# --------------------------------------------------------------------------- build step: one greedy round


def round_solution(target, cache, tokens, guesses):
    L = len(tokens)
    x = torch.tensor([[tokens[-1]] + guesses])  # (1, m + 1): the newest token and the guesses
    best = target(x, cache, input_pos=L - 1)[0].argmax(-1).tolist()  # the target's choice after each
    n = 0
    while n < len(guesses) and guesses[n] == best[n]:
        n += 1
    cache.crop(L + n)  # keep tokens[:-1], the newest token and the n kept guesses
    return guesses[:n] + [best[n]]


def round_without_bonus(target, cache, tokens, guesses):
    new = round_solution(target, cache, tokens, guesses)
    return new[:-1] if len(new) == len(guesses) + 1 and guesses else new


def round_not_rolled_back(target, cache, tokens, guesses):
    L = len(tokens)
    best = target(torch.tensor([[tokens[-1]] + guesses]), cache, input_pos=L - 1)[0].argmax(-1).tolist()
    n = 0
    while n < len(guesses) and guesses[n] == best[n]:
        n += 1
    return guesses[:n] + [best[n]]


def round_one_forward_per_guess(target, cache, tokens, guesses):
    L, new = len(tokens), []
    for i, x in enumerate([tokens[-1]] + guesses):
        best = int(target(torch.tensor([[x]]), cache, input_pos=L - 1 + i)[0, -1].argmax())
        if i == len(guesses) or guesses[i] != best:
            cache.crop(L + i)
            return new + [best]
        new.append(guesses[i])


def round_tensors_assigned(target, cache, tokens, guesses):
    new = round_solution(target, cache, tokens, guesses)
    for layer in cache.layers:
        layer.k, layer.v = layer.k.clone(), layer.v.clone()
    return new


def round_keeps_guesses_without_correction(target, cache, tokens, guesses):
    new = round_solution(target, cache, tokens, guesses)
    return new if len(new) == len(guesses) + 1 else new[:-1] or new


def test_greedy_round_check_passes_the_solution(capsys):
    check_greedy_round(round_solution)
    assert "my_greedy_round: all checks passed" in capsys.readouterr().out


def test_greedy_round_check_reports_the_stub_as_not_done(capsys):
    check_greedy_round(stub)
    assert "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, hint", [
    (round_without_bonus, "bonus"),
    (round_not_rolled_back, "cache.crop"),
    (round_one_forward_per_guess, "ONE forward"),
    (round_tensors_assigned, "tensors were replaced"),
    (round_keeps_guesses_without_correction, "target's own token"),
])
def test_greedy_round_check_fails_wrong_rounds(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_greedy_round(wrong)


# --------------------------------------------------------------------------- build step: the acceptance rule


def accept_solution(p, q, guesses, generator):
    for i, g in enumerate(guesses):
        if float(torch.rand((), generator=generator)) < min(1.0, float(p[i, g] / q[i, g])):
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(guesses), int(torch.multinomial(p[len(guesses)], 1, generator=generator))


def accept_resample_from_p(p, q, guesses, generator):
    for i, g in enumerate(guesses):
        if float(torch.rand((), generator=generator)) < min(1.0, float(p[i, g] / q[i, g])):
            continue
        return i, int(torch.multinomial(p[i], 1, generator=generator))
    return len(guesses), int(torch.multinomial(p[len(guesses)], 1, generator=generator))


def accept_if_p_at_least_q(p, q, guesses, generator):
    for i, g in enumerate(guesses):
        if p[i, g] >= q[i, g]:
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(guesses), int(torch.multinomial(p[len(guesses)], 1, generator=generator))


def accept_without_bonus(p, q, guesses, generator):
    n, nxt = accept_solution(p, q, guesses, generator)
    return (n, None) if n == len(guesses) else (n, nxt)


def accept_bonus_from_wrong_row(p, q, guesses, generator):
    n, nxt = accept_solution(p, q, guesses, generator)
    if n == len(guesses):
        nxt = int(torch.multinomial(p[n - 1], 1, generator=generator))
    return n, nxt


def accept_global_rng(p, q, guesses, generator):
    return accept_solution(p, q, guesses, None)


def test_draws_needed_keeps_a_false_fail_below_one_in_a_million():
    n = draws_needed(4)
    # Bretagnolle-Huber-Carol: P(TV >= t) <= 2^V exp(-2 n t^2), for each of the check's 2 tests.
    assert 2 * 2 ** 4 * math.exp(-2 * n * 0.05 ** 2) < 1e-6
    assert 2 * 2 ** 4 * math.exp(-2 * (n - 200) * 0.05 ** 2) > 1e-6 * 0.5  # and not wildly more draws than that


def test_accept_check_passes_the_solution(capsys):
    check_accept_sampled(accept_solution)
    assert "my_accept_sampled: all checks passed" in capsys.readouterr().out


def test_accept_check_reports_the_stub_as_not_done(capsys):
    check_accept_sampled(stub)
    assert "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, hint", [
    (accept_resample_from_p, "residual"),
    (accept_if_p_at_least_q, r"min\(1, p/q\)"),
    (accept_without_bonus, "bonus token was dropped"),
    (accept_bonus_from_wrong_row, r"p\[m - 1\]"),
    (accept_global_rng, "generator you are given"),
])
def test_accept_check_fails_wrong_rules(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_accept_sampled(wrong)


# --------------------------------------------------------------------------- build step: the int8 quantizer


def float16_down(x):
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def float16_up(x):
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def quantize_solution(x, rounding=torch.round, per_tensor=False, zero_step=False, naive_float16=False):
    xg = x.float().unflatten(-1, (-1, 32))  # (..., G, 32)
    lo_f, hi_f = xg.amin(-1), xg.amax(-1)
    if per_tensor:
        lo_f, hi_f = torch.full_like(lo_f, float(x.min())), torch.full_like(hi_f, float(x.max()))
    lo = lo_f.half() if naive_float16 else float16_down(lo_f)
    step = ((hi_f - lo.float()) / 255).half() if naive_float16 else float16_up((hi_f - lo.float()) / 255)
    if not zero_step:
        step = torch.where(step > 0, step, torch.ones_like(step))
    q = rounding((xg - lo.float()[..., None]) / step.float()[..., None]).clamp(0, 255) - 128
    return q.to(torch.int8).flatten(-2), step, lo


def dequantize_solution(q, step, lo):
    qg = q.float().unflatten(-1, (step.size(-1), -1))
    return ((qg + 128) * step.float()[..., None] + lo.float()[..., None]).flatten(-2)


def dequantize_without_offset(q, step, lo):
    qg = q.float().unflatten(-1, (step.size(-1), -1))
    return (qg * step.float()[..., None] + lo.float()[..., None]).flatten(-2)


def quantize_per_vector(x):
    lo = x.amin(-1, keepdim=True)
    step = (x.amax(-1, keepdim=True) - lo) / 255
    return (torch.round((x - lo) / step) - 128).to(torch.int8), step.half(), lo.half()


def test_quantizer_check_passes_the_solution(capsys):
    check_int8_quantizer(quantize_solution, dequantize_solution)
    assert "my_quantize_int8 and my_dequantize_int8: all checks passed" in capsys.readouterr().out


def test_quantizer_solution_is_the_library_scheme():
    from kvlab.course.checks.beyond import _quant_test_tensor
    from kvlab.quantized import dequantize_int8, quantize_int8

    x = _quant_test_tensor()
    for ours, theirs in zip(quantize_solution(x), quantize_int8(x)):
        assert torch.equal(ours, theirs)
    torch.testing.assert_close(dequantize_solution(*quantize_int8(x)), dequantize_int8(*quantize_int8(x)))


def test_quantizer_check_reports_the_stubs_as_not_done(capsys):
    check_int8_quantizer(stub, stub)
    check_int8_quantizer(quantize_solution, stub)
    assert capsys.readouterr().out.count("not done yet") == 2


@pytest.mark.parametrize("quantize, dequantize, hint", [
    (lambda x: quantize_solution(x, rounding=torch.floor), dequantize_solution, "rounded down"),
    (lambda x: quantize_solution(x, rounding=torch.trunc), dequantize_solution, "rounded down"),
    (lambda x: quantize_solution(x, rounding=lambda v: v), dequantize_solution, "int8 truncates|rounded down"),
    (lambda x: quantize_solution(x, per_tensor=True), dequantize_solution, "whole tensor"),
    (quantize_per_vector, dequantize_solution, "one step for the whole tensor or vector"),
    (lambda x: quantize_solution(x, zero_step=True), dequantize_solution, "constant group"),
    (lambda x: quantize_solution(x, naive_float16=True), dequantize_solution, "float16 rounded it the wrong way"),
    (quantize_solution, dequantize_without_offset, r"\+ 128"),
])
def test_quantizer_check_fails_wrong_answers(quantize, dequantize, hint):
    with pytest.raises(AssertionError, match=hint):
        check_int8_quantizer(quantize, dequantize)


# --------------------------------------------------------------------------- reason: tokens per round


def test_tokens_per_round_formula_matches_the_simulation():
    alpha = sum(min(a, b) for a, b in zip(ROUND_P, ROUND_Q))
    truth = (1 - alpha ** (ROUND_K + 1)) / (1 - alpha)
    assert abs(tokens_per_round_simulated() - truth) < 0.05


def test_tokens_per_round_check_passes_the_answer(capsys):
    check_tokens_per_round((1 - 0.7 ** 9) / 0.3)
    check_tokens_per_round(3.2)
    assert capsys.readouterr().out.count("my_tokens_per_round: all checks passed") == 2


def test_tokens_per_round_check_reports_none_as_not_done(capsys):
    check_tokens_per_round(None)
    assert "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, hint", [
    (0.7, "one guess is kept"),
    (1 + 8 * 0.7, "every guess as checked"),
    (0.7 * (1 - 0.7 ** 8) / 0.3, "kept guesses only"),
    ((1 - 0.7 ** 8) / 0.3, "bonus"),
    (9, "q = p"),
    (1 / 0.3, "unlimited"),
    ((1 - 0.29 ** 9) / 0.71, "independent draws"),
    ((1 - 0.4 ** 9) / 0.6, "half the sum"),
    ((1 - 0.8 ** 9) / 0.2, "weight by q"),
    (2.5, "more than 0.01 away"),
    ("3.2", "number"),
])
def test_tokens_per_round_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_tokens_per_round(wrong)


# --------------------------------------------------------------------------- experiment: where int8 text parts


@pytest.fixture(scope="module")
def parting():
    return int8_parting()


def test_parting_check_passes_the_measured_position(parting, capsys):
    # The setup was chosen where the texts part (at a near-tie, position 147 on the machine that chose it);
    # another CPU's rounding may move or remove the parting, and the check measures it live.
    check_int8_parting(-1 if parting["first"] is None else parting["first"])
    assert "my_parting_position: all checks passed" in capsys.readouterr().out


def test_parting_check_reports_none_as_not_done(capsys):
    check_int8_parting(None)
    assert "not done yet" in capsys.readouterr().out


def test_parting_check_fails_wrong_answers(parting):
    first, T = parting["first"], parting["prompt_len"]
    if first is None:
        for wrong in (0, 5, 1.0):
            with pytest.raises(AssertionError):
                check_int8_parting(wrong)
        return
    for wrong, hint in [(first + T, "prompt"), (first + 1, "off by one"), (first - 1, "off by one"),
                        (-1, "do differ"), (first + 37, "not where"), (float(first), "int")]:
        with pytest.raises(AssertionError, match=hint):
            check_int8_parting(wrong)
