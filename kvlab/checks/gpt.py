"""Checks for chapter 3's exercises: LayerNorm, RMSNorm, GPT-2's parameter count, RoPE, and
converting a Hugging Face `Conv1D` to an `nn.Linear`.

Each check compares the learner's function with an independent reference (PyTorch's
`F.layer_norm`, kvlab's `RMSNorm`, `rope_cos_sin` + `apply_rope`, a `GPT` built on the meta
device) on several shapes, small cases first. Before the generic hint, a check recognises the
classic wrong answers (unbiased variance, eps outside the square root, a subtracted mean, a tied
head counted twice, interleaved RoPE pairs, a missing transpose) and names the mistake without
writing the answer. Inputs come from a private `torch.Generator`, so a check never moves the
notebook's global random state. Built in chapter 3.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import apply_rope
from ..gpt import GPT, GPTConfig
from ..layers import RMSNorm, rope_cos_sin
from ._common import call_learner, close, passed, learner_check

__all__ = [
    "check_layer_norm",
    "check_rms_norm",
    "check_gpt2_param_count",
    "check_apply_rope",
    "check_hf_conv1d_to_linear",
]


def _matches(actual, expected: Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> bool:
    """True when `actual` is a tensor of `expected`'s shape and (close) values."""
    return (
        isinstance(actual, Tensor)
        and tuple(actual.shape) == tuple(expected.shape)
        and not actual.dtype.is_complex
        and bool(torch.allclose(actual.detach().to(expected.dtype), expected, atol=atol, rtol=rtol))
    )


def _check_untouched(name: str, before: Tensor, after: Tensor, where: str) -> None:
    if not torch.equal(before, after):
        raise AssertionError(f"[{where}] {name} changed your input `x` in place; return a new tensor instead.")


# --------------------------------------------------------------------------- LayerNorm


def _norm_cases(g: torch.Generator):
    """(x, eps) pairs: one position, a batch of sequences, 4-D input, an eps large enough to
    matter, inputs with a large mean, and a nearly constant input where eps dominates."""
    yield torch.randn(1, 1, 8, generator=g), 1e-5
    yield torch.randn(2, 5, 16, generator=g), 1e-5
    yield torch.randn(3, 2, 4, 32, generator=g), 1e-5
    yield torch.randn(2, 3, 6, generator=g), 0.5
    yield 3.0 + 2.0 * torch.randn(4, 12, generator=g), 1e-5
    yield 1e-3 * torch.randn(2, 7, 10, generator=g), 1e-4


@learner_check
def check_layer_norm(fn: Callable) -> None:
    """`fn(x, weight, bias, eps) -> y`, LayerNorm over the last dimension of x (..., C), against
    `torch.nn.functional.layer_norm` on several shapes and eps values."""
    g = torch.Generator().manual_seed(3)
    for x, eps in _norm_cases(g):
        C = x.size(-1)
        weight = 1.0 + 0.5 * torch.randn(C, generator=g)
        bias = 0.5 * torch.randn(C, generator=g)
        where = f"x {tuple(x.shape)}, eps={eps:g}"
        x_in = x.clone()
        got = call_learner(fn, x_in, weight.clone(), bias.clone(), eps, name="my_layer_norm")
        _check_untouched("my_layer_norm", x, x_in, where)
        expected = F.layer_norm(x, (C,), weight, bias, eps)
        if _matches(got, expected, atol=1e-4, rtol=1e-4):
            continue
        mean = x.mean(-1, keepdim=True)
        if _matches(got, (x - mean) / torch.sqrt(x.var(-1, keepdim=True, unbiased=True) + eps) * weight + bias):
            raise AssertionError(
                f"[{where}] your variance is the unbiased estimate (divided by C - 1). LayerNorm "
                "divides by C; note that torch.var divides by C - 1 unless you ask otherwise.")
        var = x.var(-1, keepdim=True, unbiased=False)
        if _matches(got, (x - mean) / (torch.sqrt(var) + eps) * weight + bias):
            raise AssertionError(
                f"[{where}] eps is added after the square root. It belongs inside: it is added to "
                "the variance, which is what keeps a nearly constant input from being blown up.")
        if eps >= 1e-4 and _matches(got, (x - mean) / torch.sqrt(var) * weight + bias, atol=1e-4, rtol=1e-4):
            raise AssertionError(f"[{where}] your result ignores eps; use the eps argument, not a constant.")
        if _matches(got, (x - mean) / torch.sqrt(var + eps)):
            raise AssertionError(f"[{where}] you normalised correctly but did not apply weight and bias.")
        close(got, expected,
              f"[{where}] normalise each position over its C features (the last dimension): subtract "
              "their mean, divide by the square root of their variance plus eps, then scale by weight "
              "and shift by bias.", atol=1e-4, rtol=1e-4)
    passed("my_layer_norm")


