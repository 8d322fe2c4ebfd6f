"""Checks for chapter 8: padding masks, cross-attention, the cached decoder built by hand, greedy decoding.

Each check compares the learner's function with kvlab's own (`attention_reference`,
`Seq2SeqTransformer`, `greedy_decode`) on several shapes, small cases first. The build steps of the
cached decoder (the cross cache, one layer's cached step, the whole step, the greedy loop) run with
kvlab's own version of their piece switched off (`without_kvlab`), count the memory's projections
with forward hooks, and name the catalogued mistake an output matches. Inputs come from
private `torch.Generator`s and models are built inside `torch.random.fork_rng`, so a check
never moves the notebook's random state. Built in chapter 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ...attention import CrossAttention, SelfAttention, attention_mask, attention_reference, merge_heads, split_heads
from ...beam import beam_search
from ...cache import KVCache
from ...seq2seq import CrossAttentionCache, DecoderBlock, Seq2SeqConfig, Seq2SeqTransformer, greedy_decode
from ._common import call_learner, close, learner_check, methods_of, passed, require_answer

__all__ = ["check_padding_mask", "check_cross_attention", "check_project_memory", "check_decoder_layer_step",
           "check_decoder_step", "check_greedy_by_hand", "check_greedy_decode", "check_cross_kv_for_samples",
           "check_saved_projections"]


# --------------------------------------------------------------------------- padding mask


@learner_check
def check_padding_mask(fn: Callable) -> None:
    """`fn(lengths, S, left=False) -> (B, S) bool`: True at the lengths[b] real positions of row b,
    the first ones (right padding) or, with left=True, the last ones (left padding)."""
    cases = [([3], 3, False), ([1], 1, False), ([2, 5, 1], 5, False), ([4, 4], 7, False), ([1, 6, 3, 2], 9, False),
             ([2, 5, 1], 5, True), ([1, 6, 3, 2], 9, True), ([3], 3, True)]
    for lengths, S, left in cases:
        lengths_t = torch.tensor(lengths)
        if left:
            got = call_learner(fn, lengths_t.clone(), S, left=True, name="my_padding_mask")
            expected = torch.arange(S)[None, :] >= S - lengths_t[:, None]
            right = torch.arange(S)[None, :] < lengths_t[:, None]
            where = f"my_padding_mask(torch.tensor({lengths}), S={S}, left=True)"
            if (isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got.bool(), right)
                    and not torch.equal(right, expected)):
                raise AssertionError(f"{where} marks the first positions as real; with left padding the padding "
                                     "comes first and the lengths[b] real tokens are the last ones of row b.")
        else:
            got = call_learner(fn, lengths_t.clone(), S, name="my_padding_mask")
            expected = torch.arange(S)[None, :] < lengths_t[:, None]
            where = f"my_padding_mask(torch.tensor({lengths}), S={S})"
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (S, len(lengths)) and S != len(lengths):
            raise AssertionError(f"{where} has shape {tuple(got.shape)}: one row per sequence, one column "
                                 f"per position, so (B, S) = {(len(lengths), S)}.")
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype != torch.bool:
            raise AssertionError(f"{where} returned dtype {got.dtype}; return a bool tensor (True = a real "
                                 "token), which is what masked_fill and SDPA's attn_mask expect.")
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, ~expected):
            raise AssertionError(f"{where} is inverted: in kvlab a mask is True where attention is allowed, "
                                 "so True must mark the real tokens and False the padding.")
        close(got, expected, f"{where}: row b has lengths[b] real tokens at positions 0..lengths[b] - 1, "
                             "then padding. Check the first and last positions of each row.")
    passed("my_padding_mask")


# --------------------------------------------------------------------------- cross-attention


def _cross_cases(g: torch.Generator):
    """(q, k, v, pad_mask): one query, T < S, T > S, T == S, no padding, one real key."""
    def rand(*shape):
        return torch.randn(*shape, generator=g)

    def pad(lengths, S):
        return torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]

    yield rand(1, 1, 1, 8), rand(1, 1, 5, 8), rand(1, 1, 5, 8), pad([5], 5)
    yield rand(2, 2, 1, 8), rand(2, 2, 6, 8), rand(2, 2, 6, 8), pad([6, 3], 6)
    yield rand(2, 4, 3, 16), rand(2, 4, 7, 16), rand(2, 4, 7, 16), pad([7, 4], 7)
    yield rand(3, 2, 9, 8), rand(3, 2, 5, 8), rand(3, 2, 5, 8), pad([2, 5, 1], 5)
    yield rand(2, 2, 6, 32), rand(2, 2, 6, 32), rand(2, 2, 6, 32), pad([6, 2], 6)
    # grouped-query attention: fewer key/value heads than query heads
    yield rand(2, 4, 3, 8), rand(2, 2, 5, 8), rand(2, 2, 5, 8), pad([5, 2], 5)
    yield rand(1, 6, 2, 8), rand(1, 3, 4, 8), rand(1, 3, 4, 8), pad([3], 4)
    yield rand(2, 4, 1, 8), rand(2, 1, 6, 8), rand(2, 1, 6, 8), pad([6, 4], 6)


@learner_check
def check_cross_attention(fn: Callable) -> None:
    """`fn(q, k, v, pad_mask) -> (B, H, T, D)`: every query attends over all of its source's real
    keys; compared with `kvlab.attention_reference` under the mask pad_mask[:, None, None, :]. k and v
    may have fewer heads than q (grouped-query attention: head j serves query heads jG..jG+G-1)."""
    g = torch.Generator().manual_seed(8)
    for q, k, v, pad_mask in _cross_cases(g):
        B, H, T, D = q.shape
        G = H // k.size(1)  # query heads per key/value head
        where = f"q {tuple(q.shape)}, k/v {tuple(k.shape)}, pad_mask {tuple(pad_mask.shape)}"
        try:
            got = call_learner(fn, q.clone(), k.clone(), v.clone(), pad_mask.clone(), name="my_cross_attention")
        except (RuntimeError, ValueError, IndexError) as err:
            if G > 1:
                raise AssertionError(f"[{where}] your function failed with {type(err).__name__}: {err}\nHint: here k "
                                     f"and v have {k.size(1)} heads for {H} query heads (grouped-query attention): "
                                     "share each key/value head among its group of query heads.") from err
            raise
        if isinstance(got, tuple):
            raise AssertionError(f"[{where}] return only the output tensor (B, H, T, D), not a tuple.")
        k_full, v_full = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, S, D)
        if G > 1 and isinstance(got, torch.Tensor) and got.shape == q.shape:
            tiled = _variant(q, k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1), pad_mask)
            grouped = _variant(q, k_full, v_full, pad_mask)
            if torch.allclose(got, tiled, atol=1e-5) and not torch.allclose(tiled, grouped):
                raise AssertionError(f"[{where}] key/value head j serves query heads j*G .. j*G+G-1 (G = {G}): "
                                     "repeat each head G times in place, not the whole stack of heads.")
        k, v = k_full, v_full
        expected, _ = attention_reference(q, k, v, pad_mask[:, None, None, :])
        same_shape = isinstance(got, torch.Tensor) and got.shape == expected.shape
        if same_shape and not torch.allclose(got, expected, atol=1e-5):
            if torch.isnan(got).any():
                raise AssertionError(
                    f"[{where}] your output has NaNs: some softmax row had no allowed key at all. Only the "
                    "padded keys must be hidden: check the mask's polarity (masked_fill fills where its "
                    "mask is True) and how you broadcast pad_mask (B, S) against the scores (B, H, T, S).")
            hints = [
                ("causal", _variant(q, k, v, pad_mask, causal=True),
                 "this looks like a causal mask. Cross-attention is not causal: the whole source is known "
                 "before decoding starts, so every target position may look at every real source token."),
                ("no mask", _variant(q, k, v, None),
                 "padded keys got some weight. Hide them before the softmax so they get exactly zero."),
                ("unscaled", _variant(q, k, v, pad_mask, scale=1.0),
                 "your weights are too peaked: scale the scores as in the formula before the softmax."),
                ("scaled by D", _variant(q, k, v, pad_mask, scale=1.0 / D),
                 "the scale is off: the scores are divided by the square root of the head width."),
                ("swapped", _variant(q, v, k, pad_mask),
                 "keys decide *where* to look (they meet the queries in the scores), values are *what* "
                 "is read: check which is which."),
            ]
            for _, variant, hint in hints:
                if torch.allclose(got, variant, atol=1e-5):
                    raise AssertionError(f"[{where}] {hint}")
        close(got, expected, f"[{where}] out = softmax(q kᵀ / √D, hiding padded keys) v, per batch row and head.")
    passed("my_cross_attention")


def _variant(q, k, v, pad_mask, *, causal=False, scale=None):
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.size(-1)) if scale is None else scale)
    if pad_mask is not None:
        scores = scores.masked_fill(~pad_mask[:, None, None, :], float("-inf"))
    if causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# --------------------------------------------------------------------------- greedy decoding

# Small random models with an untied output layer (a tied one mostly repeats the input token).
# Seeds chosen so that rows end with EOS at different steps, or never, and that the second case
# finishes every row before max_new_tokens; the tests pin these properties.
_DECODE_CASES = [
    # (label, config overrides, seed, source lengths, max_new_tokens)
    ("2 layers, 3 sources of lengths 5, 9, 2", dict(), 14, (5, 9, 2), 14),
    ("3 layers with grouped-query attention, 4 sources", dict(n_layers=3, n_kv_heads=2), 14, (7, 3, 8, 1), 16),
    ("1 layer, one source", dict(n_layers=1), 6, (6,), 12),
]
_BASE = dict(vocab_size=12, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, tie_embeddings=False)


def _decode_case(overrides: dict, seed: int, lengths):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Seq2SeqTransformer(Seq2SeqConfig(**{**_BASE, **overrides}))
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(3, _BASE["vocab_size"], (n,), generator=g)
    return model.eval(), src


def _same_up_to_eos(got: torch.Tensor, expected: torch.Tensor, eos_id: int) -> bool:
    for g_row, e_row in zip(got.tolist(), expected.tolist()):
        end = e_row.index(eos_id) + 1 if eos_id in e_row else len(e_row)
        if g_row[:end] != e_row[:end]:
            return False
    return True


def _projected_once(projections: int, n_layers: int, steps: int, where: str) -> None:
    """Fail unless the cross-attention keys and values were projected once per layer for a whole decode."""
    if projections != n_layers:
        raise AssertionError(
            f"{where} your tokens are right, but the cross-attention keys and values were projected {projections} "
            f"times for {steps} steps of a {n_layers}-layer decoder. They depend only on the source: project them "
            f"once per layer ({n_layers} in all) and reuse them.")


def _token_hints(got, expected: torch.Tensor, c: Seq2SeqConfig, where: str) -> None:
    """The mistakes of a greedy loop's bookkeeping that leave the tokens themselves right."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{where} return a tensor of token ids (B, N), got {type(got).__name__}")
    if got.dim() == 2 and got.size(0) == expected.size(0) and not torch.equal(got, expected):
        if got.size(1) >= 1 and bool((got[:, 0] == c.bos_id).all()):
            raise AssertionError(f"{where} your output starts with BOS. Return only the generated tokens; "
                                 "BOS is the decoder's first input, not an output.")
        n = expected.size(1)
        if got.size(1) > n and torch.equal(got[:, :n], expected) and bool((got[:, n:] == c.pad_id).all()):
            raise AssertionError(f"{where} the tokens are right, but every row had finished after {n} "
                                 f"steps and you returned {got.size(1)} columns: stop as soon as every "
                                 "row has emitted EOS.")
        if got.shape == expected.shape and _same_up_to_eos(got, expected, c.eos_id):
            raise AssertionError(f"{where} every row is right up to its EOS, but not after it: after "
                                 "its EOS a row must hold only PAD (its later predictions are "
                                 "meaningless).")


