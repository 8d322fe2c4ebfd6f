"""Checks for chapter 4, generation and the KV cache.

Each check runs the learner's code on small random models and compares it with kvlab's
reference (or with recomputing everything, which needs no cache at all). The models are built
inside `torch.random.fork_rng`, so a check never changes the notebook's random stream.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import torch

from ...attention import SelfAttention, apply_rope, attention_mask, attention_reference
from ...cache import DynamicLayerCache, KVCache, kv_cache_bytes
from ...generation import decode_step, generate
from ...gpt import GPT, GPTConfig
from ...layers import Block, rope_cos_sin
from ._common import (MODEL_STYLES, ExerciseNotDone, call_learner, close, learner_check, methods_of, passed,
                      require_answer, small_model as _model)

# kvlab's own versions of the pieces chapter 4's exercises build, switched off while they run.
_BYTES_OFF = ("cache size formula", [kv_cache_bytes])
_CONCAT_OFF = ("dynamic layer cache", methods_of(DynamicLayerCache))

__all__ = [
    "check_kv_cache_bytes",
    "check_sliding_window_mask",
    "check_concat_cache",
    "check_chunked_prefill",
    "check_modern_forward",
    "check_window_divergence",
]


def _prompt(B: int, T: int, vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# -- exercise: the memory formula -------------------------------------------------------------

_BYTES_CASES = [
    # (label, config, seq_len, batch_size, bytes_per_element)
    ("GPT-2 small, fp32", GPTConfig.from_preset("gpt2"), 1024, 1, 4),
    ("GPT-2 medium, fp16, batch 3", GPTConfig.from_preset("gpt2-medium"), 1024, 3, 2),
    ("one token", GPTConfig.from_preset("gpt2-xl"), 1, 1, 2),
    ("a GQA model (8 of 32 heads cache keys)",
     GPTConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=8192), 8192, 1, 2),
    ("multi-query (one key/value head)",
     GPTConfig(d_model=512, n_layers=6, n_heads=8, n_kv_heads=1), 300, 2, 4),
    ("tiny-modern, int8", GPTConfig.from_preset("tiny-modern"), 100, 5, 1),
    ("an empty cache", GPTConfig.from_preset("tiny"), 0, 2, 4),
]


@learner_check
def check_kv_cache_bytes(fn) -> None:
    """`fn(config, seq_len, batch_size, bytes_per_element) -> int`: bytes of a full KV cache."""
    for label, cfg, seq_len, batch, bpe in _BYTES_CASES:
        got = call_learner(fn, cfg, seq_len, batch, bpe, name="my_kv_cache_bytes", without=_BYTES_OFF)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, numbers.Real) or got != int(got):
            raise AssertionError(f"[{label}] return a whole number of bytes (an int), got {got!r}")
        got = int(got)
        per_token = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * bpe
        expected = per_token * seq_len * batch
        assert expected == kv_cache_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, seq_len, batch,
                                          {1: torch.int8, 2: torch.float16, 4: torch.float32}[bpe])
        if got == expected:
            continue
        hint = "Multiply one number per axis of the cache tensors, for every layer."
        if expected and got * 2 == expected:
            hint = "Off by a factor of 2: what does a KV cache hold for each token, besides the keys?"
        elif cfg.n_kv_heads != cfg.n_heads and got * cfg.n_kv_heads == expected * cfg.n_heads:
            hint = ("Too large by n_heads / n_kv_heads: with grouped-query attention, how many heads "
                    "have their own keys and values?")
        elif expected and got * cfg.n_layers == expected:
            hint = "Too small by n_layers: every block keeps its own cache."
        elif expected and got == expected // batch and batch > 1:
            hint = "Every sequence in the batch has its own cache."
        elif expected and got * bpe == expected:
            hint = "That is a count of numbers, not bytes: multiply by the bytes per element."
        raise AssertionError(f"[{label}] got {got:,} bytes, expected {expected:,}. {hint}")

    # And the formula must match what a real cache allocates.
    for style in MODEL_STYLES:
        model = _model(style)
        cache = model.new_cache(2, max_seq_len=37)
        got = int(call_learner(fn, model.config, 37, 2, 4, name="my_kv_cache_bytes", without=_BYTES_OFF))
        if got != cache.nbytes:
            raise AssertionError(f"[{style} model] model.new_cache(2, max_seq_len=37).nbytes is "
                                 f"{cache.nbytes:,}, your formula gives {got:,}.")
    passed("my_kv_cache_bytes")


# -- exercise: the sliding-window mask --------------------------------------------------------

def _mask_cases():
    g = torch.Generator().manual_seed(0)
    cases = [
        ("a prefill of 6 tokens, no window", torch.arange(6), torch.arange(6), None),
        ("a prefill of 7 tokens, window 3", torch.arange(7), torch.arange(7), 3),
        ("one decode step at position 9 over keys 0..9, window 4", torch.tensor([9]), torch.arange(10), 4),
        ("window 1 (each query sees only itself)", torch.arange(5), torch.arange(5), 1),
        ("a window wider than the sequence", torch.arange(5), torch.arange(5), 50),
        ("a chunk at positions 4..6 after 4 cached keys", torch.arange(4, 7), torch.arange(7), 2),
    ]
    # A ring buffer of 5 slots after 12 positions: slot s holds the position p with p % 5 == s.
    ring = torch.tensor([10, 11, 7, 8, 9])
    cases.append(("a decode step at position 12 over a 5-slot ring (slots hold 10, 11, 7, 8, 9), window 5",
                  torch.tensor([12]), ring, 5))
    # A half-filled ring: empty slots are marked with position -1.
    cases.append(("a decode step over a half-empty ring (-1 = empty slot), window 6",
                  torch.tensor([2]), torch.tensor([0, 1, 2, -1, -1, -1]), 6))
    # A multi-token step: the old ring followed by the new positions.
    cases.append(("3 new tokens at 8..10 over ring [5, 6, 7, 4] + new keys, window 4",
                  torch.arange(8, 11), torch.tensor([5, 6, 7, 4, 8, 9, 10]), 4))
    perm = torch.randperm(20, generator=g)
    cases.append(("shuffled key positions, window 7", torch.arange(10, 20), perm, 7))
    return cases


@learner_check
def check_sliding_window_mask(fn) -> None:
    """`fn(q_pos, k_pos, window) -> (T, S) bool`: True where query i may attend to key j."""
    for label, q_pos, k_pos, window in _mask_cases():
        got = call_learner(fn, q_pos.clone(), k_pos.clone(), window, name="my_sliding_window_mask")
        expected = attention_mask(q_pos, k_pos, window)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and not torch.equal(got.bool(), expected):
            q, k = q_pos[:, None], k_pos[None, :]
            if window is not None and torch.equal(got.bool(), expected | ((k == q - window) & (k >= 0))):
                hint = (f"Each query sees one key too many. With window={window}, how many positions "
                        "(counting the query's own) should be visible?")
            elif window is not None and torch.equal(got.bool(), expected & (k != q - window + 1)):
                hint = "Each query sees one key too few: the query's own position counts toward the window."
            elif torch.equal(got.bool(), expected | ((k < 0) & (k <= q))) or bool((got.bool() & (k < 0)).any()):
                hint = "Empty slots (position -1) hold no key yet: they must never be attended to."
            elif bool((got.bool() & (k > q)).any()):
                hint = "Some queries see keys from their future: causality still applies inside the window."
            else:
                hint = "Compare positions, not indices: the keys need not be sorted."
            raise AssertionError(f"[{label}] wrong mask. {hint}")
        close(got, expected, f"[{label}] the mask has one row per query and one column per key.")
    passed("my_sliding_window_mask")


# -- exercise: a concat cache -----------------------------------------------------------------

_CACHE_HINT = ("`update` gets k and v of shape (B, Hkv, T, D) and must return all keys and values so far, "
               "(B, Hkv, S, D); `length` counts the positions stored; `reset` forgets everything.")


def _run(what: str, hint: str, fn, *args, **kwargs):
    """Run code that uses the learner's work inside a model; turn its errors into a hint."""
    try:
        return fn(*args, **kwargs)
    except AssertionError:  # includes ExerciseNotDone from call_learner
        raise
    except Exception as err:  # a shape error, a ValueError from the model's position checks...
        raise AssertionError(f"{what} failed inside the model with {type(err).__name__}: {err}\n"
                             f"Hint: {hint}") from err


