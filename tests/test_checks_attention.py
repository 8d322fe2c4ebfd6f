"""Chapter 2's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import math

import pytest
import torch

from kvlab.attention import SelfAttention
from kvlab.course.checks.attention import (check_alibi_bias, check_entropy_ratio, check_multi_head_attention,
                                           check_pool_kv, mean_entropy, pool_kv_reference)


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


def attention_solution(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


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


# --------------------------------------------------------------------------- ALiBi


def alibi_solution(n_heads, T, S):
    slopes = 2.0 ** (-8.0 * torch.arange(1, n_heads + 1) / n_heads)
    distance = (torch.arange(S - T, S)[:, None] - torch.arange(S)[None, :]).float()
    return (-slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))


def alibi_top_left(n_heads, T, S):  # queries placed at 0 .. T - 1
    slopes = 2.0 ** (-8.0 * torch.arange(1, n_heads + 1) / n_heads)
    distance = (torch.arange(T)[:, None] - torch.arange(S)[None, :]).float()
    return (-slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))


def alibi_positive(n_heads, T, S):  # a reward for distance instead of a penalty
    bias = alibi_solution(n_heads, T, S)
    return torch.where(torch.isfinite(bias), -bias, bias)


def alibi_unmasked(n_heads, T, S):
    bias = alibi_solution(n_heads, T, S)
    return torch.where(torch.isfinite(bias), bias, torch.zeros_like(bias))


def alibi_slopes_from_zero(n_heads, T, S):  # head 0's slope is 1
    slopes = 2.0 ** (-8.0 * torch.arange(0, n_heads) / n_heads)
    distance = (torch.arange(S - T, S)[:, None] - torch.arange(S)[None, :]).float()
    return (-slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))


def test_alibi_check_passes_a_solution(capsys):
    check_alibi_bias(alibi_solution)
    assert "my_alibi_bias: all checks passed" in capsys.readouterr().out


def test_alibi_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_alibi_bias(stub))


@pytest.mark.parametrize("wrong, hint", [
    (alibi_top_left, "last T of the S positions"),
    (alibi_positive, "sign is flipped"),
    (alibi_unmasked, "future is not masked"),
    (alibi_slopes_from_zero, "one step too high"),
    (lambda n_heads, T, S: alibi_solution(n_heads, T, S).flip(0), "wrong order"),
    (lambda n_heads, T, S: alibi_solution(n_heads, T, S)[0], "wrong shape"),
])
def test_alibi_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_alibi_bias(wrong)


# --------------------------------------------------------------------------- MHA -> GQA by pooling


def pool_solution(w_qkv, n_heads, n_kv_heads):
    C = w_qkv.shape[0] // 3
    D, G = C // n_heads, n_heads // n_kv_heads
    q, k, v = w_qkv.split(C)
    rest = w_qkv.shape[1:]
    return torch.cat([q] + [t.reshape(n_kv_heads, G, D, *rest).mean(1).reshape(-1, *rest) for t in (k, v)])


def pool_strided(w_qkv, n_heads, n_kv_heads):  # groups heads h, h + n_kv_heads, ...
    C = w_qkv.shape[0] // 3
    D, G = C // n_heads, n_heads // n_kv_heads
    q, k, v = w_qkv.split(C)
    rest = w_qkv.shape[1:]
    return torch.cat([q] + [t.reshape(G, n_kv_heads, D, *rest).mean(0).reshape(-1, *rest) for t in (k, v)])


def pool_summed(w_qkv, n_heads, n_kv_heads):
    C = w_qkv.shape[0] // 3
    G = n_heads // n_kv_heads
    return torch.cat([w_qkv[:C], pool_solution(w_qkv, n_heads, n_kv_heads)[C:] * G])


def pool_first_head(w_qkv, n_heads, n_kv_heads):
    C = w_qkv.shape[0] // 3
    D, G = C // n_heads, n_heads // n_kv_heads
    q, k, v = w_qkv.split(C)
    rest = w_qkv.shape[1:]
    return torch.cat([q] + [t.reshape(n_kv_heads, G, D, *rest)[:, 0].reshape(-1, *rest) for t in (k, v)])


def pool_queries_too(w_qkv, n_heads, n_kv_heads):  # the query rows changed as well
    C = w_qkv.shape[0] // 3
    return torch.cat([w_qkv[:C] * 0.5, pool_solution(w_qkv, n_heads, n_kv_heads)[C:]])


def test_pool_kv_check_passes_a_solution(capsys):
    check_pool_kv(pool_solution)
    assert "my_pool_kv: all checks passed" in capsys.readouterr().out


def test_pool_kv_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_pool_kv(stub))


@pytest.mark.parametrize("wrong, hint", [
    (pool_strided, "consecutive"),
    (pool_summed, "summed"),
    (pool_first_head, "kept one head per group"),
    (pool_queries_too, "query projection"),
    (lambda w, n_heads, n_kv_heads: w, "wrong shape"),
])
def test_pool_kv_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_pool_kv(wrong)


def test_pooled_layer_equals_multi_head_when_the_group_heads_agree():
    """The reference the check uses really builds a kvlab GQA layer's weights."""
    torch.manual_seed(0)
    mha = SelfAttention(16, 4).eval()
    with torch.no_grad():
        for rows in (slice(16, 32), slice(32, 48)):
            w = mha.qkv.weight[rows].view(2, 2, 4, 16)
            w[:, 1] = w[:, 0]
            b = mha.qkv.bias[rows].view(2, 2, 4)
            b[:, 1] = b[:, 0]
        gqa = SelfAttention(16, 4, 2).eval()
        gqa.qkv.weight.copy_(pool_kv_reference(mha.qkv.weight, 4, 2))
        gqa.qkv.bias.copy_(pool_kv_reference(mha.qkv.bias, 4, 2))
        gqa.out.load_state_dict(mha.out.state_dict())
        x = torch.randn(2, 5, 16)
        torch.testing.assert_close(gqa(x, is_causal=True), mha(x, is_causal=True))


# --------------------------------------------------------------------------- the entropy experiment


def measured_ratio(D, n_rows=4000, seed=7):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n_rows, 1, D, generator=g), torch.randn(n_rows, 16, D, generator=g)
    s = (q @ k.transpose(-2, -1)).squeeze(1)
    return mean_entropy(s.softmax(-1)) / mean_entropy((s / math.sqrt(D)).softmax(-1))


def test_entropy_check_passes_a_measurement(capsys):
    check_entropy_ratio(measured_ratio(64))
    assert "my_entropy_ratio: all checks passed" in capsys.readouterr().out


def test_entropy_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_entropy_ratio(None))


@pytest.mark.parametrize("wrong, hint", [
    (lambda: 1 / measured_ratio(64), "upside down"),
    (lambda: 1.0, "both entropies came out equal"),
    (lambda: measured_ratio(16), "another width"),
    (lambda: measured_ratio(64) + 0.5, "for many random"),
    (lambda: "0.2", "should be a number"),
])
def test_entropy_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_entropy_ratio(wrong())


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_multi_head_attention(mha_solution)
    check_pool_kv(pool_solution)
    check_entropy_ratio(measured_ratio(64))
    assert torch.equal(torch.rand(3), expected)