@learner_check
def check_greedy_decode(fn: Callable) -> None:
    """`fn(model, src, max_new_tokens) -> (B, N)`: cached greedy decoding, compared token for
    token with `kvlab.greedy_decode`; the cross-attention keys must be projected once per layer."""
    for label, overrides, seed, lengths, n_new in _DECODE_CASES:
        model, src = _decode_case(overrides, seed, lengths)
        c = model.config
        expected = greedy_decode(model, src, n_new)
        calls = []
        hooks = [b.cross_attn.kv.register_forward_hook(lambda *_: calls.append(1)) for b in model.decoder]
        try:
            with torch.no_grad():
                got = call_learner(fn, model, src.clone(), n_new, name="my_greedy_decode",
                                   without=("greedy decoder", [greedy_decode, beam_search]))
        finally:
            for h in hooks:
                h.remove()
        where = f"[{label}, max_new_tokens={n_new}]"
        _token_hints(got, expected, c, where)
        close(got, expected, f"{where} feed BOS first, then each step's argmax token, at consecutive positions; "
                             "the source's padding must be masked (model.encode and the cache do it for you).")
        _projected_once(len(calls), c.n_layers, expected.size(1), where)
    passed("my_greedy_decode")


# --------------------------------------------------------------------------- build steps: the cached decoder
#
# The chapter builds the decoder's cached step in four steps: the cross cache (the memory projected
# once per layer), one decoder layer's cached step, the whole step (token ids to logits), and the
# greedy loop around it. Each check runs the learner's code with kvlab's own version of that piece
# switched off; the lower pieces the step is made of (nn.Linear, the norms and MLPs, chapter 4's
# layer caches, the attention helpers, and the earlier build steps' library versions) stay on.