@learner_check
def check_concat_cache(cache_class) -> None:
    """`cache_class()` makes one layer's dynamic cache with key_positions/update/reset/length, which grows
    without copying every cached key at every step (the chapter's `torch.cat` cache fails on that last
    point only: its keys move to a new tensor at every decode step)."""
    try:
        probe = cache_class()
    except NotImplementedError as err:
        raise ExerciseNotDone("MyConcatCache is not written yet: fill in its methods") from err
    for member in ("key_positions", "update", "reset"):
        if not callable(getattr(probe, member, None)):
            raise AssertionError(f"your cache class needs a method `{member}`")
    if getattr(probe, "length", None) != 0:
        raise AssertionError(f"a new cache must have length 0, got {getattr(probe, 'length', None)!r}")

    steps = 40
    for style in MODEL_STYLES:
        model = _model(style)
        L, V = model.config.n_layers, model.config.vocab_size
        for B, T, seed in [(1, 1, 0), (2, 9, 1)]:
            prompt = _prompt(B, T, V, seed)
            label = f"[{style} model, batch {B}, prompt of {T}]"
            cache = KVCache([call_learner(cache_class, name="MyConcatCache") for _ in range(L)], "dynamic",
                            batch_size=B)
            naive = generate(model, prompt, steps, temperature=0, use_cache=False)
            cached = _run(label + " greedy generation", _CACHE_HINT, call_learner, generate, model, prompt,
                          steps, temperature=0, cache=cache, name="MyConcatCache", without=_CONCAT_OFF)
            if not torch.equal(cached, naive):
                first = int((cached != naive).any(0).nonzero()[0])
                raise AssertionError(
                    f"{label} greedy tokens differ from recomputing everything, first at position {first} "
                    f"(the prompt is 0..{T - 1}). Hint: new keys go after the old ones, along the "
                    "sequence axis of (B, Hkv, S, D).")
            if cache.length != T + steps - 1:
                raise AssertionError(f"{label} after a prompt of {T} and {steps - 1} decode steps, length "
                                     f"should be {T + steps - 1}, got {cache.length}.")

            # The same cache object, reused for another prompt: generate() calls reset() first.
            other = _prompt(B, 5, V, seed + 10)
            again = _run(label + " reusing the cache for a second prompt", _CACHE_HINT, call_learner,
                         generate, model, other, 10, temperature=0, cache=cache, name="MyConcatCache",
                         without=_CONCAT_OFF)
            if not torch.equal(again, generate(model, other, 10, temperature=0, use_cache=False)):
                raise AssertionError(f"{label} a reused cache gives wrong tokens for the second prompt. "
                                     "Hint: after reset() nothing from the first prompt may remain.")

        # A prompt fed in two chunks needs key_positions: the second chunk's mask.
        x = _prompt(2, 12, V, 3)
        cache = KVCache([cache_class() for _ in range(L)], "dynamic", batch_size=2)

        def chunks():
            with torch.no_grad():
                return torch.cat([model(x[:, :7], cache), model(x[:, 7:], cache)], 1)

        got = _run(f"[{style} model] a prompt fed in chunks of 7 and 5", _CACHE_HINT, call_learner, chunks,
                   name="MyConcatCache")
        with torch.no_grad():
            close(got, model(x), f"[{style} model] a prompt fed in chunks of 7 then 5 tokens. Hint: "
                  "key_positions(input_pos) is asked before update, and must list the position of every "
                  "key that update is about to return.", atol=1e-4, rtol=1e-4)

    # It must copy less than torch.cat: count how often the returned keys move in memory.
    moves = _count_moves(cache_class)
    if moves > _MAX_MOVES:
        raise AssertionError(
            f"the keys your cache returns moved to a new address {moves} times in {_MOVE_STEPS} decode steps "
            f"(at most {_MAX_MOVES} allowed): each move allocates a new tensor and copies every cached key, "
            "which is what torch.cat does at every step. Hint: keep spare room along the sequence axis, write "
            "new keys in place, and grow the buffers (doubling them) only when they are full.")
    passed("MyConcatCache")


