"""Chapter 3's exercise checks: each passes a correct answer, fails the unfinished stub, and
fails the plausible wrong answers with a hint that names the mistake."""

import pytest
import torch
from torch import nn

from kvlab.checks import gpt as checks


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


def fails(check, fn, match: str | None = None):
    with pytest.raises(AssertionError, match=match):
        check(fn)


# --------------------------------------------------------------------------- LayerNorm


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def test_layer_norm_passes(capsys):
    checks.check_layer_norm(layer_norm)
    assert "my_layer_norm: all checks passed" in capsys.readouterr().out


def test_layer_norm_stub(assert_not_done):
    assert_not_done(lambda: checks.check_layer_norm(stub))


@pytest.mark.parametrize("wrong, match", [
    (lambda x, w, b, eps: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) * w + b,
     "unbiased"),
    (lambda x, w, b, eps: (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, unbiased=False) + eps) * w + b,
     "after the square root"),
    (lambda x, w, b, eps: (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True, unbiased=False) * w + b,
     "ignores eps"),
    (lambda x, w, b, eps: layer_norm(x, torch.ones_like(w), torch.zeros_like(b), eps), "weight and bias"),
    (lambda x, w, b, eps: (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + eps) * w + b, "last dimension"),
    (lambda x, w, b, eps: layer_norm(x, w, b, eps) * w, None),
])
def test_layer_norm_wrong_answers(wrong, match):
    fails(checks.check_layer_norm, wrong, match)


def test_layer_norm_in_place_is_caught():
    def in_place(x, w, b, eps):
        x.sub_(x.mean(-1, keepdim=True))
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w + b
    fails(checks.check_layer_norm, in_place, "in place")


# --------------------------------------------------------------------------- RMSNorm


def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_rms_norm_passes(capsys):
    checks.check_rms_norm(rms_norm)
    assert "my_rms_norm: all checks passed" in capsys.readouterr().out


def test_rms_norm_stub(assert_not_done):
    assert_not_done(lambda: checks.check_rms_norm(stub))


@pytest.mark.parametrize("wrong, match", [
    (lambda x, w, eps: rms_norm(x - x.mean(-1, keepdim=True), w, eps), "subtracted the mean"),
    (lambda x, w, eps: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w, "after the square root"),
    (lambda x, w, eps: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w, "sum of squares"),
    (lambda x, w, eps: rms_norm(x, torch.ones_like(w), eps), "multiply by weight"),
    (lambda x, w, eps: x / torch.sqrt(x.var(-1, keepdim=True) + eps) * w, None),
])
def test_rms_norm_wrong_answers(wrong, match):
    fails(checks.check_rms_norm, wrong, match)


# --------------------------------------------------------------------------- parameter count


def gpt2_param_count(vocab_size, max_seq_len, d_model, n_layers):
    C = d_model
    per_block = 12 * C * C + 13 * C
    return vocab_size * C + max_seq_len * C + n_layers * per_block + 2 * C


def test_param_count_passes(capsys):
    checks.check_gpt2_param_count(gpt2_param_count)
    assert "gpt2_param_count: all checks passed" in capsys.readouterr().out
    assert gpt2_param_count(50257, 1024, 768, 12) == 124_439_808


def test_param_count_accepts_integer_tensor():
    checks.check_gpt2_param_count(lambda V, P, C, L: torch.tensor(gpt2_param_count(V, P, C, L)))


def test_param_count_stub(assert_not_done):
    assert_not_done(lambda: checks.check_gpt2_param_count(stub))