# The chapter's models have as many key/value heads as query heads; so do these. Seeds chosen, as for
# _DECODE_CASES, so that the first case has rows ending at different steps or never, the second
# finishes every row early and the third never emits EOS; the tests pin these properties.
_BUILD_CASES = [
    # (label, config overrides, seed, source lengths, max_new_tokens for the greedy loop)
    ("2 layers, 3 sources of lengths 5, 9, 2", dict(), 14, (5, 9, 2), 14),
    ("3 layers, 4 sources of lengths 7, 3, 8, 1", dict(n_layers=3), 1, (7, 3, 8, 1), 16),
    ("1 layer, one source", dict(n_layers=1), 6, (6,), 12),
]
# How each case feeds its target to a step: one token per call, or chunks (a first chunk at
# position 0, later a chunk after earlier tokens, which needs a mask built from positions).
_PLANS = [(1, 1, 1, 1, 1, 1, 1), (1, 2, 1, 1, 3), (3, 1, 2, 1)]

_PROJECT_OFF = ("projection of the memory",
                [CrossAttention.project_memory, CrossAttentionCache.from_memory, Seq2SeqTransformer.new_cache])
_LAYER_OFF = ("decoder layer", [DecoderBlock.forward, SelfAttention.forward, CrossAttention.forward])
_STEP_OFF = ("decoder", methods_of(Seq2SeqTransformer, containing="decode") + [Seq2SeqTransformer.forward])
_GREEDY_OFF = ("greedy decoder", [greedy_decode, beam_search, Seq2SeqTransformer.forward, Seq2SeqTransformer.new_cache,
                                  CrossAttentionCache.from_memory] + methods_of(Seq2SeqTransformer, containing="decode"))