_MOVE_STEPS, _MAX_MOVES = 60, 8


def _count_moves(cache_class) -> int:
    """Feed one layer cache a prefill of 5 and _MOVE_STEPS decode steps; count address changes of its keys."""
    layer = cache_class()
    g = torch.Generator().manual_seed(0)
    moves, last, pos = 0, None, 0
    for T in [5] + [1] * _MOVE_STEPS:
        k, v = torch.randn(1, 2, T, 8, generator=g), torch.randn(1, 2, T, 8, generator=g)
        k_all, _ = layer.update(k, v, torch.arange(pos, pos + T))
        pos += T
        if last is not None and k_all.data_ptr() != last:
            moves += 1
        last = k_all.data_ptr()
    return moves


# -- exercise: chunked prefill ---------------------------------------------------------------

_CHUNK_HINT = ("each chunk continues where the previous one ended: its positions are start..start+len-1, "
               "where start is the number of prompt tokens already fed (cache.length).")


@learner_check
def check_chunked_prefill(fn) -> None:
    """`fn(model, idx, cache, chunk_size) -> (B, V)`: feed the prompt in chunks, return the next logits."""
    cases = [
        # (style, window, cache kind, B, T, chunk_size)
        ("gpt2", None, "static", 2, 10, 3),
        ("gpt2", None, "dynamic", 1, 10, 1),
        ("gpt2", None, "dynamic", 2, 7, 7),
        ("gpt2", None, "static", 1, 5, 16),
        ("modern", 6, "sliding", 2, 20, 8),
        ("modern", 6, "sliding", 1, 13, 4),
    ]
    for i, (style, window, kind, B, T, chunk) in enumerate(cases):
        model = _model(style, seed=i, window=window)
        V = model.config.vocab_size
        idx = _prompt(B, T, V, seed=i)
        extra = dict(max_seq_len=T + 8) if kind == "static" else {}
        cache = model.new_cache(B, kind=kind, **extra)
        label = f"[{kind} cache, batch {B}, prompt of {T}, chunk_size={chunk}]"
        fed = []
        hook = model.tok_emb.register_forward_hook(lambda mod, args, out: fed.append(args[0].size(-1)))
        try:
            with torch.no_grad():
                got = _run(label, _CHUNK_HINT, call_learner, fn, model, idx.clone(), cache, chunk,
                           name="my_chunked_prefill")
        finally:
            hook.remove()
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (B, V):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(f"{label} expected logits of shape {(B, V)} for the token after the prompt, "
                                 f"got {shape}. Hint: one row of logits per sequence, from one position.")
        if max(fed, default=0) > chunk:
            raise AssertionError(f"{label} the model was fed {max(fed)} tokens in one call; feed at most "
                                 "chunk_size tokens per call.")
        if sum(fed) != T or cache.length != T:
            raise AssertionError(
                f"{label} the model saw {sum(fed)} prompt tokens in {len(fed)} calls and cache.length is "
                f"{cache.length}; both should be {T}. Hint: every prompt token goes through the model exactly "
                "once, and the last chunk may be shorter.")
        with torch.no_grad():
            expected = model(idx)[:, -1]
        close(got, expected, f"{label} Hint: return the logits at the last position of the last chunk; "
              "the chunks must go in at their own positions.", atol=1e-4, rtol=1e-4)

        # The cache itself must be right: continue greedily from it and compare with no cache at all.
        tokens = [expected.argmax(-1, keepdim=True)]
        for _ in range(8):
            tokens.append(decode_step(model, tokens[-1], cache).argmax(-1, keepdim=True))
        naive = generate(model, idx, 9, temperature=0, use_cache=False)[:, T:]
        if not torch.equal(torch.cat(tokens, 1), naive):
            raise AssertionError(f"{label} decoding on from your cache gives different tokens than no cache. "
                                 f"Hint: {_CHUNK_HINT}")
    passed("my_chunked_prefill")


