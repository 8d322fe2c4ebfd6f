"""Checks for chapter 7's exercises: top-p (nucleus) filtering, min-p filtering, and the top
token's probability at a temperature (why T = 0.01 behaves like greedy decoding).

Each check compares the learner's function with `kvlab.sampling` (or with softmax itself) on
random logits of several shapes and on edge cases. Inputs come from private `torch.Generator`s,
so a check never moves the notebook's random state; cases whose answer would hinge on float
rounding (a cumulative mass or a ratio within a hair of the threshold) are skipped. Built in
chapter 7.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..sampling import min_p_filter, top_p_filter
from ._common import call_learner, close, passed, learner_check

__all__ = ["check_top_p_filter", "check_min_p_filter", "check_top_prob_at_temperature"]

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
                got = call_learner(fn, logits, p, name="my_top_p_filter")
                if not torch.equal(logits, before):
                    raise AssertionError(f"{call} changed its input in place; return a new tensor "
                                         "(e.g. with masked_fill, not masked_fill_).")
                _check_filtered(got, logits, top_p_filter(logits, p), call, hint)
                tried += 1
    # Edge case: one token holds almost all the mass, so any p below it keeps that token alone.
    logits = torch.tensor([[8.0, 0.0, -1.0, 0.5, -2.0]])
    got = call_learner(fn, logits, 0.5, name="my_top_p_filter")
    _check_filtered(got, logits, top_p_filter(logits, 0.5), "my_top_p_filter(a peaked row, p=0.5)", hint)
    assert tried >= 30, "internal: too few top-p cases were checked"
    passed("my_top_p_filter")


@learner_check
def check_min_p_filter(fn: Callable) -> None:
    """`fn(logits, min_p) -> Tensor` of logits' shape: tokens whose probability is at least
    min_p × the top token's probability keep their logits, the others become -inf; like
    `kvlab.sampling.min_p_filter`."""
    hint = ("The threshold is on probabilities (softmax of the logits), and it scales with the "
            "model's confidence: compare each probability with min_p times the largest one.")
    for seed, shape in enumerate(_SHAPES):
        for scale in _SCALES:
            logits = _random_logits(shape, scale, 7 + 100 * seed + int(10 * scale))
            probs = logits.softmax(-1)
            ratio = probs / probs.amax(-1, keepdim=True)
            for min_p in (0.0, 0.05, 0.1, 0.3, 0.7, 1.0):
                if 0.0 < min_p < 1.0 and (ratio - min_p).abs().min() < 1e-4:
                    continue
                before = logits.clone()
                call = f"my_min_p_filter(logits of shape {tuple(shape)}, min_p={min_p})"
                got = call_learner(fn, logits, min_p, name="my_min_p_filter")
                if not torch.equal(logits, before):
                    raise AssertionError(f"{call} changed its input in place; return a new tensor.")
                _check_filtered(got, logits, min_p_filter(logits, min_p), call, hint)
    # Edge case: a flat row (every token equally likely) keeps everything for any min_p.
    logits = torch.zeros(2, 9)
    got = call_learner(fn, logits, 0.5, name="my_min_p_filter")
    _check_filtered(got, logits, min_p_filter(logits, 0.5), "my_min_p_filter(a flat row, min_p=0.5)", hint)
    passed("my_min_p_filter")


@learner_check
def check_top_prob_at_temperature(fn: Callable) -> None:
    """`fn(logits, t) -> Tensor` of shape logits.shape[:-1]: the probability of the most likely
    token after dividing the logits by the temperature t > 0, i.e.
    softmax(logits / t).max(-1)."""
    for seed, shape in enumerate(_SHAPES):
        for scale in (1.0, 10.0):  # 10: logits / 0.01 reach thousands, and exp() of that overflows
            logits = _random_logits(shape, scale, 31 + 100 * seed + int(scale))
            for t in (0.01, 0.1, 0.5, 1.0, 2.0, 10.0):
                call = f"top_prob_at_temperature(logits of shape {tuple(shape)}, t={t})"
                got = call_learner(fn, logits, t, name="top_prob_at_temperature")
                expected = (logits / t).softmax(-1).amax(-1)
                if isinstance(got, Tensor) and tuple(got.shape) == tuple(expected.shape):
                    if not torch.isfinite(got).all():
                        raise AssertionError(f"{call} returned NaN or inf. Dividing by a small t makes the "
                                             "logits huge and exp() overflows: subtract the largest logit first "
                                             "(or use torch.softmax, which does).")
                close(got, expected, f"{call}: temperature divides the logits, before the softmax; the "
                      "result is the largest of the new probabilities.", atol=1e-5, rtol=1e-4)
    passed("top_prob_at_temperature")