_RAISED = (RuntimeError, ValueError, IndexError, TypeError, AttributeError)


def _raised(where: str, err: Exception, hint: str) -> AssertionError:
    return AssertionError(f"{where} your function failed with {type(err).__name__}: {err}\nHint: {hint}")


def _pad_mask(model, src):
    return src != model.config.pad_id


@learner_check
def check_project_memory(fn: Callable) -> None:
    """`fn(model, memory) -> [(k, v), ...]`: per decoder layer, the cross-attention keys and values of
    the memory (B, S, C), each (B, H, S, D), compared with `CrossAttention.project_memory`; each layer's
    `cross_attn.kv` must be called once, on the whole memory."""
    name = "my_project_memory"
    for label, overrides, seed, lengths, _ in _BUILD_CASES:
        model, src = _decode_case(overrides, seed, lengths)
        c, where = model.config, f"[{label}]"
        B, S = src.shape
        with torch.no_grad():
            memory = model.encode(src)
            expected = [b.cross_attn.project_memory(memory) for b in model.decoder]
            try:
                got, rows = _count_kv_calls(model, lambda: call_learner(fn, model, memory.clone(), name=name,
                                                                        without=_PROJECT_OFF))
            except _RAISED as err:
                raise _raised(where, err, "go through model.decoder; each block's cross_attn.kv is an nn.Linear "
                                          "from C to 2·C channels.") from err
        if not isinstance(got, (list, tuple)) or len(got) != c.n_layers:
            length = f" of length {len(got)}" if isinstance(got, (list, tuple)) else ""
            raise AssertionError(f"{where} return a list with one (k, v) pair per decoder layer ({c.n_layers}), "
                                 f"got {type(got).__name__}{length}")
        shape = (B, c.n_heads, S, c.head_dim)
        for i, (pair, (k_exp, v_exp)) in enumerate(zip(got, expected)):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise AssertionError(f"{where} layer {i}: expected a (k, v) pair")
            for what, t in zip("kv", pair):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                    got_shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise AssertionError(f"{where} layer {i}: {what} should be (B, H, S, D) = {shape}, one slice of "
                                         f"the channels per head, got {got_shape}.")
            k, v = pair
            if torch.allclose(k, v_exp, atol=1e-5) and torch.allclose(v, k_exp, atol=1e-5):
                raise AssertionError(f"{where} layer {i}: k holds the values and v the keys: look at which half of "
                                     "cross_attn.kv's output is which.")
            if i > 0 and torch.allclose(k, expected[0][0], atol=1e-5):
                raise AssertionError(f"{where} layer {i} holds layer 0's keys: every decoder layer has its own "
                                     "cross-attention weights, and so its own keys and values.")
            close(k, k_exp, f"{where} layer {i}: keys.")
            close(v, v_exp, f"{where} layer {i}: values.")
        if len(rows) != c.n_layers or any(r != B for r in rows):
            raise AssertionError(
                f"{where} your keys and values are right, but the layers' cross_attn.kv ran {len(rows)} times for "
                f"{c.n_layers} layers (rows per call: {rows}). One call of a layer's projection on the whole "
                "memory gives that layer's keys and values both.")
    passed(name)