# -- exercise: the modern cached forward (RoPE at absolute positions, grouped-query attention) --

def _reference_forward(model, idx, cache, input_pos, *, rope_at: str = "absolute", mask: str = "positions",
                       share: str = "interleave"):
    """The cached forward of a Llama-style GPT, written out; the keywords switch in a catalogued mistake
    so a check can tell which one a learner made:
        rope_at="relative"  RoPE by 0..T-1 of this call instead of the absolute positions
        mask="top-left"     SDPA's is_causal for a multi-token call (aligned top-left), none for one query
        mask="no-window"    the mask from positions, but the sliding cache's window left out
        share="tile"        key/value heads shared by tiling (h % Hkv) instead of in groups (h // G)
    """
    c = model.config
    B, T = idx.shape
    H, Hkv, D, C = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
    G = H // Hkv
    x = model.tok_emb(idx)  # (B, T, C)
    if model.pos_emb is not None:
        x = x + model.pos_emb(input_pos)
    rope = None
    if c.pos == "rope":
        rope = rope_cos_sin(input_pos if rope_at == "absolute" else torch.arange(T), D, c.rope_base)
    window = cache.window if cache.kind == "sliding" else c.window
    k_pos = cache.key_positions(input_pos)  # asked before update
    attn_mask = attention_mask(input_pos, k_pos, None if mask == "no-window" else window)  # (T, S)
    if mask == "top-left":
        attn_mask = None if T == 1 else torch.ones(T, k_pos.numel(), dtype=torch.bool).tril()
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(x)).split([C, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.layers[i].update(k, v, input_pos)  # (B, Hkv, S, D)
        if share == "interleave":
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, S, D)
        else:
            k, v = k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1)
        y, _ = attention_reference(q, k, v, attn_mask)  # (B, H, T, D)
        x = x + a.out(y.transpose(1, 2).reshape(B, T, C))
        x = x + blk.mlp(blk.norm2(x))
    return model.lm_head(model.norm_f(x))  # (B, T, V)


