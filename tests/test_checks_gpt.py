"""Chapter 3's exercise checks: each passes a correct answer, fails the unfinished stub, and
fails the plausible wrong answers with a hint that names the mistake. The experiment's check is
fed what a learner would measure on the shipped model."""

import pytest
import torch

from kvlab.course.checks import gpt as checks


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


def fails(check, fn, match: str | None = None):
    with pytest.raises(AssertionError, match=match):
        check(fn)


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


# --------------------------------------------------------------------------- a modern decoder's parameter count


def modern_count(vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff):
    C, D = d_model, d_model // n_heads
    block = 2 * C * C + 2 * C * n_kv_heads * D + 3 * C * d_ff + 2 * C
    return 2 * vocab_size * C + n_layers * block + C


def test_modern_count_passes(capsys):
    checks.check_modern_param_count(modern_count)
    assert "my_modern_param_count: all checks passed" in capsys.readouterr().out


def test_modern_count_accepts_an_integer_tensor(capsys):
    checks.check_modern_param_count(lambda *args: torch.tensor(modern_count(*args)))
    assert "all checks passed" in capsys.readouterr().out


def test_modern_count_stub(assert_not_done):
    assert_not_done(lambda: checks.check_modern_param_count(stub))


@pytest.mark.parametrize("wrong, match", [
    (lambda V, C, L, H, Hkv, F: modern_count(V, C, L, H, Hkv, F) - V * C, "not tied"),
    (lambda V, C, L, H, Hkv, F: modern_count(V, C, L, H, H, F), "n_kv_heads · D rows"),
    (lambda V, C, L, H, Hkv, F: modern_count(V, C, L, H, Hkv, F) - L * C * F, "three matrices"),
    (lambda V, C, L, H, Hkv, F: modern_count(V, C, L, H, Hkv, F) + L * 3 * C + C, "no bias"),
    (lambda V, C, L, H, Hkv, F: modern_count(V, C, L, H, Hkv, F) - L * 2 * C - C, "two norms"),
    (lambda V, C, L, H, Hkv, F: float(modern_count(V, C, L, H, Hkv, F)), "return an int"),
    (lambda V, C, L, H, Hkv, F: modern_count(V, C, L, H, Hkv, F) + 1, "more than the model has"),
])
def test_modern_count_wrong_answers(wrong, match):
    fails(checks.check_modern_param_count, wrong, match)


# --------------------------------------------------------------------------- RoPE on the values


def test_rope_values_facts_single_out_one_statement():
    facts = checks._rope_value_facts()
    assert sum(facts.values()) == 1 and facts["b"]


@pytest.mark.parametrize("answer", ["b", "B", " b "])
def test_rope_values_passes(answer, capsys):
    checks.check_rope_values(answer)
    assert "my_rope_answer: all checks passed" in capsys.readouterr().out


def test_rope_values_stub(assert_not_done):
    assert_not_done(lambda: checks.check_rope_values(None))


@pytest.mark.parametrize("wrong, match", [
    ("a", "weights are a softmax of q·k alone"),
    ("c", "causal mask"),
    ("d", "not undone"),
    ("e", "one of the letters"),
    (2, "one of the letters"),
])
def test_rope_values_wrong_answers(wrong, match):
    with pytest.raises(AssertionError, match=match):
        checks.check_rope_values(wrong)


# --------------------------------------------------------------------------- the GQA experiment


@pytest.fixture(scope="module")
def gqa_losses():
    """What a learner measures: the shipped model, then pooled to 2 and 1 key/value heads, and
    pooled to 2 with the wrong (strided) groups."""
    from kvlab.pretrained import load_shakespeare
    from kvlab.train import evaluate_split

    model, tokenizer = load_shakespeare()
    ids = checks.gqa_eval_ids(tokenizer)
    return dict(before=evaluate_split(model, ids, 128),
                two=evaluate_split(checks.pool_model_kv(model, 2), ids, 128),
                one=evaluate_split(checks.pool_model_kv(model, 1), ids, 128),
                strided=evaluate_split(checks.pool_model_kv(model, 2, consecutive=False), ids, 128))


def test_pooling_hurts_and_more_heads_hurt_less(gqa_losses):
    assert gqa_losses["before"] < gqa_losses["two"] < gqa_losses["one"]


def test_pooled_model_equals_the_original_when_the_heads_agree():
    """pool_model_kv builds a GQA model that computes what the multi-head model computes, once
    the key/value heads of each group are equal."""
    from kvlab.pretrained import load_shakespeare

    model, _ = load_shakespeare()
    assert model.config.n_heads == 4 and model.config.n_kv_heads == 4
    C, D = model.config.d_model, model.config.head_dim
    with torch.no_grad():
        for block in model.blocks:
            for name in ("weight", "bias"):
                t = getattr(block.attn.qkv, name)
                for rows in (slice(C, 2 * C), slice(2 * C, 3 * C)):
                    heads = t[rows].view(2, 2, D, *t.shape[1:])
                    heads[:, 1] = heads[:, 0]
    idx = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(checks.pool_model_kv(model, 2)(idx), model(idx), atol=1e-4, rtol=1e-4)


def test_gqa_cost_passes(gqa_losses, capsys):
    checks.check_gqa_cost(gqa_losses["two"] - gqa_losses["before"])
    assert "my_gqa_cost: all checks passed" in capsys.readouterr().out


def test_gqa_cost_stub(assert_not_done):
    assert_not_done(lambda: checks.check_gqa_cost(None))


@pytest.mark.parametrize("wrong, match", [
    (lambda r: r["two"], "pooled model's loss"),
    (lambda r: r["before"] - r["two"], "sign is flipped"),
    (lambda r: r["strided"] - r["before"], "consecutive query heads"),
    (lambda r: r["two"] - r["before"] + 0.3, "evaluate both models"),
])
def test_gqa_cost_wrong_answers(gqa_losses, wrong, match):
    with pytest.raises(AssertionError, match=match):
        checks.check_gqa_cost(wrong(gqa_losses))


def test_checks_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    checks.check_apply_rope(apply_rope)
    checks.check_modern_param_count(modern_count)
    checks.check_rope_values("b")
    assert torch.equal(torch.rand(3), before)