@pytest.mark.parametrize("wrong, match", [
    (lambda V, P, C, L: gpt2_param_count(V, P, C, L) + V * C, "counted once"),  # tied head counted twice
    (lambda V, P, C, L: gpt2_param_count(V, P, C, L) - L * 9 * C, "biases"),
    (lambda V, P, C, L: gpt2_param_count(V, P, C, L) - P * C, "position"),
    (lambda V, P, C, L: gpt2_param_count(V, P, C, L) - 2 * C, "final LayerNorm"),
    (lambda V, P, C, L: gpt2_param_count(V, P, C, L) - (2 * L + 1) * C, "bias as well"),
    (lambda V, P, C, L: V * C + P * C + L * 12 * C * C, None),  # no biases, no norms
    (lambda V, P, C, L: V * C + P * C + L * (8 * C * C + 13 * C) + 2 * C, "matrix parameters"),  # MLP 2C wide
    (lambda V, P, C, L: float(gpt2_param_count(V, P, C, L)), "return an int"),
])
def test_param_count_wrong_answers(wrong, match):
    fails(checks.check_gpt2_param_count, wrong, match)


# --------------------------------------------------------------------------- RoPE


def apply_rope(x, positions, base=10000.0):
    D = x.size(-1)
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    angle = positions.float()[:, None] * theta  # (T, D/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_apply_rope_passes(capsys):
    checks.check_apply_rope(apply_rope)
    assert "my_apply_rope: all checks passed" in capsys.readouterr().out


def test_apply_rope_stub(assert_not_done):
    assert_not_done(lambda: checks.check_apply_rope(stub))


def interleaved(x, positions, base=10000.0):
    D = x.size(-1)
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    angle = positions.float()[:, None] * theta
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)
    return rotated.flatten(-2)


def slow_frequencies(x, positions, base=10000.0):
    D = x.size(-1)
    theta = base ** (-torch.arange(0, D // 2, dtype=torch.float32) / D)  # exponent i/D, not 2i/D
    angle = positions.float()[:, None] * theta
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)


@pytest.mark.parametrize("wrong, match", [
    (interleaved, "neighbouring"),
    (lambda x, p, base=10000.0: apply_rope(x, -p, base), "wrong way"),
    (slow_frequencies, "frequencies"),
    (lambda x, p, base=10000.0: apply_rope(x, p - p[0], base), "count positions from 0"),
    (lambda x, p, base=10000.0: apply_rope(x, p, 10000.0), "ignores the base"),
    (lambda x, p, base=10000.0: x, None),
])
def test_apply_rope_wrong_answers(wrong, match):
    fails(checks.check_apply_rope, wrong, match)


# --------------------------------------------------------------------------- Conv1D -> Linear


def conv1d_to_linear(weight, bias):
    n_in, n_out = weight.shape
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(weight.t())
        layer.bias.copy_(bias)
    return layer


def test_conv1d_passes(capsys):
    checks.check_hf_conv1d_to_linear(conv1d_to_linear)
    assert "hf_conv1d_to_linear: all checks passed" in capsys.readouterr().out


def test_conv1d_stub(assert_not_done):
    assert_not_done(lambda: checks.check_hf_conv1d_to_linear(stub))


def no_transpose(weight, bias):
    layer = nn.Linear(*weight.shape)
    layer.weight = nn.Parameter(weight.clone())
    layer.bias = nn.Parameter(bias.clone())
    return layer


def no_bias(weight, bias):
    layer = nn.Linear(*weight.shape, bias=False)
    layer.weight = nn.Parameter(weight.t().clone())
    return layer


def swapped_sizes(weight, bias):
    return nn.Linear(weight.shape[1], weight.shape[0])


@pytest.mark.parametrize("wrong, match", [
    (no_transpose, "transposed"),
    (no_bias, "no bias"),
    (swapped_sizes, None),
    (lambda w, b: (lambda x: x @ w + b), "return a torch.nn.Linear"),
    (lambda w, b: nn.Linear(*w.shape), "the Conv1D does"),  # right shape, random weights
])
def test_conv1d_wrong_answers(wrong, match):
    fails(checks.check_hf_conv1d_to_linear, wrong, match)


def test_checks_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    checks.check_layer_norm(layer_norm)
    checks.check_apply_rope(apply_rope)
    assert torch.equal(torch.rand(3), before)
