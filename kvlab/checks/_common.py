"""Helpers shared by every chapter's checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ExerciseNotDone", "MODEL_STYLES", "call_learner", "close", "passed", "small_model"]


class ExerciseNotDone(AssertionError):
    """Raised when the learner's function is still the stub (it raised NotImplementedError)."""


def call_learner(fn: Callable, *args: Any, name: str | None = None, **kwargs: Any) -> Any:
    """Call the learner's function, turning the stub's NotImplementedError into a clear failure."""
    if not callable(fn):
        raise TypeError(f"pass your function itself (e.g. my_fn, not my_fn()), got {type(fn).__name__}")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as err:
        label = name or getattr(fn, "__name__", "your function")
        raise ExerciseNotDone(f"{label} is not written yet: replace the `raise NotImplementedError` line") from err


def close(actual: Any, expected: torch.Tensor, hint: str, *, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Assert `actual` is a tensor of `expected`'s shape and values; fail with `hint` otherwise."""
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"expected a torch.Tensor, got {type(actual).__name__}. {hint}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"wrong shape: got {tuple(actual.shape)}, expected {tuple(expected.shape)}. {hint}")
    if actual.dtype == torch.bool or expected.dtype == torch.bool:
        if not torch.equal(actual.bool(), expected.bool()):
            raise AssertionError(f"wrong values. {hint}")
        return
    if not torch.allclose(actual.to(expected.dtype), expected, atol=atol, rtol=rtol):
        worst = (actual.to(expected.dtype) - expected).abs().max().item()
        raise AssertionError(f"wrong values (largest difference {worst:.3g}). {hint}")


def passed(what: str) -> None:
    """The one line a notebook shows when a check succeeds."""
    print(f"✓ {what}: all checks passed")


# The two decoder styles the cache checks run every answer through: GPT-2's and a Llama-style
# one (RMSNorm, SwiGLU, RoPE, grouped-query attention).
MODEL_STYLES = {
    "gpt2": dict(vocab_size=61, max_seq_len=128, d_model=32, n_layers=2, n_heads=4),
    "modern": dict(vocab_size=61, max_seq_len=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False),
}


def small_model(style: str, seed: int = 0, **overrides):
    """A small random GPT whose weight matrices are scaled ×4, so greedy decoding varies and a
    cache bug changes the tokens. Built without touching the learner's random stream."""
    from ..gpt import GPT, GPTConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**{**MODEL_STYLES[style], **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model.eval()
