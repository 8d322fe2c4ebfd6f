"""Attention: masks from positions, the reference vs the fused kernel, heads, GQA, cross-attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvlab.attention import (CrossAttention, SelfAttention, attend, attention_mask, attention_reference,
                             causal_mask, repeat_kv)


def test_causal_mask_square_is_lower_triangle():
    assert torch.equal(causal_mask(5), torch.ones(5, 5, dtype=torch.bool).tril())


def test_causal_mask_is_aligned_bottom_right_for_short_queries():
    # A decode step: one query at the newest position sees every key.
    assert causal_mask(1, 6).all()
    # Two queries at positions 4 and 5 of 6: the first must not see key 5.
    m = causal_mask(2, 6)
    assert m[0].tolist() == [True] * 5 + [False]
    assert m[1].all()


def test_attention_mask_window_and_empty_slots():
    q = torch.tensor([5])
    k = torch.tensor([3, 4, 5, -1, 2])
    assert attention_mask(q, k, window=3).tolist() == [[True, True, True, False, False]]
    assert attention_mask(q, k).tolist() == [[True, True, True, False, True]]


def test_reference_matches_the_definition_and_the_fused_kernel():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    mask = causal_mask(5, 9)
    out, w = attention_reference(q, k, v, mask)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(8)
    scores[..., ~mask] = -torch.inf
    torch.testing.assert_close(w, scores.softmax(-1))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))
    assert (w[..., ~mask] == 0).all()
    torch.testing.assert_close(out, attend(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)


def test_is_causal_refuses_short_queries():
    q, kv = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="explicit mask"):
        attend(q, kv, kv, is_causal=True)


def test_repeat_kv_shares_heads_in_groups():
    x = torch.randn(2, 2, 3, 4)
    y = repeat_kv(x, 3)
    assert y.shape == (2, 6, 3, 4)
    for h in range(6):
        assert torch.equal(y[:, h], x[:, h // 3])


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_self_attention_matches_a_hand_written_multi_head(n_kv_heads):
    torch.manual_seed(0)
    attn = SelfAttention(32, 4, n_kv_heads).eval()
    x = torch.randn(2, 6, 32)
    y = attn(x, is_causal=True)
    y_ref, w = attn(x, is_causal=True, return_weights=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert w.shape == (2, 4, 6, 6)
    # Independent computation, head by head, from the projection weights.
    D, kv = 8, n_kv_heads * 8
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :32], qkv[..., 32:32 + kv], qkv[..., 32 + kv:]
    heads = []
    for h in range(4):
        g = h // (4 // n_kv_heads)
        s = q[..., h * D:(h + 1) * D] @ k[..., g * D:(g + 1) * D].transpose(1, 2) / math.sqrt(D)
        s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -torch.inf)
        heads.append(s.softmax(-1) @ v[..., g * D:(g + 1) * D])
    expected = torch.cat(heads, -1) @ attn.out.weight.T + attn.out.bias
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_causality_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    attn = SelfAttention(16, 2).eval()
    x = torch.randn(1, 8, 16)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, 16)
    torch.testing.assert_close(attn(x, is_causal=True)[:, :5], attn(x2, is_causal=True)[:, :5])


def test_cross_attention_masks_padding_and_projects_memory_once():
    torch.manual_seed(0)
    cross = CrossAttention(16, 2).eval()
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    memory_kv = cross.project_memory(memory)
    assert memory_kv[0].shape == (2, 2, 5, 8)
    pad = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]  # (B, 1, 1, S)
    y, w = cross(x, memory_kv, mask=pad, return_weights=True)
    assert (w[1, :, :, 3:] == 0).all()
    torch.testing.assert_close(y, cross(x, memory_kv, mask=pad), atol=1e-5, rtol=1e-5)
    # Changing padded memory rows changes nothing.
    memory2 = memory.clone()
    memory2[1, 3:] = 100.0
    torch.testing.assert_close(cross(x, cross.project_memory(memory2), mask=pad)[1], y[1], atol=1e-5, rtol=1e-5)


def test_bad_head_counts_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention(30, 4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        SelfAttention(32, 4, 3)
