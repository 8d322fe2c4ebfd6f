"""Checks for chapter 3's exercises: RoPE, a modern decoder's parameter count, what RoPE on the
values would break, and the experiment that pools the shipped model's key/value heads.

Each check compares the learner's answer with an independent reference (`rope_cos_sin` +
`apply_rope`, a `GPT` built on the meta device, attention run live, the shipped model evaluated
live) on several cases, small ones first. Before the generic hint, a check recognises the
classic wrong answers (interleaved RoPE pairs, a tied output layer in an untied model, key and
value heads counted as query heads, heads pooled in the wrong groups) and names the mistake
without writing the answer. Inputs come from a private `torch.Generator`, so a check never moves the
notebook's global random state. Built in chapter 3.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from ...attention import apply_rope, attention_reference, causal_mask
from ...gpt import GPT, GPTConfig
from ...layers import rope_cos_sin
from ._common import call_learner, close, learner_check, passed, require_answer

__all__ = [
    "check_apply_rope",
    "check_modern_param_count",
    "check_rope_values",
    "check_gqa_cost",
    "gqa_eval_ids",
    "pool_model_kv",
    "ROPE_VALUE_CHOICES",
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
        got = call_learner(fn, x_in, positions.clone(), base, name="my_apply_rope",
                           without=("rotary embedding", [apply_rope, rope_cos_sin]))
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


# --------------------------------------------------------------------------- a modern decoder's parameter count

_MODERN = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)


def _modern_count_on_meta(vocab_size: int, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
                          d_ff: int) -> int:
    """The count of a Llama-style kvlab GPT of this shape, built on the meta device (no memory)."""
    config = GPTConfig(vocab_size=vocab_size, max_seq_len=16, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, d_ff=d_ff, **_MODERN)
    with torch.device("meta"):
        return GPT(config).num_params()


_MODERN_CASES = [
    (256, 64, 2, 4, 2, 192),  # kvlab's "tiny-modern"
    (10, 8, 1, 2, 1, 16),
    (1000, 32, 3, 4, 4, 96),  # no sharing: multi-head attention
    (32000, 4096, 32, 32, 8, 11008),  # a Llama-2-7B-like shape with grouped-query attention
    (50257, 768, 12, 12, 1, 2048),  # one key/value head: multi-query attention
]


def _modern_wrong_counts(V: int, C: int, L: int, H: int, Hkv: int, F: int) -> list[tuple[int, str]]:
    D = C // H
    attn, mlp, norms = 2 * C * C + 2 * C * Hkv * D, 3 * C * F, 2 * C
    right = 2 * V * C + L * (attn + mlp + norms) + C
    return [
        (right - V * C, "the output layer is not tied here: it is a second V × C matrix"),
        (right + L * 2 * C * (H - Hkv) * D, "the key and value projections have n_kv_heads · D rows each, not C"),
        (right - L * C * F, "a SwiGLU MLP has three matrices (gate, up and down), not two"),
        (right + 16 * C, "RoPE has no parameters: there is no position table"),
        (right + L * 3 * C + C, "RMSNorm has a weight but no bias"),
        (right - L * 2 * C - C, "each block has two norms and the model a final one, each with C weights"),
    ]


@learner_check
def check_modern_param_count(fn: Callable) -> None:
    """`fn(vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff) -> int` against a Llama-style
    `kvlab.GPT` (RMSNorm, SwiGLU, RoPE, no biases, untied output layer) built on the meta device."""
    for case in _MODERN_CASES:
        where = "my_modern_param_count(vocab_size={}, d_model={}, n_layers={}, n_heads={}, n_kv_heads={}, d_ff={})"
        where = where.format(*case)
        got = call_learner(fn, *case, name="my_modern_param_count")
        if isinstance(got, Tensor) and got.numel() == 1 and not got.is_floating_point():
            got = int(got.item())
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            raise AssertionError(f"{where}: return an int, got {type(got).__name__} ({got!r})")
        expected = _modern_count_on_meta(*case)
        if got == expected:
            continue
        for wrong, hint in _modern_wrong_counts(*case):
            if got == wrong:
                raise AssertionError(f"{where}: got {got:,}: {hint}.")
        raise AssertionError(f"{where}: got {got:,}, which is {'more' if got > expected else 'less'} than the "
                             "model has. Count one block's tensors (two norms, the four attention projections, "
                             "the MLP's matrices), then the token embedding, the final norm and the output layer.")
    passed("my_modern_param_count")


# --------------------------------------------------------------------------- RoPE on the values too

ROPE_VALUE_CHOICES = {
    "a": "the attention weights change",
    "b": "the output for the same tokens depends on where the sequence starts, not only on the distances "
         "between its tokens",
    "c": "a query can now read keys and values after its own position",
    "d": "nothing: the rotations cancel out",
}


def _rope_value_facts() -> dict[str, bool]:
    """Which of ROPE_VALUE_CHOICES hold, measured on one random attention layer with RoPE on q and k
    (the usual way) and with RoPE on q, k and v."""
    g = torch.Generator().manual_seed(21)
    T, D = 6, 8
    q, k, v = (torch.randn(1, 2, T, D, generator=g) for _ in range(3))
    mask = causal_mask(T)

    def run(values: Tensor, offset: int, rotate_values: bool) -> tuple[Tensor, Tensor]:
        cos, sin = rope_cos_sin(torch.arange(T) + offset, D)
        v_in = apply_rope(values, cos, sin) if rotate_values else values
        return attention_reference(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v_in, mask)

    out_qk, w_qk = run(v, 0, False)
    out_qkv, w_qkv = run(v, 0, True)
    shifted_qk, _ = run(v, 10, False)
    shifted_qkv, _ = run(v, 10, True)
    later = v.clone()
    later[..., -1, :] += 1.0  # change only the last token's value
    out_later, _ = run(later, 0, True)
    return {
        "a": not torch.allclose(w_qk, w_qkv),
        "b": torch.allclose(shifted_qk, out_qk, atol=1e-5) and not torch.allclose(shifted_qkv, out_qkv, atol=1e-3),
        "c": not torch.allclose(out_later[..., :-1, :], out_qkv[..., :-1, :]),
        "d": torch.allclose(out_qkv, out_qk, atol=1e-5),
    }


_ROPE_VALUE_HINTS = {
    "a": "the weights are a softmax of q·k alone: compute them with and without rotating v and compare.",
    "c": "the causal mask is applied to the scores, and rotating v changes no score: change the last token's "
         "value and see which outputs move.",
    "d": "the rotation of v is not undone anywhere: each value keeps its key's angle into the weighted sum. "
         "Run the same tokens at positions 0.. and 10.. and compare the outputs.",
}


@learner_check
def check_rope_values(answer: str) -> None:
    """`answer`: the letter of the statement in ROPE_VALUE_CHOICES that holds, decided live by
    running attention with RoPE on the values too."""
    answer = require_answer(answer, "my_rope_answer")
    if not isinstance(answer, str) or answer.strip().lower() not in ROPE_VALUE_CHOICES:
        raise AssertionError(f"my_rope_answer should be one of the letters {sorted(ROPE_VALUE_CHOICES)}, got {answer!r}")
    letter = answer.strip().lower()
    facts = _rope_value_facts()
    if facts[letter]:
        passed("my_rope_answer")
        return
    raise AssertionError(f"({letter}) {ROPE_VALUE_CHOICES[letter]}: it does not. {_ROPE_VALUE_HINTS.get(letter, '')}")


# --------------------------------------------------------------------------- experiment: MHA -> GQA on the shipped model

GQA_EVAL_WINDOWS = 8  # consecutive 128-character windows from the start of the validation split


def pool_model_kv(model: GPT, n_kv_heads: int, *, consecutive: bool = True) -> GPT:
    """A copy of a multi-head `model` with `n_kv_heads` key/value heads, each the mean of a group of
    the original heads (consecutive heads, as grouped-query attention shares them)."""
    from .attention import pool_kv_reference

    config = GPTConfig(**{**model.config.to_dict(), "n_kv_heads": n_kv_heads})
    state = dict(model.state_dict())
    for name, tensor in state.items():
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            if not consecutive:  # group heads h, h + n_kv_heads, ...: reorder them, then pool
                C, D = config.d_model, config.head_dim
                q, k, v = tensor.split([C, C, C])
                order = torch.arange(config.n_heads).view(-1, n_kv_heads).T.reshape(-1)

                def regroup(t: Tensor) -> Tensor:
                    return t.reshape(config.n_heads, D, *t.shape[1:])[order].reshape(C, *t.shape[1:])

                tensor = torch.cat([q, regroup(k), regroup(v)])
            state[name] = pool_kv_reference(tensor, config.n_heads, n_kv_heads)
    with torch.random.fork_rng(devices=[]):
        pooled = GPT(config)
    pooled.load_state_dict(state, strict=False)  # the tied output layer follows tok_emb
    return pooled.eval()


def gqa_eval_ids(tokenizer) -> Tensor:
    """The ids the experiment evaluates on: the start of the validation split, GQA_EVAL_WINDOWS windows."""
    from ...data import load_shakespeare_text, train_val_split

    _, val_text = train_val_split(load_shakespeare_text())
    return torch.tensor(tokenizer.encode(val_text[: GQA_EVAL_WINDOWS * 128 + 1]), dtype=torch.long)


@learner_check
def check_gqa_cost(answer: float) -> None:
    """`answer`: how many nats per character the shipped model's validation loss rises when its 4
    key/value heads are mean-pooled into 2, measured here with `evaluate_split` within 0.02."""
    answer = require_answer(answer, "my_gqa_cost")
    if isinstance(answer, Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise AssertionError(f"my_gqa_cost should be a number (nats per character), got {type(answer).__name__}")
    from ...pretrained import load_shakespeare
    from ...train import evaluate_split

    model, tokenizer = load_shakespeare()
    ids = gqa_eval_ids(tokenizer)
    before = evaluate_split(model, ids, 128)
    after = evaluate_split(pool_model_kv(model, 2), ids, 128)
    if abs(answer - (after - before)) <= 0.02:
        passed("my_gqa_cost")
        return
    if abs(answer - after) <= 0.02:
        hint = "that is the pooled model's loss; the question asks how much it rose from the original's."
    elif abs(answer + (after - before)) <= 0.02:
        hint = "the sign is flipped: the pooled model's loss minus the original's."
    elif abs(answer - (evaluate_split(pool_model_kv(model, 2, consecutive=False), ids, 128) - before)) <= 0.02:
        hint = ("you pooled heads 0 and 2, 1 and 3: grouped-query attention shares a key/value head between "
                "consecutive query heads (0 and 1, 2 and 3), so pool those.")
    else:
        hint = (f"evaluate both models with kvlab.train.evaluate_split on the first {GQA_EVAL_WINDOWS} windows "
                "of 128 characters of the validation split, block_size=128.")
    raise AssertionError(f"my_gqa_cost = {answer:.3g} is not what this machine measures: {hint}")