# (label, cache kind, window of a sliding cache, batch, the calls: tokens fed per call)
_FORWARD_CASES = [
    ("a static cache: a prefill of 9 tokens, then 12 decode steps", "static", None, 2, [9] + [1] * 12),
    ("a dynamic cache: a prompt fed in chunks of 5, 4 and 3, then 8 decode steps", "dynamic", None, 1,
     [5, 4, 3] + [1] * 8),
    ("a sliding cache with a window of 6: a prompt of 20 fed in chunks of 7, then 10 decode steps", "sliding",
     6, 2, [7, 7, 6] + [1] * 10),
]

_FORWARD_HINTS = {
    "relative": ("RoPE rotated queries and keys by 0..T-1, their places in this call. Rotate each by its "
                 "absolute position, input_pos: a key cached at position 3 was rotated by 3, and a query at "
                 "position 9 must be rotated by 9, so that their dot product sees the distance 6."),
    "top-left": ("this chunk's T queries come after earlier keys, and its mask is aligned top-left (what SDPA's "
                 "is_causal=True builds), so query i sees keys 0..i. Build the mask from positions: the "
                 "query at input_pos[i] may see every key at a position <= input_pos[i] "
                 "(cache.key_positions(input_pos), asked before update)."),
    "no-window": ("for a multi-token call a sliding cache returns its W slots and the T new keys; the mask "
                  "must also keep only each query's last W positions. Pass the cache's window (cache.window) "
                  "when you build the mask."),
    "tile": ("key/value head j serves query heads j*G .. j*G+G-1 (G = n_heads // n_kv_heads): repeat each "
             "key/value head G times in place (repeat_interleave), not the whole stack of heads."),
}

