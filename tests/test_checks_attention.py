"""Chapter 2's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import math

import pytest
import torch

from kvlab.checks.attention import (check_attention, check_causal_mask, check_multi_head_attention,
                                    check_repeat_kv)


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


# --------------------------------------------------------------------------- causal mask


def causal_mask_solution(T, S):
    q_pos = torch.arange(S - T, S)
    return q_pos[:, None] >= torch.arange(S)[None, :]


def causal_mask_top_left(T, S):
    return torch.ones(T, S, dtype=torch.bool).tril()


def causal_mask_off_by_one(T, S):  # a query that cannot see itself
    q_pos = torch.arange(S - T, S)
    return q_pos[:, None] > torch.arange(S)[None, :]


def causal_mask_floats(T, S):
    return causal_mask_solution(T, S).float()


def causal_mask_transposed(T, S):  # the upper triangle: every query sees the future
    return torch.ones(T, S, dtype=torch.bool).triu()


def test_causal_mask_check_passes_a_solution(capsys):
    check_causal_mask(causal_mask_solution)
    assert "my_causal_mask: all checks passed" in capsys.readouterr().out


def test_causal_mask_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_causal_mask(stub))


def test_causal_mask_check_names_the_top_left_mistake():
    with pytest.raises(AssertionError, match="top-left"):
        check_causal_mask(causal_mask_top_left)


@pytest.mark.parametrize("wrong", [causal_mask_off_by_one, causal_mask_transposed])
def test_causal_mask_check_fails_wrong_masks(wrong):
    with pytest.raises(AssertionError, match="position"):
        check_causal_mask(wrong)


def test_causal_mask_check_wants_bools():
    with pytest.raises(AssertionError, match="bool"):
        check_causal_mask(causal_mask_floats)


# --------------------------------------------------------------------------- attention


def attention_solution(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


def attention_unscaled(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


def attention_wrong_dim(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-2)
    return weights @ v, weights


def attention_mask_after_softmax(q, k, v, mask=None):
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).softmax(dim=-1)
    if mask is not None:
        weights = weights * mask
    return weights @ v, weights


def attention_ignores_mask(q, k, v, mask=None):
    return attention_solution(q, k, v)


def attention_divides_by_d(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / q.size(-1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


def attention_swapped_kv(q, k, v, mask=None):
    return attention_solution(q, v, k, mask)


def attention_out_only(q, k, v, mask=None):
    return attention_solution(q, k, v, mask)[0]


def test_attention_check_passes_a_solution(capsys):
    check_attention(attention_solution)
    assert "my_attention: all checks passed" in capsys.readouterr().out


def test_attention_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_attention(stub))


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (attention_unscaled, "too peaked"),
        (attention_wrong_dim, "softmax's dim"),
        (attention_mask_after_softmax, "sum to 1"),
        (attention_ignores_mask, "masked keys"),
        (attention_divides_by_d, "√D"),
        (attention_swapped_kv, "softmax"),
        (attention_out_only, "pair"),
    ],
)
def test_attention_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_attention(wrong)


# --------------------------------------------------------------------------- multi-head attention


def mha_solution(x, w_qkv, w_out, n_heads):
    B, T, C = x.shape
    D = C // n_heads
    q, k, v = (x @ w_qkv.T).split(C, dim=-1)
    q, k, v = (t.view(B, T, n_heads, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    y, _ = attention_solution(q, k, v, mask)
    return y.transpose(1, 2).reshape(B, T, C) @ w_out.T


def mha_view_without_transpose(x, w_qkv, w_out, n_heads):
    B, T, C = x.shape
    D = C // n_heads
    q, k, v = (x @ w_qkv.T).split(C, dim=-1)
    q, k, v = (t.reshape(B, n_heads, T, D) for t in (q, k, v))  # wrong: mixes tokens and heads
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    y, _ = attention_solution(q, k, v, mask)
    return y.reshape(B, T, C) @ w_out.T


def mha_untransposed_weights(x, w_qkv, w_out, n_heads):
    return mha_solution(x, w_qkv.view(3, *w_out.shape).transpose(1, 2).reshape(w_qkv.shape), w_out.T, n_heads)


def mha_no_mask(x, w_qkv, w_out, n_heads):
    B, T, C = x.shape
    D = C // n_heads
    q, k, v = (x @ w_qkv.T).split(C, dim=-1)
    q, k, v = (t.view(B, T, n_heads, D).transpose(1, 2) for t in (q, k, v))
    y, _ = attention_solution(q, k, v)
    return y.transpose(1, 2).reshape(B, T, C) @ w_out.T


def mha_scale_by_model_width(x, w_qkv, w_out, n_heads):
    B, T, C = x.shape
    D = C // n_heads
    q, k, v = (x @ w_qkv.T).split(C, dim=-1)
    q, k, v = (t.view(B, T, n_heads, D).transpose(1, 2) for t in (q, k, v))
    future = ~torch.ones(T, T, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1) / math.sqrt(C)).masked_fill(future, -math.inf)
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, C) @ w_out.T


def mha_swapped_kv(x, w_qkv, w_out, n_heads):
    C = x.size(-1)
    return mha_solution(x, torch.cat([w_qkv[:C], w_qkv[2 * C:], w_qkv[C:2 * C]]), w_out, n_heads)


def test_multi_head_check_passes_a_solution(capsys):
    check_multi_head_attention(mha_solution)
    assert "my_multi_head_attention: all checks passed" in capsys.readouterr().out


def test_multi_head_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_multi_head_attention(stub))


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (mha_view_without_transpose, "One head works but several"),
        (mha_scale_by_model_width, "One head works but several"),
        (mha_no_mask, "causal mask"),
        (mha_untransposed_weights, "projections"),
        (mha_swapped_kv, "projections"),
    ],
)
def test_multi_head_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_multi_head_attention(wrong)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_multi_head_attention(mha_solution)
    check_attention(attention_solution)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- repeat_kv


def repeat_kv_solution(x, n_rep):
    return x.repeat_interleave(n_rep, dim=1)


def repeat_kv_tiled(x, n_rep):
    return x.repeat(1, n_rep, 1, 1)


def repeat_kv_wrong_dim(x, n_rep):
    return x.repeat_interleave(n_rep, dim=2)


def test_repeat_kv_check_passes_a_solution(capsys):
    check_repeat_kv(repeat_kv_solution)
    assert "my_repeat_kv: all checks passed" in capsys.readouterr().out


def test_repeat_kv_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_repeat_kv(stub))


def test_repeat_kv_check_names_the_tiling_mistake():
    with pytest.raises(AssertionError, match="wrong order"):
        check_repeat_kv(repeat_kv_tiled)


def test_repeat_kv_check_fails_the_wrong_dimension():
    with pytest.raises(AssertionError, match="wrong shape"):
        check_repeat_kv(repeat_kv_wrong_dim)
