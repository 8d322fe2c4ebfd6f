"""Checks for chapter 7's exercises: top-p (nucleus) filtering, the min-p threshold that
temperature is equivalent to, the temperature at which the top token's probability falls to one
half, a repetition penalty, and the penalty's effect on distinct-2 measured on the shipped model.

Filters are compared with `kvlab.sampling` on random logits of several shapes and on edge
cases; the experiment is run again live with the course's Shakespeare model. Inputs come from
private `torch.Generator`s, so a check never moves the notebook's random state; cases whose
answer would hinge on float rounding (a cumulative mass or a ratio within a hair of the
threshold) are skipped. Built in chapter 7.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ...sampling import filter_logits, logits_to_probs, min_p_filter, top_p_filter
from ._common import call_learner, close, learner_check, passed, require_answer

__all__ = ["check_top_p_filter", "check_equivalent_min_p", "check_temperature_for_half", "check_repetition_penalty",
           "check_penalty_distinct_2"]

_SHAPES = [(7,), (3, 20), (2, 4, 65)]
_SCALES = [0.5, 1.0, 3.0]


def _random_logits(shape, scale: float, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


def _check_filtered(got, logits: Tensor, expected: Tensor, call: str, hint: str) -> None:
    """The learner's filtered logits must keep exactly the expected tokens, unchanged, and set
    the others to -inf."""
    if not isinstance(got, Tensor):
        raise AssertionError(f"{call} returned {type(got).__name__}; return the filtered logits as a tensor.")
    if tuple(got.shape) != tuple(logits.shape):
        raise AssertionError(f"{call} returned shape {tuple(got.shape)}, expected {tuple(logits.shape)}: "
                             "filter along the last dimension and keep the shape.")
    kept, want = torch.isfinite(got), torch.isfinite(expected)
    removed = got[~kept]
    if removed.numel() and not torch.all(removed == float("-inf")):
        raise AssertionError(f"{call}: removed tokens should be set to -inf (not NaN or +inf), so that a "
                             "softmax afterwards gives them probability exactly 0.")
    if (kept.sum(-1) == 0).any():
        raise AssertionError(f"{call} removed every token in some row. A filter must always keep at "
                             f"least the most likely token. {hint}")
    if not torch.equal(kept, want):
        extra = int((kept & ~want).sum())
        missing = int((~kept & want).sum())
        raise AssertionError(f"{call} keeps the wrong tokens ({extra} kept that should go, {missing} removed "
                             f"that should stay). {hint}")
    close(got[kept], logits[kept], f"{call}: the kept tokens' logits should come back unchanged "
          "(return logits, not probabilities).")


_TOP_P_OFF = ("top-p filter", [top_p_filter, filter_logits, logits_to_probs])  # the library's, switched off

@learner_check
def check_top_p_filter(fn: Callable) -> None:
    """`fn(logits, p) -> Tensor` of logits' shape: the smallest set of most likely tokens whose
    probability reaches p keeps its logits, every other entry becomes -inf; like
    `kvlab.sampling.top_p_filter`."""
    hint = ("Sort by probability, most likely first, and keep a token if the mass of the tokens "
            "*before* it is still below p: the token that carries the total over p is kept too.")
    tried = 0
    for seed, shape in enumerate(_SHAPES):
        for scale in _SCALES:
            logits = _random_logits(shape, scale, 100 * seed + int(10 * scale))
            cum = logits.softmax(-1).sort(-1, descending=True).values.cumsum(-1)
            for p in (1e-4, 0.2, 0.5, 0.9, 0.99, 1.0):
                if p < 1.0 and (cum - p).abs().min() < 1e-4:
                    continue  # p sits on a boundary: the answer would depend on rounding
                if p == 1.0 and (1.0 - cum[..., :-1]).min() < 1e-5:
                    continue  # the mass before the last tokens rounds to 1 in float32
                before = logits.clone()
                call = f"my_top_p_filter(logits of shape {tuple(shape)}, p={p})"
                got = call_learner(fn, logits, p, name="my_top_p_filter", without=_TOP_P_OFF)
                if not torch.equal(logits, before):
                    raise AssertionError(f"{call} changed its input in place; return a new tensor "
                                         "(e.g. with masked_fill, not masked_fill_).")
                _check_filtered(got, logits, top_p_filter(logits, p), call, hint)
                tried += 1
    # Edge case: one token holds almost all the mass, so any p below it keeps that token alone.
    logits = torch.tensor([[8.0, 0.0, -1.0, 0.5, -2.0]])
    got = call_learner(fn, logits, 0.5, name="my_top_p_filter", without=_TOP_P_OFF)
    _check_filtered(got, logits, top_p_filter(logits, 0.5), "my_top_p_filter(a peaked row, p=0.5)", hint)
    assert tried >= 30, "internal: too few top-p cases were checked"
    passed("my_top_p_filter")


@learner_check
def check_equivalent_min_p(fn: Callable) -> None:
    """`fn(min_p, t) -> float`: the threshold m such that min-p with m on the *untempered* logits
    keeps exactly the tokens that min-p with `min_p` keeps after temperature `t`. Checked
    against the value that works for every distribution, and live on random logits."""
    cases = [(0.1, 0.5), (0.05, 2.0), (0.2, 1.0), (0.5, 0.7), (0.01, 1.5), (0.0, 0.8), (1.0, 0.3)]
    for min_p, t in cases:
        call = f"my_equivalent_min_p(min_p={min_p}, t={t})"
        got = call_learner(fn, min_p, t, name="my_equivalent_min_p")
        if isinstance(got, Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            raise AssertionError(f"{call} returned {type(got).__name__}; return a number.")
        expected = min_p ** t
        if math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-12):
            continue
        # Show the mistake on real logits: which tokens the two filters disagree about.
        logits = _random_logits((4, 65), 3.0, 17)
        tempered = torch.isfinite(min_p_filter(logits / t, min_p))
        theirs = torch.isfinite(min_p_filter(logits, min(max(float(got), 0.0), 1.0)))
        n_diff = int((tempered != theirs).sum())
        where = f"{call} = {got:.4g}: on random logits it keeps a different set of tokens ({n_diff} differ)."
        if 0 < min_p < 1 and t != 1 and math.isclose(got, min_p ** (1 / t), rel_tol=1e-6):
            raise AssertionError(f"{where} Your exponent is upside down: at t < 1 the tempered distribution is "
                                 "sharper, so min-p removes *more* tokens and the equivalent threshold must be "
                                 "larger than min_p.")
        if t != 1 and (math.isclose(got, min_p * t, rel_tol=1e-6) or math.isclose(got, min_p / t, rel_tol=1e-6)):
            raise AssertionError(f"{where} Temperature divides the logits, so it scales *log*-probabilities, not "
                                 "probabilities: write p_i(t) / p_max(t) in terms of p_i / p_max.")
        raise AssertionError(f"{where} Write min-p's rule as a condition on p_i / p_max and see what dividing "
                             "the logits by t does to that ratio.")
    passed("my_equivalent_min_p")


def _temperature_for_half(logits: Tensor) -> float:
    """The temperature at which softmax(logits / T).max() = 1/2, by bisection in float64."""
    z = logits.double()
    lo, hi = 1e-6, 1.0
    while float((z / hi).softmax(-1).max()) > 0.5:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((z / mid).softmax(-1).max()) > 0.5:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _half_cases() -> list[Tensor]:
    """Logits with one clear favourite, V >= 3, so that exactly one temperature gives 1/2."""
    cases = [torch.tensor([2.0, 1.0, 0.0]), torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0]),
             torch.tensor([1.0, 0.9, -3.0, -3.0])]
    for seed, (v, scale) in enumerate([(20, 1.0), (65, 3.0), (65, 0.3), (10, 8.0)]):
        z = _random_logits((v,), scale, 70 + seed)
        top2 = z.topk(2).values
        if float(top2[0] - top2[1]) > 1e-3:
            cases.append(z)
    return cases


@learner_check
def check_temperature_for_half(fn: Callable) -> None:
    """`fn(logits (V,)) -> float`: the temperature T > 0 at which the most likely token's
    probability, softmax(logits / T).max(), equals 0.5 (to a relative 1e-3)."""
    for z in _half_cases():
        call = f"my_temperature_for_half(logits of {len(z)} tokens)"
        got = call_learner(fn, z.clone(), name="my_temperature_for_half")
        if isinstance(got, Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not got > 0:
            raise AssertionError(f"{call} returned {got!r}; return a temperature, a number > 0.")
        expected = _temperature_for_half(z)
        if math.isclose(got, expected, rel_tol=1e-3):
            continue
        top_at = float((z.double() / got).softmax(-1).max())
        if math.isclose(float((z.double() * got).softmax(-1).max()), 0.5, rel_tol=1e-3):
            raise AssertionError(f"{call} = {got:.4g}: that temperature *multiplies* the logits. Temperature "
                                 "divides them: softmax(logits / T).")
        raise AssertionError(f"{call} = {got:.4g}: at that temperature the top probability is {top_at:.4f}, not "
                             "0.5. How does the top probability move as T grows, and between which two "
                             "temperatures must the answer lie? Narrow that interval until it is tight.")
    passed("my_temperature_for_half")


def _penalize(logits: Tensor, previous: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty: every distinct token in `previous` has a positive logit divided
    by `penalty` and a negative one multiplied by it."""
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[..., previous.long()] = True
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