def _layer_step_ref(block, x, input_pos, layer_cache, cross_kv, pad_mask, mistake=None):
    """One decoder block on new positions with its two caches: the check's reference, with each
    catalogued mistake as an option."""
    sa, ca = block.self_attn, block.cross_attn
    H, T = sa.n_heads, x.size(1)
    q, k, v = (split_heads(t, H) for t in sa.qkv(block.norm1(x)).chunk(3, dim=-1))  # each (B, H, T, D)
    if mistake == "no self cache":  # the new tokens see only each other
        mask = attention_mask(input_pos, input_pos)
    else:
        k_pos = layer_cache.key_positions(input_pos)
        k, v = layer_cache.update(k, v, input_pos)  # (B, H, S_tgt, D)
        mask = {"no mask": None, "top-left": torch.ones(T, k.size(2), dtype=torch.bool).tril()}.get(
            mistake, attention_mask(input_pos, k_pos))
    y, _ = attention_reference(q, k, v, mask)
    x = x + sa.out(merge_heads(y))
    q = split_heads(ca.q(block.norm2(x)), H)
    if mistake == "self for cross":  # the target's own keys and values
        y, _ = attention_reference(q, k, v, mask)
    else:
        y, _ = attention_reference(q, *cross_kv, None if mistake == "no pad mask" else pad_mask[:, None, None, :])
    x = x + ca.out(merge_heads(y))
    return x + block.mlp(block.norm3(x))


def _new_self_cache(c: Seq2SeqConfig, B: int, n_positions: int, n_layers: int | None = None) -> KVCache:
    return KVCache.create("static", n_layers=c.n_layers if n_layers is None else n_layers, batch_size=B,
                          n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, max_seq_len=n_positions)


def _feed(step, plan, seq, *args):
    """Call step(chunk, input_pos, *args) for each chunk of seq (B, N, ...) that plan gives; the outputs."""
    outs, start = [], 0
    for T in plan:
        outs.append(step(seq[:, start:start + T], torch.arange(start, start + T), *args))
        start += T
    return outs


_LAYER_HINTS = {
    "no self cache": "from the second call on, each new token saw only the tokens fed in the same call, as if "
                     "the target had started there: the keys and values of earlier calls are in the layer cache.",
    "top-left": "a query saw only the first keys of the target, as a mask aligned to the top-left corner of "
                "the scores does; a query at position p sees the keys at positions up to p.",
    "no mask": "in a call that feeds several tokens, a token saw the keys of tokens after it in the same call.",
    "self for cross": "the cross-attention sublayer attended over the target's own keys and values; its "
                      "keys and values describe the source.",
    "no pad mask": "the source's padding positions received cross-attention weight.",
}


@learner_check
def check_decoder_layer_step(fn: Callable) -> None:
    """`fn(block, x, input_pos, layer_cache, cross_kv, pad_mask) -> (B, T, C)`: one `DecoderBlock` on
    the residual stream x (B, T, C) of new target positions input_pos (T,), with the block's static
    self-attention cache and its (k, v) cross cache; pad_mask (B, S) is True on real source tokens.
    Fed call by call (one token, or chunks), compared with the block run once over the whole target
    without any cache."""
    name = "my_decoder_layer_step"
    g = torch.Generator().manual_seed(8)
    for (label, overrides, seed, lengths, _), plan in zip(_BUILD_CASES, _PLANS):
        model, src = _decode_case(overrides, seed, lengths)
        c, block = model.config, model.decoder[-1]
        B, N = src.size(0), sum(plan)
        x = torch.randn(B, N, c.d_model, generator=g)
        with torch.no_grad():
            pad_mask = _pad_mask(model, src)
            cross_kv = block.cross_attn.project_memory(model.encode(src))
            expected = block(x, cross_kv, is_causal=True, cross_mask=pad_mask[:, None, None, :])  # no cache at all
            variants = {m: torch.cat(_feed(lambda *a, m=m: _layer_step_ref(block, *a, mistake=m), plan, x,
                                           _new_self_cache(c, B, N, 1).layers[0], cross_kv, pad_mask), dim=1)
                        for m in _LAYER_HINTS}
            layer_cache = _new_self_cache(c, B, N, 1).layers[0]
            start = 0
            for n, T in enumerate(plan):
                where = f"[{label}; call {n + 1} of {len(plan)}, positions {start}..{start + T - 1}]"
                try:
                    got = call_learner(fn, block, x[:, start:start + T].clone(), torch.arange(start, start + T),
                                       layer_cache, tuple(t.clone() for t in cross_kv), pad_mask.clone(), name=name,
                                       without=_LAYER_OFF)
                except _RAISED as err:
                    raise _raised(where, err, "the self-attention keys and values go through "
                                  "layer_cache.update(k, v, input_pos); check the shapes on the way.") from err
                want = expected[:, start:start + T]
                if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
                    got_shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                    raise AssertionError(f"{where} return the residual stream (B, T, C) = {tuple(want.shape)}, "
                                         f"got {got_shape}.")
                if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                    for mistake, hint in _LAYER_HINTS.items():
                        if torch.allclose(got, variants[mistake][:, start:start + T], atol=1e-4, rtol=1e-4):
                            raise AssertionError(f"{where} {hint}")
                    close(got, want, f"{where} the block's three sublayers, each reading a normalised copy of "
                                     "the stream and adding its output back.", atol=1e-4, rtol=1e-4)
                start += T
        if layer_cache.length != N:
            raise AssertionError(f"[{label}] your outputs are right, but after {N} positions the layer cache "
                                 f"holds {layer_cache.length}: the next call reads its keys and values from there.")
    passed(name)


