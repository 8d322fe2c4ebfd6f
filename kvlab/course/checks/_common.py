"""Helpers shared by every chapter's checks.

Every check a notebook calls is wrapped in `learner_check`: a right answer prints one "✓" line,
a wrong one raises `AssertionError` with a hint, and an exercise not attempted yet (the stub
still raises `NotImplementedError`, or an answer is still `None`) prints one "✗ ... not done
yet" line and returns, so that running a whole chapter top to bottom never stops at an exercise
the reader has not reached, and never reports it as passed.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["DelegationRefused", "ExerciseNotDone", "MODEL_STYLES", "NOT_DONE_MARK", "PASS_MARK", "call_learner",
           "close", "is_not_done_line", "judge_number", "learner_check", "methods_of", "passed", "reject_number",
           "require_answer", "small_model", "without_kvlab"]

PASS_MARK = "✓ "  # starts the line a passing check prints
NOT_DONE_MARK = "✗ "  # starts the line a check prints for an exercise not attempted yet


class ExerciseNotDone(AssertionError):
    """Raised inside a check when the learner's function is still the stub (it raised
    NotImplementedError) or an answer is still None; `learner_check` turns it into a line."""


def learner_check(check: Callable) -> Callable:
    """Wrap a check so that an unfinished exercise prints a "✗ ... not done yet" line instead of raising.

    Wrong answers still raise (AssertionError with a hint); right ones print the "✓" line.
    `python -m kvlab.student grade` counts the "✗" line as a fail.
    """

    @functools.wraps(check)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            check(*args, **kwargs)
        except ExerciseNotDone as err:
            print(f"{NOT_DONE_MARK}{err} (not done yet: this check runs again when you re-run this cell)")
        return None

    wrapper.learner_check = True
    return wrapper


def is_not_done_line(line: str) -> bool:
    """True for the line `learner_check` prints for an exercise not attempted yet."""
    return line.startswith(NOT_DONE_MARK) and "not done yet" in line


def require_answer(value: Any, name: str) -> Any:
    """Return `value`, or raise ExerciseNotDone when the learner has not answered (`None`)."""
    if value is None:
        raise ExerciseNotDone(f"{name} is not answered yet: replace None with your answer")
    return value


def call_learner(fn: Callable, *args: Any, name: str | None = None,
                 without: tuple[str, Sequence[Callable]] | None = None, **kwargs: Any) -> Any:
    """Call the learner's function, turning the stub's NotImplementedError into a clear failure.

    `without=(what, pieces)`: run it with kvlab's own version of the piece switched off (see
    `without_kvlab`), so that an answer that calls the library fails saying so.
    """
    if not callable(fn):
        raise TypeError(f"pass your function itself (e.g. my_fn, not my_fn()), got {type(fn).__name__}")
    switched_off = without_kvlab(without[0], *without[1]) if without else contextlib.nullcontext()
    try:
        with switched_off:
            return fn(*args, **kwargs)
    except NotImplementedError as err:
        label = name or getattr(fn, "__name__", "your function")
        raise ExerciseNotDone(f"{label} is not written yet: replace the `raise NotImplementedError` line") from err


class DelegationRefused(AssertionError):
    """Raised when the learner's code calls kvlab's own version of the piece its check tests."""


_REFUSALS: list[str] = []  # the message of each `without_kvlab` block now open, innermost last


def _refuse(*args, **kwargs):
    # Swapped in as the __code__ of a switched-off function: it runs with that function's module
    # globals, so it imports what it needs instead of naming it.
    from kvlab.course.checks._common import _REFUSALS, DelegationRefused
    raise DelegationRefused(_REFUSALS[-1])


@contextlib.contextmanager
def without_kvlab(what: str, *pieces: Callable) -> Iterator[None]:
    """Run the learner's code with kvlab's own `what` switched off.

    Each piece is a kvlab function or method (`kvlab.apply_rope`, `GPT.forward`). Inside the
    block, calling it raises `DelegationRefused` ("this check runs your code without kvlab's
    <what>: build it from the pieces above"), however it is reached: through `kvlab.x`, a name
    the learner imported, or a method of a model. The function object itself is switched (its
    code), so every name bound to it is. Only the piece under test is switched off: the earlier
    parts an exercise builds on (a model's norms and MLPs, say) keep working. Compute the
    check's expected values before entering the block. Restored on leaving, also on failure.
    Built for the checks of every chapter.
    """
    functions = []
    for piece in pieces:
        function = getattr(piece, "__func__", piece)  # a bound method's function
        while hasattr(function, "__wrapped__"):  # under a decorator (torch.inference_mode...): the function itself
            function = function.__wrapped__
        if not isinstance(function, types.FunctionType):
            raise TypeError(f"without_kvlab switches off Python functions, got {piece!r}")
        if function.__closure__:
            raise TypeError(f"without_kvlab cannot switch off {function.__qualname__}: it is a closure")
        if function not in functions:
            functions.append(function)
    saved = [f.__code__ for f in functions]
    _REFUSALS.append(f"this check runs your code without kvlab's {what}: build it from the pieces above "
                     "(an answer that calls kvlab's own version does not show that you can)")
    try:
        for f in functions:
            f.__code__ = _refuse.__code__
        yield
    finally:
        for f, code in zip(functions, saved):
            f.__code__ = code
        _REFUSALS.pop()


def methods_of(*classes: type, containing: str = "") -> list[Callable]:
    """The methods defined in each class's own body (not inherited, not properties, not dunders
    such as `__init__`) whose name contains `containing`: what `without_kvlab` switches off to
    stand for "this class"."""
    return [f for cls in classes for name, f in vars(cls).items()
            if isinstance(f, types.FunctionType) and containing in name and not name.startswith("__")]


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
    print(f"{PASS_MARK}{what}: all checks passed")


def reject_number(value, truth, wrong: dict, hint: str) -> None:
    """Raise for a numeric answer that is not `truth`: the catalogued hint for a known wrong value
    (`wrong`: value -> hint), else `hint`."""
    if value in wrong:
        raise AssertionError(wrong[value])
    if value != truth:
        raise AssertionError(hint)


def judge_number(value, truth, wrong: dict, hint: str, name: str) -> None:
    """`reject_number`, then the pass line for `name`."""
    reject_number(value, truth, wrong, hint)
    passed(name)


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
    from ...gpt import GPT, GPTConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**{**MODEL_STYLES[style], **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model.eval()