_FORWARD_RUN_HINT = ("q has n_heads heads, the cache stores and returns n_kv_heads: write the n_kv_heads keys and "
                     "values into the cache, then share each among its group of query heads (repeat_kv) before "
                     "attention. The mask is (T, S), one row per query and one column per key update returns.")


def _forward_off():
    # The piece the modern-forward exercise builds: the model's own forward and its blocks' and
    # attention's. The norms, MLPs, projections and rotation stay on: the exercise calls them.
    return ("cached forward", methods_of(GPT, containing="forward") + methods_of(Block, SelfAttention))


def _run_calls(fn, model, seq, cache, plan, name):
    """Feed seq (B, sum(plan)) through fn call by call; return each call's logits."""
    outs, start = [], 0
    for T in plan:
        pos = torch.arange(start, start + T)
        outs.append(call_learner(fn, model, seq[:, start:start + T], cache, pos, name=name, without=_forward_off())
                    if name else fn(model, seq[:, start:start + T], cache, pos))
        start += T
    return outs


@learner_check
def check_modern_forward(fn) -> None:
    """`fn(model, idx, cache, input_pos) -> (B, T, V)`: the cached forward of a Llama-style GPT (RMSNorm,
    SwiGLU, RoPE, grouped-query attention), written through `cache.layers[i].update`. Every call's logits
    are compared with `model(idx, cache, input_pos)` on a cache of the same kind, and with the model (or
    its windowed twin) run without a cache."""
    name = "my_modern_forward"
    for i, (label, kind, window, B, plan) in enumerate(_FORWARD_CASES):
        model = _model("modern", seed=10 + i)
        c = model.config
        seq = _prompt(B, sum(plan), c.vocab_size, seed=20 + i)
        label = f"[{label}; n_heads={c.n_heads}, n_kv_heads={c.n_kv_heads}]"
        extra = dict(max_seq_len=sum(plan)) if kind == "static" else dict(window=window) if kind == "sliding" else {}
        cache = model.new_cache(B, kind=kind, **extra)
        with torch.no_grad():
            got = _run(label, _FORWARD_RUN_HINT, _run_calls, fn, model, seq, cache, plan, name)
            ref_cache = model.new_cache(B, kind=kind, **extra)
            expected, start = [], 0
            for T in plan:
                expected.append(model(seq[:, start:start + T], ref_cache, torch.arange(start, start + T)))
                start += T
            if kind == "sliding":  # the same weights with the window in the model: no cache at all
                with torch.random.fork_rng(devices=[]):  # its random init is overwritten: keep the stream
                    twin = GPT(dataclasses.replace(c, window=window)).eval()
                twin.load_state_dict(model.state_dict())
                recomputed = twin(seq)
            else:
                recomputed = model(seq)
        torch.testing.assert_close(torch.cat(expected, 1), recomputed, atol=1e-4, rtol=1e-4)  # the library agrees
        start = 0
        for n, (g, e) in enumerate(zip(got, expected)):
            T = plan[n]
            where = f"{label} call {n + 1}, positions {start}..{start + T - 1}:"
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(e.shape):
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise AssertionError(f"{where} expected logits of shape {tuple(e.shape)} (B, T, V), got {shape}.")
            if not torch.allclose(g, e, atol=1e-4, rtol=1e-4):
                raise AssertionError(f"{where} your logits differ from model(idx, cache, input_pos). Hint: "
                                     + _diagnose_forward(got, model, seq, kind, extra, B, plan, n, start))
            start += T
        if cache.length != sum(plan):
            raise AssertionError(f"{label} after {sum(plan)} positions cache.length is {cache.length}. Hint: "
                                 "every layer's keys and values go through cache.layers[i].update(k, v, input_pos).")
        stored = getattr(cache.layers[0], "k", None)
        if isinstance(stored, torch.Tensor) and stored.size(1) != c.n_kv_heads:
            raise AssertionError(f"{label} the logits are right, but the cache holds {stored.size(1)} heads of keys; "
                                 f"grouped-query attention caches only n_kv_heads={c.n_kv_heads} (that is its memory "
                                 "saving). Write k and v into the cache first, repeat them after update.")
    passed(name)


