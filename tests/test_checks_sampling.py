"""Chapter 7's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import math

import pytest
import torch

from kvlab.course.checks import sampling
from kvlab.course.checks.sampling import (check_equivalent_min_p, check_penalty_distinct_2, check_repetition_penalty,
                                          check_temperature_for_half, check_top_p_filter)


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


def test_top_p_refuses_kvlabs_own():
    # kvlab's filter is right, but it is not the learner's: the check runs without it.
    from kvlab.sampling import top_p_filter
    with pytest.raises(AssertionError, match="without kvlab's top-p filter"):
        check_top_p_filter(top_p_filter)


def test_top_p_stub(assert_not_done):
    assert_not_done(lambda: check_top_p_filter(stub))


@pytest.mark.parametrize("wrong, hint", [
    (top_p_one_short, "keeps the wrong tokens"),
    (top_p_may_keep_nothing, "removed every token"),
    (top_p_wrong_end, "keeps the wrong tokens"),
    (top_p_returns_probs, "keeps the wrong tokens"),
    (top_p_in_place, "in place"),
])
def test_top_p_catches_mistakes(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_top_p_filter(wrong)


def test_top_p_hint_for_one_short():
    with pytest.raises(AssertionError, match="before"):
        check_top_p_filter(top_p_one_short)


# --------------------------------------------------------------------------- min-p under temperature


def equivalent_min_p_solution(min_p, t):
    return min_p ** t


def test_equivalent_min_p_passes_a_solution(capsys):
    check_equivalent_min_p(equivalent_min_p_solution)
    assert "my_equivalent_min_p: all checks passed" in capsys.readouterr().out


def test_equivalent_min_p_is_right_on_real_filters():
    """The answer the check wants really makes the two filters keep the same tokens."""
    from kvlab.sampling import min_p_filter
    logits = torch.randn(8, 65, generator=torch.Generator().manual_seed(5)) * 3
    for min_p, t in ((0.1, 0.5), (0.05, 2.0), (0.3, 0.8)):
        a = torch.isfinite(min_p_filter(logits / t, min_p))
        b = torch.isfinite(min_p_filter(logits, equivalent_min_p_solution(min_p, t)))
        assert torch.equal(a, b)


def test_equivalent_min_p_stub(assert_not_done):
    assert_not_done(lambda: check_equivalent_min_p(stub))


@pytest.mark.parametrize("wrong, hint", [
    (lambda m, t: m ** (1 / t), "upside down"),
    (lambda m, t: m * t, "log\\*-probabilities"),
    (lambda m, t: m / t, "log\\*-probabilities"),
    (lambda m, t: m, "condition on p_i / p_max"),
    (lambda m, t: str(m), "return a number"),
])
def test_equivalent_min_p_catches(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_equivalent_min_p(wrong)


# --------------------------------------------------------------------------- temperature for one half


def half_solution(logits):
    top = lambda t: float((logits.double() / t).softmax(-1).max())  # noqa: E731
    lo, hi = 1e-6, 1.0
    while top(hi) > 0.5:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if top(mid) > 0.5 else (lo, mid)
    return (lo + hi) / 2


def half_multiplies(logits):  # solves softmax(logits * T).max() = 1/2
    return 1 / half_solution(logits)


def half_capped(logits):  # searches only up to T = 1
    top = lambda t: float((logits / t).softmax(-1).max())  # noqa: E731
    lo, hi = 1e-6, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if top(mid) > 0.5 else (lo, mid)
    return (lo + hi) / 2


def half_coarse(logits):  # a grid of 0.25 instead of a search
    grid = [0.25 * i for i in range(1, 400)]
    return min(grid, key=lambda t: abs(float((logits / t).softmax(-1).max()) - 0.5))


def test_half_passes_a_solution(capsys):
    check_temperature_for_half(half_solution)
    assert "my_temperature_for_half: all checks passed" in capsys.readouterr().out


def test_half_stub(assert_not_done):
    assert_not_done(lambda: check_temperature_for_half(stub))


@pytest.mark.parametrize("wrong, hint", [
    (half_multiplies, "multiplies"),
    (half_capped, "top probability is"),
    (half_coarse, "top probability is"),
    (lambda z: 0.5, "top probability is"),
    (lambda z: -1.0, "a number > 0"),
])
def test_half_catches(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_temperature_for_half(wrong)


# --------------------------------------------------------------------------- repetition penalty


def penalty_solution(logits, previous, penalty):
    seen = torch.unique(previous)
    out = logits.clone()
    v = out[seen]
    out[seen] = torch.where(v > 0, v / penalty, v * penalty)
    return out


def penalty_divides_all(logits, previous, penalty):  # negative logits move up
    out = logits.clone()
    out[torch.unique(previous)] /= penalty
    return out


def penalty_per_occurrence(logits, previous, penalty):  # penalises a token once per time it appeared
    out = logits.clone()
    for i in previous.tolist():
        out[i] = out[i] / penalty if out[i] > 0 else out[i] * penalty
    return out


def penalty_everyone(logits, previous, penalty):  # penalises every token
    return torch.where(logits > 0, logits / penalty, logits * penalty)


def penalty_in_place(logits, previous, penalty):
    seen = torch.unique(previous)
    logits[seen] = penalty_solution(logits, previous, penalty)[seen]
    return logits


def test_penalty_passes_a_solution(capsys):
    check_repetition_penalty(penalty_solution)
    assert "my_repetition_penalty: all checks passed" in capsys.readouterr().out


def test_penalty_stub(assert_not_done):
    assert_not_done(lambda: check_repetition_penalty(stub))


@pytest.mark.parametrize("wrong, hint", [
    (penalty_divides_all, "negative"),
    (penalty_per_occurrence, "once per token"),
    (penalty_everyone, "not in `previous`"),
    (penalty_in_place, "in place"),
])
def test_penalty_catches(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_repetition_penalty(wrong)


# --------------------------------------------------------------------------- the penalty experiment


def penalty_experiment_solution(penalty):
    """The chapter's experiment written out on its own: greedy, 150 characters, context cut to
    the window, the penalty over every id so far."""
    from kvlab import load_shakespeare
    model, tok = load_shakespeare(device="cpu")
    ids = torch.tensor([tok.encode("ROMEO:\n")])
    with torch.inference_mode():
        for _ in range(150):
            logits = model(ids[:, -model.config.max_seq_len:])[0, -1].float()
            ids = torch.cat([ids, penalty_solution(logits, ids[0], penalty).argmax().view(1, 1)], dim=1)
    text = tok.decode(ids[0, -150:].tolist())
    pairs = list(zip(text.split(), text.split()[1:]))
    return len(set(pairs)) / max(len(pairs), 1)


def test_penalty_experiment_passes_the_run_done_independently(capsys):
    check_penalty_distinct_2(penalty_experiment_solution(1.1))
    assert "my_penalty_distinct_2: all checks passed" in capsys.readouterr().out


def test_penalty_experiment_not_done(assert_not_done):
    assert_not_done(lambda: check_penalty_distinct_2(None))


@pytest.mark.parametrize("answer, hint", [
    (0.38, "plain greedy"),
    (0.9, "does not match"),
    (1.5, "between 0 and 1"),
    ("0.9", "should be a number"),
])
def test_penalty_experiment_catches(answer, hint, monkeypatch):
    texts = {1.1: "a b c d e f g h", 1.0: "a b a b a b a b c"}  # distinct-2 1 and 3/8
    monkeypatch.setattr(sampling, "_penalized_greedy_text", lambda penalty: texts[penalty])
    expected = {p: sampling._distinct_2([t]) for p, t in texts.items()}
    assert abs(expected[1.1] - 1.0) < 1e-9 and abs(expected[1.0] - 0.375) < 1e-9
    with pytest.raises(AssertionError, match=hint):
        check_penalty_distinct_2(answer)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_top_p_filter(top_p_solution)
    check_equivalent_min_p(equivalent_min_p_solution)
    check_temperature_for_half(half_solution)
    check_repetition_penalty(penalty_solution)
    assert torch.equal(torch.rand(3), expected)