def _decoder_step_ref(model, tgt, input_pos, self_cache, cross_kv, pad_mask, mistake=None):
    """The whole decoder on new target tokens with both caches, through kvlab's blocks; the check's
    reference for the catalogued mistakes."""
    x = model.tok_emb(tgt) + model.pos_emb(torch.arange(tgt.size(1)) if mistake == "positions from 0" else input_pos)
    mask = attention_mask(input_pos, self_cache.key_positions(input_pos))
    for i, block in enumerate(model.decoder):
        x = block(x, cross_kv[i], mask=mask, cross_mask=pad_mask[:, None, None, :], cache=self_cache.layers[i],
                  input_pos=input_pos)
    return model.lm_head(x if mistake == "no final norm" else model.dec_norm(x))


_STEP_HINTS = {
    "positions from 0": "from the second call on, your logits are those of tokens placed at the start of the "
                        "target: the position table's rows must be those of the tokens' own positions.",
    "no final norm": "your logits are off at every call, the first one included, though the layers may be "
                     "right: compare what happens between the last block and the output layer with the "
                     "model's forward.",
}


@learner_check
def check_decoder_step(fn: Callable) -> None:
    """`fn(model, tgt, input_pos, self_cache, cross_kv, pad_mask) -> (B, T, V)`: the decoder's cached step
    for target ids tgt (B, T) at positions input_pos (T,), with a static `KVCache` for self-attention and
    the cross cache (a (k, v) pair per layer); fed call by call, compared with `model.decode` run once
    over the whole target without any cache."""
    name = "my_decoder_step"
    for (label, overrides, seed, lengths, _), plan in zip(_BUILD_CASES, _PLANS):
        model, src = _decode_case(overrides, seed, lengths)
        c = model.config
        B, N = src.size(0), sum(plan)
        g = torch.Generator().manual_seed(seed)
        tgt = torch.randint(3, c.vocab_size, (B, N), generator=g)
        tgt[:, 0] = c.bos_id
        with torch.no_grad():
            pad_mask = _pad_mask(model, src)
            memory = model.encode(src, pad_mask)
            cross_kv = [b.cross_attn.project_memory(memory) for b in model.decoder]
            expected = model.decode(tgt, memory, pad_mask)  # (B, N, V): every position at once, no cache
            variants = {m: torch.cat(_feed(lambda *a, m=m: _decoder_step_ref(model, *a, mistake=m), plan, tgt,
                                           _new_self_cache(c, B, N), cross_kv, pad_mask), dim=1)
                        for m in _STEP_HINTS}
            self_cache = _new_self_cache(c, B, N)
            start = 0
            for n, T in enumerate(plan):
                where = f"[{label}; call {n + 1} of {len(plan)}, positions {start}..{start + T - 1}]"
                try:
                    got = call_learner(fn, model, tgt[:, start:start + T].clone(), torch.arange(start, start + T),
                                       self_cache, list(cross_kv), pad_mask.clone(), name=name, without=_STEP_OFF)
                except _RAISED as err:
                    raise _raised(where, err, "embed the new tokens, run each decoder layer with its own layer "
                                              "cache and cross keys, then the output layer.") from err
                want = expected[:, start:start + T]
                if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
                    got_shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                    raise AssertionError(f"{where} return logits (B, T, V) = {tuple(want.shape)}, got {got_shape}.")
                if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
                    for mistake, hint in _STEP_HINTS.items():
                        if torch.allclose(got, variants[mistake][:, start:start + T], atol=1e-5, rtol=1e-4):
                            raise AssertionError(f"{where} {hint}")
                    close(got, want, f"{where} check your layer step with check_decoder_layer_step first.",
                          atol=1e-5, rtol=1e-4)
                start += T
        if self_cache.length != N:
            raise AssertionError(f"[{label}] your logits are right, but after {N} positions the self-attention "
                                 f"cache holds {self_cache.length}: each layer writes its keys into its own layer "
                                 "cache.")
    passed(name)


