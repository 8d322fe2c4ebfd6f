"""Chapter 7's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import pytest
import torch

from kvlab.checks.sampling import check_min_p_filter, check_top_p_filter, check_top_prob_at_temperature


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


# --------------------------------------------------------------------------- top-p


def top_p_solution(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_one_short(logits, p):  # keeps tokens while the running mass (including them) is below p
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    keep_sorted = sorted_logits.softmax(-1).cumsum(-1) < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_may_keep_nothing(logits, p):  # right rule, but no guarantee for the top token
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    keep_sorted = sorted_logits.softmax(-1).cumsum(-1) <= p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_wrong_end(logits, p):  # sorts ascending and keeps the least likely tokens
    sorted_logits, order = torch.sort(logits, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    keep_sorted = probs.cumsum(-1) - probs < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_returns_probs(logits, p):  # filters right but returns probabilities
    return top_p_solution(logits, p).softmax(-1)


def top_p_in_place(logits, p):
    return logits.masked_fill_(~torch.isfinite(top_p_solution(logits, p)), float("-inf"))


def test_top_p_passes_a_solution(capsys):
    check_top_p_filter(top_p_solution)
    assert "passed" in capsys.readouterr().out


def test_top_p_passes_kvlabs_own():
    from kvlab.sampling import top_p_filter
    check_top_p_filter(top_p_filter)


def test_top_p_stub(assert_not_done):
    assert_not_done(lambda: check_top_p_filter(stub))


@pytest.mark.parametrize("wrong", [top_p_one_short, top_p_may_keep_nothing, top_p_wrong_end, top_p_returns_probs,
                                   top_p_in_place])
def test_top_p_catches_mistakes(wrong):
    with pytest.raises(AssertionError):
        check_top_p_filter(wrong)


def test_top_p_hint_for_one_short():
    with pytest.raises(AssertionError, match="before"):
        check_top_p_filter(top_p_one_short)


# --------------------------------------------------------------------------- min-p


def min_p_solution(logits, min_p):
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def min_p_via_log(logits, min_p):  # the same rule in log space: logit >= max logit + log(min_p)
    import math
    cut = logits.amax(-1, keepdim=True) + (math.log(min_p) if min_p > 0 else float("-inf"))
    return logits.masked_fill(logits < cut, float("-inf"))


def min_p_on_logits(logits, min_p):  # thresholds the logits instead of the probabilities
    return logits.masked_fill(logits < min_p * logits.amax(-1, keepdim=True), float("-inf"))


def min_p_absolute(logits, min_p):  # a fixed threshold, not scaled by the top probability
    return logits.masked_fill(logits.softmax(-1) < min_p, float("-inf"))


def test_min_p_passes_solutions(capsys):
    check_min_p_filter(min_p_solution)
    check_min_p_filter(min_p_via_log)
    assert capsys.readouterr().out.count("passed") == 2


def test_min_p_stub(assert_not_done):
    assert_not_done(lambda: check_min_p_filter(stub))


@pytest.mark.parametrize("wrong", [min_p_on_logits, min_p_absolute])
def test_min_p_catches_mistakes(wrong):
    with pytest.raises(AssertionError):
        check_min_p_filter(wrong)


# --------------------------------------------------------------------------- temperature


def top_prob_solution(logits, t):
    return torch.softmax(logits / t, dim=-1).amax(dim=-1)


def top_prob_naive_exp(logits, t):  # right formula, but exp() overflows for small t
    e = torch.exp(logits / t)
    return (e / e.sum(-1, keepdim=True)).amax(-1)


def top_prob_divides_probs(logits, t):  # temperature applied to probabilities, then renormalised
    p = logits.softmax(-1) / t
    return (p / p.sum(-1, keepdim=True)).amax(-1)


def top_prob_multiplies(logits, t):
    return torch.softmax(logits * t, dim=-1).amax(dim=-1)


def top_prob_returns_index(logits, t):
    return torch.softmax(logits / t, dim=-1).argmax(dim=-1)


def test_top_prob_passes_a_solution(capsys):
    check_top_prob_at_temperature(top_prob_solution)
    assert "passed" in capsys.readouterr().out


def test_top_prob_stub(assert_not_done):
    assert_not_done(lambda: check_top_prob_at_temperature(stub))


@pytest.mark.parametrize("wrong", [top_prob_divides_probs, top_prob_multiplies, top_prob_returns_index])
def test_top_prob_catches_mistakes(wrong):
    with pytest.raises(AssertionError):
        check_top_prob_at_temperature(wrong)


def test_top_prob_overflow_hint():
    with pytest.raises(AssertionError, match="overflow"):
        check_top_prob_at_temperature(top_prob_naive_exp)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_top_p_filter(top_p_solution)
    check_min_p_filter(min_p_solution)
    check_top_prob_at_temperature(top_prob_solution)
    assert torch.equal(torch.rand(3), expected)