# --------------------------------------------------------------------------- RMSNorm


@learner_check
def check_rms_norm(fn: Callable) -> None:
    """`fn(x, weight, eps) -> y`, RMSNorm over the last dimension of x (..., C), against
    `kvlab.layers.RMSNorm` on several shapes, including inputs whose mean is far from zero."""
    g = torch.Generator().manual_seed(4)
    for x, eps in _norm_cases(g):
        C = x.size(-1)
        weight = 1.0 + 0.5 * torch.randn(C, generator=g)
        where = f"x {tuple(x.shape)}, eps={eps:g}"
        x_in = x.clone()
        got = call_learner(fn, x_in, weight.clone(), eps, name="my_rms_norm")
        _check_untouched("my_rms_norm", x, x_in, where)
        norm = RMSNorm(C, eps=eps)
        with torch.no_grad():
            norm.weight.copy_(weight)
            expected = norm(x)
        if _matches(got, expected, atol=1e-4, rtol=1e-4):
            continue
        ms = x.pow(2).mean(-1, keepdim=True)
        if _matches(got, F.layer_norm(x, (C,), weight, None, eps), atol=1e-4, rtol=1e-4):
            raise AssertionError(
                f"[{where}] you subtracted the mean: that is LayerNorm. RMSNorm divides x by its root "
                "mean square as it is, with no centring (the two agree only when the mean is zero).")
        if _matches(got, x / (torch.sqrt(ms) + eps) * weight):
            raise AssertionError(f"[{where}] eps is added after the square root; it belongs inside, "
                                 "added to the mean square.")
        if _matches(got, x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight):
            raise AssertionError(f"[{where}] you used the sum of squares; RMSNorm uses their mean over the C features.")
        if _matches(got, x * torch.rsqrt(ms + eps)):
            raise AssertionError(f"[{where}] you normalised correctly but did not multiply by weight.")
        close(got, expected,
              f"[{where}] divide each position's C features by the square root of (the mean of their "
              "squares + eps), then multiply by weight.", atol=1e-4, rtol=1e-4)
    passed("my_rms_norm")


# --------------------------------------------------------------------------- parameter count


def _gpt2_count_on_meta(vocab_size: int, max_seq_len: int, d_model: int, n_layers: int) -> int:
    """The count of a GPT-2-style kvlab GPT of this shape, built on the meta device (no memory)."""
    # The head count changes how d_model is split, never the number of parameters.
    config = GPTConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, d_model=d_model,
                       n_layers=n_layers, n_heads=1)
    with torch.device("meta"):
        return GPT(config).num_params()


_COUNT_CASES = [
    (50257, 1024, 768, 12),  # gpt2
    (256, 256, 64, 2),  # kvlab's "tiny"
    (10, 4, 8, 1),
    (1000, 64, 32, 3),
    (50257, 1024, 1024, 24),  # gpt2-medium
    (50257, 1024, 1600, 48),  # gpt2-xl
]