def _greedy_at_position_0(model, src, n_new):
    """The catalogued mistake of the loop: every step fed at position 0 (the position never advanced)."""
    c = model.config
    B = src.size(0)
    cache = model.new_cache(model.encode(src), _pad_mask(model, src), max_seq_len=max(n_new, 1))
    out = torch.full((B, n_new), c.pad_id, dtype=torch.long)
    token, finished = torch.full((B, 1), c.bos_id), torch.zeros(B, dtype=torch.bool)
    for n in range(n_new):
        nxt = torch.where(finished, c.pad_id, model.decode(token, cache=cache, input_pos=0)[:, -1].argmax(-1))
        out[:, n] = nxt
        finished |= nxt == c.eos_id
        if bool(finished.all()):
            return out[:, : n + 1]
        token = nxt[:, None]
    return out


@learner_check
def check_greedy_by_hand(fn: Callable) -> None:
    """`fn(model, src, max_new_tokens) -> (B, N)`: greedy decoding with both caches made by hand (the
    memory projected once per layer, a static `KVCache` for self-attention) around the cached step;
    compared token for token with `kvlab.greedy_decode` with and without its caches. The cross keys
    must be projected once per layer, and every step must feed only the newest token of each row."""
    name = "my_greedy_by_hand"
    for label, overrides, seed, lengths, n_new in _BUILD_CASES:
        model, src = _decode_case(overrides, seed, lengths)
        c, B = model.config, src.size(0)
        where = f"[{label}, max_new_tokens={n_new}]"
        with torch.no_grad():
            expected = greedy_decode(model, src, n_new)
            assert torch.equal(expected, greedy_decode(model, src, n_new, use_cache=False))  # the library agrees
            at_0 = _greedy_at_position_0(model, src, n_new)
            fed: list[int] = []  # rows fed to the first decoder layer's self-attention, per call
            hook = model.decoder[0].self_attn.qkv.register_forward_hook(
                lambda m, args, out: fed.append(args[0].shape[:-1].numel()))
            try:
                got, rows = _count_kv_calls(model, lambda: call_learner(fn, model, src.clone(), n_new, name=name,
                                                                        without=_GREEDY_OFF))
            except _RAISED as err:
                raise _raised(where, err, "project the memory once, make a static self-attention cache, then "
                                          "call your decoder step once per new token.") from err
            finally:
                hook.remove()
        _token_hints(got, expected, c, where)
        if isinstance(got, torch.Tensor) and got.shape == at_0.shape and torch.equal(got, at_0) \
                and not torch.equal(at_0, expected):
            raise AssertionError(f"{where} your tokens are those of a decoder fed every token at the same position: "
                                 "each step's token goes to the position after the previous one.")
        close(got, expected, f"{where} start every row from BOS, feed back each step's argmax token, and pass the "
                             "source's padding mask; build steps 1 to 3 must pass first.")
        _projected_once(len(rows), c.n_layers, expected.size(1), where)
        if any(r != B for r in fed):
            raise AssertionError(
                f"{where} your tokens are right, but the decoder was fed {sorted(set(fed))} token rows per call "
                f"for {B} sources: with the self-attention cache, the earlier tokens' keys and values are already "
                "stored; a step needs only the newest token of each row.")
    passed(name)


# --------------------------------------------------------------------------- the cross cache, several samples


def _count_kv_calls(model, fn):
    """Run fn() with a hook on every decoder layer's cross_attn.kv; return (result, rows fed per call)."""
    rows = []
    hooks = [b.cross_attn.kv.register_forward_hook(lambda m, args, out: rows.append(args[0].size(0)))
             for b in model.decoder]
    try:
        result = fn()
    finally:
        for h in hooks:
            h.remove()
    return result, rows