@learner_check
def check_repetition_penalty(fn: Callable) -> None:
    """`fn(logits (V,), previous (N,) int64, penalty >= 1) -> (V,)`: every token that appears in
    `previous` (once or many times) has its logit divided by `penalty` if positive and
    multiplied by it if negative; other logits are unchanged; the input is not modified."""
    g = torch.Generator().manual_seed(77)
    cases = []
    for v, n, penalty in [(10, 4, 1.3), (65, 30, 1.5), (65, 0, 2.0), (20, 12, 1.0), (30, 50, 1.2)]:
        logits = torch.randn(v, generator=g) * 3
        previous = torch.randint(v // 2, (n,), generator=g)  # repeats, and some tokens never seen
        cases.append((logits, previous, penalty))
    for logits, previous, penalty in cases:
        call = f"my_repetition_penalty(logits of {len(logits)}, {len(previous)} previous ids, penalty={penalty})"
        before = logits.clone()
        got = call_learner(fn, logits, previous.clone(), penalty, name="my_repetition_penalty")
        if not torch.equal(logits, before):
            raise AssertionError(f"{call} changed the logits in place; return a new tensor.")
        expected = _penalize(logits, previous, penalty)
        if not isinstance(got, Tensor) or tuple(got.shape) != tuple(logits.shape):
            raise AssertionError(f"{call} should return a tensor of the logits' shape {tuple(logits.shape)}.")
        if torch.allclose(got, expected, atol=1e-6, rtol=1e-6):
            continue
        seen = torch.zeros(len(logits), dtype=torch.bool)
        seen[previous] = True
        if not torch.allclose(got[~seen], logits[~seen]):
            raise AssertionError(f"{call}: a token that is not in `previous` must keep its logit.")
        neg = seen & (logits < 0)
        if neg.any() and torch.allclose(got[neg], logits[neg] / penalty, rtol=1e-5):
            raise AssertionError(f"{call}: dividing a *negative* logit by penalty > 1 moves it up, towards 0, which "
                                 "makes a repeated token more likely, not less.")
        counts = torch.bincount(previous, minlength=len(logits))
        if (counts > 1).any():
            raise AssertionError(f"{call}: the penalty applies once per token that appeared, however many times "
                                 "it appeared.")
        raise AssertionError(f"{call}: repeated tokens should have positive logits divided by penalty and "
                             "negative ones multiplied by it.")
    passed("my_repetition_penalty")


# The experiment of the penalty exercise: greedy decoding from "ROMEO:\n", 150 characters, with
# the context cut to the model's last max_seq_len tokens, penalty applied over the whole text so far.
_PENALTY_RUN = dict(prompt="ROMEO:\n", new_chars=150, penalty=1.1)


def _distinct_2(texts: list[str]) -> float:
    pairs = [pair for t in texts for pair in zip(t.split(), t.split()[1:])]
    return len(set(pairs)) / max(len(pairs), 1)


def _penalized_greedy_text(penalty: float) -> str:
    from ...pretrained import load_shakespeare

    model, tok = load_shakespeare(device="cpu")
    ids = torch.tensor([tok.encode(_PENALTY_RUN["prompt"])])
    window = model.config.max_seq_len
    with torch.inference_mode():
        for _ in range(_PENALTY_RUN["new_chars"]):
            logits = model(ids[:, -window:])[0, -1].float()
            if penalty != 1.0:
                logits = _penalize(logits, ids[0], penalty)
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return tok.decode(ids[0, -_PENALTY_RUN["new_chars"]:].tolist())


@learner_check
def check_penalty_distinct_2(answer) -> None:
    """`answer`: distinct-2 of the 150 characters that greedy decoding with a repetition penalty
    of 1.1 writes after "ROMEO:\n" on the shipped Shakespeare model, measured live (tolerance
    0.02)."""
    value = require_answer(answer, "my_penalty_distinct_2")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"my_penalty_distinct_2 should be a number, got {type(value).__name__}.")
    if not 0.0 <= value <= 1.0:
        raise AssertionError(f"my_penalty_distinct_2 = {value}: distinct-2 is a fraction, between 0 and 1.")
    expected = _distinct_2([_penalized_greedy_text(_PENALTY_RUN["penalty"])])
    if abs(value - expected) <= 0.02:
        passed("my_penalty_distinct_2")
        return
    plain = _distinct_2([_penalized_greedy_text(1.0)])
    if abs(value - plain) <= 0.02:
        raise AssertionError(f"my_penalty_distinct_2 = {value:.3f} is what plain greedy decoding scores: was the "
                             "penalty applied at every step, to the logits the argmax picks from?")
    raise AssertionError(f"my_penalty_distinct_2 = {value:.3f} does not match the run repeated here. Check the "
                         "recipe: greedy, 150 new characters, the context cut to the model's window, the penalty "
                         "over every id so far (prompt included), distinct-2 of the new text only.")