@learner_check
def check_gpt2_param_count(fn: Callable) -> None:
    """`fn(vocab_size, max_seq_len, d_model, n_layers) -> int` against the parameter count of a
    GPT-2-style `kvlab.GPT` built on the meta device, for GPT-2's own sizes and small shapes."""
    for V, P, C, L in _COUNT_CASES:
        where = f"vocab_size={V}, max_seq_len={P}, d_model={C}, n_layers={L}"
        got = call_learner(fn, V, P, C, L, name="gpt2_param_count")
        if isinstance(got, Tensor) and got.numel() == 1 and not got.dtype.is_floating_point:
            got = int(got)
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            raise AssertionError(f"[{where}] return an int (a count of parameters), got {type(got).__name__} {got!r}")
        expected = _gpt2_count_on_meta(V, P, C, L)
        diff = int(got) - expected
        if diff == 0:
            continue
        biases = L * (3 * C + C + 4 * C + C)  # qkv, out, fc, proj
        norms = (2 * L + 1) * 2 * C  # two LayerNorms per block and the final one, weight and bias each
        hints = {
            V * C: "you counted the output layer's V·C weights, but GPT-2 ties them to the token "
                   "embedding: the same matrix, counted once.",
            -P * C: "you left out the learned position embeddings (one row per position).",
            -biases: "you left out the biases of the linear layers.",
            -norms: "you left out the LayerNorms' parameters (two per block plus the final one).",
            -norms // 2: "each LayerNorm has a bias as well as a weight.",
            -2 * C: "you left out the final LayerNorm before the output layer.",
            -(2 * L) * 2 * C: "you left out the two LayerNorms inside each block.",
            -V * C: "you left out the token embedding (which is also the output layer).",
        }
        hint = hints.get(diff)
        if hint is None and diff % L == 0 and abs(diff // L) in (C * C, 4 * C * C, 8 * C * C):
            hint = ("a block's matrix parameters are off: count qkv (C → 3C), out (C → C), fc (C → 4C) "
                    "and proj (4C → C).")
        if hint is None:
            hint = ("go through one block piece by piece (two LayerNorms, qkv, out, fc, proj, each "
                    "Linear with a bias), then add the embeddings and the final LayerNorm.")
        raise AssertionError(f"[{where}] got {int(got):,}, expected {expected:,} (off by {diff:+,}): {hint}")
    passed("gpt2_param_count")


# --------------------------------------------------------------------------- RoPE


def _rope_reference(x: Tensor, positions: Tensor, base: float) -> Tensor:
    cos, sin = rope_cos_sin(positions, x.size(-1), base)
    return apply_rope(x, cos, sin)


def _rope_interleaved(x: Tensor, positions: Tensor, base: float) -> Tensor:
    D = x.size(-1)
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    angle = positions.float()[:, None] * theta  # (T, D/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * angle.cos() - x2 * angle.sin()
    out[..., 1::2] = x2 * angle.cos() + x1 * angle.sin()
    return out


def _rope_cases(g: torch.Generator):
    """(x (B, H, T, D), positions (T,), base): from one pair to GPT-sized heads, positions that
    do not start at 0 (a decode step), and a different base."""
    yield torch.randn(1, 1, 3, 2, generator=g), torch.arange(3), 10000.0
    yield torch.randn(1, 2, 5, 8, generator=g), torch.arange(5), 10000.0
    yield torch.randn(2, 4, 6, 16, generator=g), torch.arange(6), 10000.0
    yield torch.randn(2, 3, 1, 32, generator=g), torch.tensor([37]), 10000.0
    yield torch.randn(1, 2, 4, 64, generator=g), torch.arange(100, 104), 10000.0
    yield torch.randn(2, 2, 7, 16, generator=g), torch.arange(7), 500.0


@learner_check
def check_apply_rope(fn: Callable) -> None:
    """`fn(x, positions, base) -> x rotated`, x (B, H, T, D) and positions (T,) ints, against
    kvlab's `rope_cos_sin` + `apply_rope` (the rotate-half pairing (i, i + D/2))."""
    g = torch.Generator().manual_seed(5)
    for x, positions, base in _rope_cases(g):
        where = f"x {tuple(x.shape)}, positions {positions.tolist()}, base={base:g}"
        x_in = x.clone()
        got = call_learner(fn, x_in, positions.clone(), base, name="my_apply_rope")
        _check_untouched("my_apply_rope", x, x_in, where)
        expected = _rope_reference(x, positions, base)
        if _matches(got, expected, atol=1e-4, rtol=1e-4):
            continue
        D = x.size(-1)
        if D > 2 and _matches(got, _rope_interleaved(x, positions, base), atol=1e-4, rtol=1e-4):
            raise AssertionError(
                f"[{where}] you rotated neighbouring coordinates (2i, 2i+1) together. That is a valid "
                "RoPE, but not the layout kvlab and Llama-family checkpoints use: pair i is "
                "coordinate i with coordinate i + D/2.")
        if _matches(got, _rope_reference(x, -positions, base), atol=1e-4, rtol=1e-4):
            raise AssertionError(f"[{where}] you rotate the wrong way: the angle for position p is +p·θ_i "
                                 "(check the signs of your sine terms).")
        if D > 2 and any(_matches(got, _rope_reference(x, positions, b), atol=1e-4, rtol=1e-4)
                         for b in (base ** 0.5, base ** 2)):
            raise AssertionError(f"[{where}] your rotation frequencies are off: pair i = 0 .. D/2 - 1 turns "
                                 "by base^(-2i/D) per position (check the exponent).")
        restarted = _rope_reference(x, positions - positions[0], base)
        if positions[0] != 0 and _matches(got, restarted, atol=1e-4, rtol=1e-4):
            raise AssertionError(f"[{where}] your angles count positions from 0; use the positions you are given "
                                 "(after a prompt, the next token's position is not 0).")
        if base != 10000.0 and _matches(got, _rope_reference(x, positions, 10000.0), atol=1e-4, rtol=1e-4):
            raise AssertionError(f"[{where}] your result ignores the base argument.")
        close(got, expected,
              f"[{where}] rotate each pair (x_i, x_(i+D/2)) by the angle position · base^(-2i/D).",
              atol=1e-4, rtol=1e-4)
    passed("my_apply_rope")


# --------------------------------------------------------------------------- Conv1D -> Linear


@learner_check
def check_hf_conv1d_to_linear(fn: Callable) -> None:
    """`fn(weight, bias) -> nn.Linear`, where a Hugging Face `Conv1D` computes x @ weight + bias
    with weight (in, out): the returned layer must compute the same function."""
    g = torch.Generator().manual_seed(6)
    for n_in, n_out in [(4, 4), (8, 24), (16, 8), (64, 64)]:
        where = f"weight ({n_in}, {n_out})"
        weight = torch.randn(n_in, n_out, generator=g)
        bias = torch.randn(n_out, generator=g)
        w_in, b_in = weight.clone(), bias.clone()
        layer = call_learner(fn, w_in, b_in, name="hf_conv1d_to_linear")
        if not isinstance(layer, nn.Linear):
            raise AssertionError(f"[{where}] return a torch.nn.Linear, got {type(layer).__name__}")
        if (layer.in_features, layer.out_features) != (n_in, n_out):
            raise AssertionError(
                f"[{where}] your Linear maps {layer.in_features} → {layer.out_features} features; the "
                f"Conv1D maps {n_in} → {n_out}.")
        if tuple(layer.weight.shape) != (n_out, n_in):
            raise AssertionError(
                f"[{where}] your Linear's weight has shape {tuple(layer.weight.shape)}; nn.Linear keeps its "
                "weight as (out_features, in_features).")
        if layer.bias is None:
            raise AssertionError(f"[{where}] your Linear has no bias; the Conv1D has one.")
        x = torch.randn(3, 5, n_in, generator=g)
        with torch.no_grad():
            y = layer(x)
        if n_in == n_out and _matches(y, x @ weight.t() + bias):
            raise AssertionError(
                f"[{where}] your layer computes x @ weight.T + bias. Conv1D stores its weight as "
                "(in, out) and nn.Linear as (out, in): one of the two layouts has to be transposed.")
        close(y, x @ weight + bias, f"[{where}] the Linear must compute x @ weight + bias, as the Conv1D does.")
        if not torch.equal(w_in, weight) or not torch.equal(b_in, bias):
            raise AssertionError(f"[{where}] hf_conv1d_to_linear changed the tensors you passed it.")
    passed("hf_conv1d_to_linear")