def _diagnose_forward(got, model, seq, kind, extra, B, plan, n, start) -> str:
    """Name the catalogued mistake whose outputs the learner's match, else say where it went wrong."""
    variants = [("relative", dict(rope_at="relative")), ("top-left", dict(mask="top-left")),
                ("no-window", dict(mask="no-window")), ("tile", dict(share="tile"))]
    for key, kw in variants:
        with torch.no_grad():
            outs = _run_calls(functools.partial(_reference_forward, **kw), model, seq,
                              model.new_cache(B, kind=kind, **extra), plan[:n + 1], None)
        if all(isinstance(g, torch.Tensor) and g.shape == o.shape and torch.allclose(g, o, atol=1e-4, rtol=1e-4)
               for g, o in zip(got[:n + 1], outs)):
            return _FORWARD_HINTS[key]
    if n == 0:
        return ("already the first call, positions 0.. on an empty cache, is wrong: that is chapter 3's forward "
                "with the cache in between. Check the norms, RoPE on both queries and keys, the output layer "
                "(lm_head, untied here) and the causal mask.")
    return (f"the calls before this one were right. This one feeds {plan[n]} token(s) at positions {start}.."
            f"{start + plan[n] - 1}: look at the positions RoPE uses, at the mask (from input_pos and "
            "cache.key_positions(input_pos), asked before update) and at how the key/value heads are shared.")


# -- experiment: where a sliding window first changes the greedy tokens -----------------------

@learner_check
def check_window_divergence(answer, model, prompt, window: int, max_new_tokens: int = 100) -> None:
    """`answer`: the first position (counting from 0 at the prompt's first token) at which greedy
    generation of `max_new_tokens` tokens through a sliding cache of `window` slots picks a different
    token than full attention. Recomputed here with kvlab's caches."""
    name = "my_divergence_position"
    require_answer(answer, name)
    with torch.no_grad():
        full = generate(model, prompt, max_new_tokens, temperature=0)
        windowed = generate(model, prompt, max_new_tokens, temperature=0,
                            cache=model.new_cache(prompt.size(0), kind="sliding", window=window))
    differ = (full != windowed).any(0).nonzero().flatten().tolist()
    if not differ:
        raise ValueError(f"with window={window} the first {max_new_tokens} greedy tokens never differ; "
                         "choose a smaller window or more tokens")
    first, T = differ[0], prompt.size(1)
    if isinstance(answer, bool) or not isinstance(answer, numbers.Integral):
        if isinstance(answer, torch.Tensor) and answer.numel() == 1 and not answer.is_floating_point():
            answer = int(answer)
        else:
            raise AssertionError(f"answer with a whole number (a position), got {answer!r}")
    answer = int(answer)
    if answer == first:
        passed(name)
        return
    if answer == first - T:
        hint = (f"that counts the generated tokens only; count positions from the prompt's first token "
                f"(the prompt has {T}).")
    elif answer == first - 1:
        hint = "that is the position whose logits chose the first different token; give the token's own position."
    elif answer == window:
        hint = ("the window starts to matter at position W for the logits, but a greedy token changes only when "
                "the argmax does: measure it, do not derive it.")
    elif answer < T:
        hint = f"positions before {T} are the prompt, which both runs share; compare the generated tokens."
    else:
        hint = "generate with both caches and compare the two sequences position by position."
    raise AssertionError(f"{answer} is not the first position where the tokens differ. Hint: {hint}")
