"""From logits to a next token: temperature, top-k, top-p (nucleus), min-p, and sampling.

Shape legend: B batch, V vocab_size. Logits are (..., V); every filter keeps the shape and
sets removed entries to -inf, so filters compose and a softmax afterwards gives exactly zero
probability to what was removed.

The filters run in the order temperature → top-k → top-p → min-p and follow Hugging Face's
definitions, so the same settings mean the same thing in both libraries:
    top-k  keeps every token whose logit is at least the k-th largest (ties survive)
    top-p  keeps the smallest set of most likely tokens whose probability mass reaches p
    min-p  keeps tokens whose probability is at least min_p × the top token's probability
Each keeps at least one token. Built in chapter 7.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "check_sampling_args",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "filter_logits",
    "logits_to_probs",
    "sample",
]


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_sampling_args(temperature=1.0, top_k=None, top_p=None, min_p=None) -> None:
    """Raise TypeError/ValueError naming the argument and its allowed range. Built in chapter 7."""
    if not _is_number(temperature):
        raise TypeError(f"temperature must be a number >= 0, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
    if top_k is not None:
        if not _is_int(top_k):
            raise TypeError(f"top_k must be None or an int >= 0 (0 disables it), got {top_k!r}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None disables it), got {top_k}")
    if top_p is not None:
        if not _is_number(top_p):
            raise TypeError(f"top_p must be None or a number in (0, 1], got {type(top_p).__name__}")
        if not 0.0 < top_p <= 1.0:  # NaN fails this comparison too
            raise ValueError(f"top_p must be in (0, 1] (1.0 or None disables it), got {top_p}")
    if min_p is not None:
        if not _is_number(min_p):
            raise TypeError(f"min_p must be None or a number in [0, 1], got {type(min_p).__name__}")
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 or None disables it), got {min_p}")


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide logits by the temperature: < 1 sharpens the distribution, > 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (and any tied with the k-th); the rest become -inf."""
    k = min(int(k), logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose total probability is at least p.

    Sorted from least to most likely, a token is dropped while the mass up to and including it
    is still at most 1 - p: the tokens above it already hold at least p. The most likely token
    is never dropped.
    """
    ascending, order = torch.sort(logits, dim=-1)
    mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_up_to <= 1.0 - p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens with probability >= min_p × (the most likely token's probability).

    The threshold scales with the model's confidence: a peaked distribution keeps few tokens,
    a flat one keeps many. The most likely token always passes.
    """
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k=None, top_p=None, min_p=None) -> Tensor:
    """Temperature, then top-k, top-p and min-p; disabled filters (None, 0, 1.0) are skipped.

    Temperature must be > 0 here; greedy decoding (temperature 0) is handled by
    `logits_to_probs`. Built in chapter 7.
    """
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    if top_k:  # None or 0: off
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    if min_p:  # None or 0: off
        logits = min_p_filter(logits, min_p)
    return logits


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k=None, top_p=None, min_p=None) -> Tensor:
    """Next-token probabilities (..., V) after temperature and the filters; the last dim sums to 1.

    temperature=0 means greedy: all the mass goes to the most likely token. Computed in float32
    whatever the logits' dtype. Built in chapter 7.
    """
    check_sampling_args(temperature, top_k, top_p, min_p)
    logits = logits.float()
    if temperature == 0:
        probs = torch.zeros_like(logits)
        return probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return filter_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token id per row from probabilities (B, V) -> (B, 1).

    With a CPU `generator` the draw happens on the CPU, whatever device `probs` is on, so the
    same seed gives the same tokens on CPU, CUDA and MPS. Built in chapter 7.
    """
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)