@learner_check
def check_cross_kv_for_samples(fn: Callable) -> None:
    """`fn(model, memory, n_samples) -> [(k, v), ...]`, one pair per decoder layer, each (B * n, Hkv, S, D):
    the cross-attention keys and values for decoding n samples of each of B sources, rows b*n .. b*n+n-1
    for source b. The memory must be projected once per layer, for the B sources, not for the B * n rows."""
    name = "my_cross_kv_for_samples"
    for label, overrides, seed, lengths, n in [("2 layers, 3 sources, 4 samples each", dict(), 14, (5, 9, 2), 4),
                                               ("3 layers with grouped-query attention, 2 sources, 3 samples",
                                                dict(n_layers=3, n_kv_heads=2), 6, (7, 3), 3),
                                               ("1 layer, one source, 1 sample", dict(n_layers=1), 6, (6,), 1)]:
        model, src = _decode_case(overrides, seed, lengths)
        c = model.config
        with torch.no_grad():
            memory = model.encode(src)
            expected = [tuple(t.repeat_interleave(n, dim=0) for t in b.cross_attn.project_memory(memory))
                        for b in model.decoder]
            got, rows = _count_kv_calls(model, lambda: call_learner(fn, model, memory.clone(), n, name=name))
        where = f"[{label}]"
        B = src.size(0)
        if not isinstance(got, (list, tuple)) or len(got) != c.n_layers:
            length = f" of length {len(got)}" if isinstance(got, (list, tuple)) else ""
            raise AssertionError(f"{where} return a list with one (k, v) pair per decoder layer ({c.n_layers}), "
                                 f"got {type(got).__name__}{length}")
        for i, (pair, (k_exp, v_exp)) in enumerate(zip(got, expected)):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise AssertionError(f"{where} layer {i}: expected a (k, v) pair")
            k, v = pair
            shape = (B * n, c.n_kv_heads, src.size(1), c.head_dim)
            for what, t in (("k", k), ("v", v)):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                    got_shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise AssertionError(f"{where} layer {i}: {what} should be (B * n, Hkv, S, D) = {shape}, got "
                                         f"{got_shape}.")
            if n > 1 and torch.allclose(k, k_exp.view(B, n, *shape[1:]).transpose(0, 1).reshape(shape), atol=1e-5) \
                    and not torch.allclose(k, k_exp, atol=1e-5):
                raise AssertionError(f"{where} layer {i}: the rows are in the wrong order. Rows b*n .. b*n+n-1 belong "
                                     "to source b (repeat each source's keys n times in place, as repeat_interleave "
                                     "does along the batch), not the whole batch n times over.")
            if torch.allclose(k, v_exp, atol=1e-5) and not torch.allclose(k, k_exp, atol=1e-5):
                raise AssertionError(f"{where} layer {i}: k holds the values. cross_attn.kv(memory) gives keys first, "
                                     "then values, along the last axis.")
            close(k, k_exp, f"{where} layer {i}: keys. Use each layer's own cross_attn.kv.", atol=1e-5)
            close(v, v_exp, f"{where} layer {i}: values. Use each layer's own cross_attn.kv.", atol=1e-5)
        if any(r != B for r in rows):
            raise AssertionError(
                f"{where} your keys and values are right, but the cross-attention projections received "
                f"{sorted(set(rows))} rows per call for {B} sources. Project the {B} sources, then repeat the "
                f"result: the samples of one source share its memory, so projecting {B * n} rows does {n} times "
                "the work.")
        if len(rows) != c.n_layers:
            raise AssertionError(
                f"{where} your keys and values are right, but the memory went through the cross-attention "
                f"projections {len(rows)} times for {c.n_layers} layers. Project it once per layer and reuse "
                "the result for every sample.")
    passed(name)


# --------------------------------------------------------------------------- experiment: projections saved


@learner_check
def check_saved_projections(answer, model: Seq2SeqTransformer, src: torch.Tensor, max_new_tokens: int) -> None:
    """`answer`: how many cross-attention projections of the memory (calls of a decoder layer's
    `cross_attn.kv`) the cross cache saves when `greedy_decode(model, src, max_new_tokens)` runs with
    the cache instead of without it. Counted here, live, with forward hooks."""
    name = "my_saved_projections"
    require_answer(answer, name)
    with torch.no_grad():
        out, cached = _count_kv_calls(model, lambda: greedy_decode(model, src, max_new_tokens))
        _, uncached = _count_kv_calls(model, lambda: greedy_decode(model, src, max_new_tokens, use_cache=False))
    if isinstance(answer, torch.Tensor) and answer.numel() == 1 and not answer.is_floating_point():
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise AssertionError(f"answer with a whole number of projections, got {answer!r}")
    L, steps = model.config.n_layers, out.size(1)
    saved = len(uncached) - len(cached)
    if answer == saved:
        passed(name)
        return
    if answer == len(uncached):
        hint = "that is the uncached run's count; the cached run projects too (once per layer): subtract it."
    elif answer in (L * (max_new_tokens - 1), L * max_new_tokens):
        hint = (f"decoding stops when every row has emitted EOS, here after {steps} steps, not {max_new_tokens}: "
                "count the calls, do not assume.")
    elif answer in (steps - 1, steps):
        hint = f"every one of the {L} decoder layers projects the memory in each uncached step."
    else:
        hint = ("put a forward hook on each decoder layer's cross_attn.kv, run greedy_decode with and without "
                "the cache, and compare the counts.")
    raise AssertionError(f"{answer} is not the number of projections the cross cache saves here. Hint: {hint}")
