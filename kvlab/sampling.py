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

from dataclasses import dataclass

import torch
from torch import Tensor

from .validation import ArgumentTypeError, check_non_negative_int, check_number, check_probability

__all__ = [
    "check_sampling_args",
    "check_generator",
    "SamplingConfig",
    "resolve_sampling",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "filter_logits",
    "logits_to_probs",
    "sample",
]


def check_sampling_args(temperature=1.0, top_k=None, top_p=None, min_p=None) -> None:
    """Raise TypeError/ValueError naming the argument and its allowed range. Built in chapter 7."""
    check_number("temperature", temperature, low=0.0, note="0 means greedy")
    check_non_negative_int("top_k", top_k, allow_none=True, note="0 or None disables it")
    check_probability("top_p", top_p, allow_none=True, note="1.0 or None disables it")
    check_number("min_p", min_p, low=0.0, high=1.0, allow_none=True, note="0 or None disables it")


def check_generator(generator) -> None:
    """A `torch.Generator` or None, else TypeError."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits, checked once when it is made.

    `SamplingConfig(temperature=0)` is greedy; `SamplingConfig(temperature=0.8, top_p=0.95,
    generator=torch.Generator().manual_seed(0))` samples reproducibly. `kvlab.generate`,
    `kvlab.speculative_generate` and the command line take these settings as keywords and build
    one of these; the loops below them pass the one object. Built in chapter 7.
    """

    temperature: float = 1.0  # divides the logits: 0 is greedy, < 1 sharpens, > 1 flattens
    top_k: int | None = None  # keep the k most likely tokens (and ties with the k-th); None or 0: off
    top_p: float | None = None  # keep the smallest set of likely tokens with mass >= top_p; None or 1.0: off
    min_p: float | None = None  # keep tokens with prob >= min_p x the top token's; None or 0: off
    generator: torch.Generator | None = None  # random draws (a CPU one: the same tokens on every device)

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p)
        check_generator(self.generator)

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken (temperature 0)."""
        return self.temperature == 0

    @property
    def filters(self) -> dict:
        """The keywords of `logits_to_probs`: temperature, top_k, top_p, min_p."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)

    def probs(self, logits: Tensor) -> Tensor:
        """Next-token probabilities (..., V) under these settings (`logits_to_probs`)."""
        return logits_to_probs(logits, **self.filters)


def resolve_sampling(sampling: SamplingConfig | None = None, *, temperature=1.0, top_k=None, top_p=None,
                     min_p=None, generator=None) -> SamplingConfig:
    """The one `SamplingConfig` behind a call that takes either `sampling=` or the keywords.

    Without `sampling`, the keywords build (and check) one. With it, every keyword must be left
    at its default (temperature 1.0, the rest None): settings given twice are refused rather
    than one of them silently ignored. Built in chapter 7.
    """
    if sampling is None:
        return SamplingConfig(temperature, top_k, top_p, min_p, generator)
    if not isinstance(sampling, SamplingConfig):
        raise ArgumentTypeError(f"sampling must be a kvlab.sampling.SamplingConfig or None, "
                                f"got {type(sampling).__name__}")
    given = [name for name, value, default in (("temperature", temperature, 1.0), ("top_k", top_k, None),
                                                 ("top_p", top_p, None), ("min_p", min_p, None),
                                                 ("generator", generator, None)) if value is not default
             and value != default]
    if given:
        raise TypeError(f"pass the sampling settings either as sampling=SamplingConfig(...) or as keywords, "
                        f"not both: got sampling= and {', '.join(given)}=")
    return sampling


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
