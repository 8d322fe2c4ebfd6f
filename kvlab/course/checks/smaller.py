"""Checks for chapter 11: its three build steps (latent attention in the absorbed form, the
heavy-hitter eviction policy on a recorded attention map, the per-channel key quantizer) and its
exercises (DeepSeek-V2's bytes per token; how far a sink's key is rotated; the smallest window
within the seed noise).

`check_mla_absorbed` compares the learner's absorbed attention with the decompress-then-attend
form written out here, and watches every tensor the learner's code makes (a `TorchFunctionMode`):
an answer that builds per-head keys or values from the latents, which is the naive form, fails
even though its numbers are right. `check_h2o_evictions` replays the policy on attention maps
and compares every eviction with the reference below. `check_key_quantizer` holds every number
within half a step of its channel. The build checks run with kvlab's own version switched off
(`without_kvlab`). The experiments are rerun live on the shipped family. Built in chapter 11.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

from ... import eviction as _eviction_module
from ... import latent as _latent_module
from ... import lowbit as _lowbit_module
from ... import quantized as _quantized_module
from ._common import call_learner, close, judge_number, learner_check, methods_of, passed, require_answer

__all__ = ["check_mla_absorbed", "check_h2o_evictions", "check_key_quantizer", "check_v2_bytes_per_token",
           "check_sink_rotation", "check_window_budget", "h2o_reference", "sink_rotation_measured",
           "window_losses", "SINK_SETUP", "V2_SHAPE", "WINDOW_BUDGETS"]


# --------------------------------------------------------------------------- build step: absorbed MLA

def mla_naive_reference(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, mask):
    """Decompress, then attend, written out: (B, H, T, Dn)."""
    k_nope = torch.einsum("bsc,hdc->bhsd", latent[:, 0], w_uk)  # (B, H, S, Dn)
    v = torch.einsum("bsc,hdc->bhsd", latent[:, 0], w_uv)
    H = w_uk.size(0)
    k = torch.cat([k_nope, k_rope.expand(-1, H, -1, -1)], dim=-1)  # (B, H, S, Dn + Dr)
    q = torch.cat([q_nope, q_rope], dim=-1)
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


_MLA_OFF = ("latent attention (MultiHeadLatentAttention's forms, and this check's own reference)",
            [*methods_of(_latent_module.MultiHeadLatentAttention), mla_naive_reference])


class _Watch(TorchFunctionMode):
    """Records the shape of every tensor made inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _mla_case(seed: int, T: int, S: int, masked: bool):
    g = torch.Generator().manual_seed(seed)
    B, H, Dn, Dc, Dr = 2, 3, 8, 12, 4  # distinct sizes, so a per-head key (.., S, Dn) is recognisable
    case = dict(q_nope=torch.randn(B, H, T, Dn, generator=g), q_rope=torch.randn(B, H, T, Dr, generator=g),
                latent=torch.randn(B, 1, S, Dc, generator=g), k_rope=torch.randn(B, 1, S, Dr, generator=g),
                w_uk=torch.randn(H, Dn, Dc, generator=g) / 3, w_uv=torch.randn(H, Dn, Dc, generator=g) / 3,
                scale=1 / math.sqrt(Dn + Dr))
    q_pos, k_pos = torch.arange(S - T, S), torch.arange(S)
    case["mask"] = (k_pos[None, :] <= q_pos[:, None]) if masked else None  # the last T of S positions
    return case


@learner_check
def check_mla_absorbed(fn: Callable) -> None:
    """`fn(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, mask) -> (B, H, T, Dn)`: attention computed
    against the cached latents, W_uk folded into the query and W_uv applied after the weighted sum."""
    for seed, T, S, masked in ((0, 1, 11, False), (1, 4, 11, True), (2, 3, 9, True)):  # T != S: a (.., S, Dn) tensor is a key
        case = _mla_case(seed, T, S, masked)
        expected = mla_naive_reference(**case)
        watch = _Watch()
        with watch:
            got = call_learner(fn, *(v.clone() if isinstance(v, torch.Tensor) else v for v in case.values()),
                               name="my_mla_absorbed", without=_MLA_OFF)
        B, H, _, Dn = case["q_nope"].shape
        per_head = [s for s in watch.shapes if len(s) >= 2 and (s[-2:] == (S, Dn) or s[-2:] == (S, H * Dn))]
        where = f"[{T} queries over {S} latents{', masked' if masked else ''}]"
        right_shape = isinstance(got, torch.Tensor) and got.shape == expected.shape
        if right_shape and not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
            unmasked = mla_naive_reference(**{**case, "mask": None})
            other_scale = mla_naive_reference(**{**case, "scale": 1 / math.sqrt(case["latent"].size(-1)
                                                                                + case["k_rope"].size(-1))})
            if masked and torch.allclose(got, unmasked, atol=1e-5, rtol=1e-4):
                raise AssertionError(f"{where} the mask was ignored: queries see positions after their own.")
            if torch.allclose(got, other_scale, atol=1e-5, rtol=1e-4):
                raise AssertionError(f"{where} the scale is 1/sqrt(Dc + Dr), the width of the absorbed query; the "
                                     "model's scores are those of the full keys, 1/sqrt(Dn + Dr): use the `scale` given.")
        close(got, expected, f"{where} the absorbed form must give the decompress-then-attend numbers: score = "
                             "(q_nope W_uk)·c + q_rope·k_rope, times scale, softmax, the weighted sum of latents, "
                             "then W_uv per head.", atol=1e-5, rtol=1e-4)
        if per_head:
            raise AssertionError(f"{where} your code made a tensor of shape {per_head[0]}: per-head keys or values for "
                                 f"all {S} cached positions. That is the naive form (decompress, then attend); the "
                                 "absorbed form never builds them: fold W_uk into the query, attend over the latents, "
                                 "and apply W_uv after the weighted sum.")
    passed("my_mla_absorbed")


# --------------------------------------------------------------------------- build step: heavy hitters

def h2o_reference(attn: torch.Tensor, budget: int, n_sinks: int, recent: int) -> list[int]:
    """The token evicted at each step (-1: none) when a cache of `budget` tokens runs H2O over the
    recorded attention map `attn` (T, T): token t joins, then, if the cache is over budget, the kept
    token with the least attention so far goes (not one of the first n_sinks or newest `recent`; ties:
    the oldest), then query t's attention to the kept tokens is added to their scores."""
    T = attn.size(0)
    kept: list[int] = []
    scores = torch.zeros(T)
    out = []
    for t in range(T):
        kept.append(t)
        victim = -1
        if len(kept) > budget:
            candidates = kept[n_sinks:len(kept) - recent]
            victim = min(candidates, key=lambda j: (float(scores[j]), j))
            kept.remove(victim)
        for j in kept:
            scores[j] += attn[t, j]
        out.append(victim)
    return out


_EVICTION_OFF = ("eviction policies (kvlab.eviction, and this check's own reference)",
                 [_eviction_module.window_victim, _eviction_module.heavy_hitter_victim,
                  _eviction_module.observation_victim, *methods_of(_eviction_module.EvictingLayerCache),
                  h2o_reference])


def _recorded_maps() -> list[torch.Tensor]:
    """Attention maps, (T, T) lower-triangular, summed over 4 heads and rounded to multiples of 1/1024
    (so every sum of them is exact in any float type, and no answer parts from the reference by
    rounding): two drawn like a real head's rows (a few large weights, many small), and one recorded
    from the shipped family's multi-head member (layer 1, the first 64 characters of the validation
    text after BOS)."""
    from ...bench.frontier import attention_weights
    from ...data import load_shakespeare_text, train_val_split
    from ...pretrained import load_cache_family

    g = torch.Generator().manual_seed(11)
    maps = []
    for T in (24, 40):
        logits = torch.randn(4, T, T, generator=g) * 2.5
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        maps.append(((logits.softmax(-1) * 1024).round() / 1024).sum(0))
    model, tok = load_cache_family("mha")
    ids = tok.encode(train_val_split(load_shakespeare_text())[1][:63])
    x = torch.tensor([[model.record["bos"]["id"], *ids]])
    maps.append(((attention_weights(model, x)[1][0] * 1024).round() / 1024).sum(0))  # (64, 64)
    return maps


_H2O_CASES = ((0, 8, 0, 2), (0, 8, 2, 3), (1, 12, 1, 4), (1, 6, 0, 1), (2, 16, 0, 4), (2, 24, 2, 8))
# (map, budget, n_sinks, recent)


@learner_check
def check_h2o_evictions(fn: Callable) -> None:
    """`fn(attn, budget, n_sinks, recent) -> list`: the token evicted at each step of H2O over a recorded map."""
    maps = _recorded_maps()
    for m, budget, n_sinks, recent in _H2O_CASES:
        attn = maps[m]
        expected = h2o_reference(attn, budget, n_sinks, recent)
        got = call_learner(fn, attn.clone(), budget, n_sinks, recent, name="my_h2o_evictions", without=_EVICTION_OFF)
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        where = (f"[{'the recorded map' if m == 2 else 'a drawn map'}, T={attn.size(0)}, budget={budget}, "
                 f"n_sinks={n_sinks}, recent={recent}]")
        if not isinstance(got, (list, tuple)) or len(got) != attn.size(0):
            raise AssertionError(f"{where} return one entry per step ({attn.size(0)}): the token evicted then, or -1.")
        got = [int(x) for x in got]
        if got == expected:
            continue
        if got[:budget] != [-1] * budget:
            raise AssertionError(f"{where} nothing is evicted while the cache has room: the first {budget} steps "
                                 "return -1.")
        t = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        victim = got[t]
        before = [j for j in range(t + 1) if j not in got[:t]]  # tokens kept before step t's eviction
        if 0 <= victim < len(before) and before[victim] == expected[t]:
            raise AssertionError(f"{where} step {t}: you returned {victim}, the victim's place in the cache; "
                                 f"return the token itself ({expected[t]}): places shift after every eviction.")
        if victim in before[len(before) - recent:]:
            raise AssertionError(f"{where} step {t}: token {victim} is one of the newest {recent}, which the policy "
                                 "keeps.")
        if victim in before[:n_sinks]:
            raise AssertionError(f"{where} step {t}: token {victim} is one of the first {n_sinks} (the sinks), "
                                 "which the policy keeps.")
        raise AssertionError(f"{where} step {t}: you evicted {victim}, the reference evicts {expected[t]}. The score "
                             "of a token is the attention it has received from every query so far (summed, and "
                             "never reset), the lowest goes, and query t's attention is added only after step t's "
                             "eviction (the query attends over the cache as it is after the eviction).")
    passed("my_h2o_evictions")


# --------------------------------------------------------------------------- build step: key quantizer

_KEYQ_OFF = ("low-bit quantizers (kvlab.lowbit, kvlab.quantized)",
             [_lowbit_module.quantize_per_channel, _lowbit_module.quantize_per_token, _lowbit_module._min_step,
              _lowbit_module._codes, _quantized_module.quantize_int8])


def _key_test_tensor() -> torch.Tensor:
    """(2, 3, 16, 32): 16 tokens of 32 channels, with one large channel (as keys have), one constant
    channel, one channel far from zero."""
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 3, 16, 32, generator=g)
    k[..., 5] *= 40
    k[..., 9] = 0.75
    k[..., 20] += 30.0
    return k


@learner_check
def check_key_quantizer(fn: Callable) -> None:
    """`fn(k, bits) -> (codes, lo, step)`: k (..., G, D) quantized per channel over its G tokens; codes
    uint8 in 0..2^bits - 1, lo and step float16 of shape (..., 1, D)."""
    k = _key_test_tensor()
    stats = tuple(k.shape[:-2]) + (1, k.size(-1))
    for bits in (2, 4, 8):
        result = call_learner(fn, k.clone(), bits, name="my_quantize_keys", without=_KEYQ_OFF)
        where = f"[{bits} bits]"
        if not (isinstance(result, tuple) and len(result) == 3 and all(isinstance(t, torch.Tensor) for t in result)):
            raise AssertionError(f"{where} return three tensors (codes, lo, step).")
        codes, lo, step = result
        if codes.dtype != torch.uint8 or codes.shape != k.shape:
            raise AssertionError(f"{where} codes should be uint8 of k's shape {tuple(k.shape)}, got {codes.dtype} "
                                 f"{tuple(codes.shape)}.")
        for name, t in (("lo", lo), ("step", step)):
            if tuple(t.shape) == tuple(k.shape[:-1]) + (1,):
                raise AssertionError(f"{where} {name} has shape {tuple(t.shape)}: one per token, which is how values "
                                     "are quantized. Keys are quantized per channel: one lo and one step per channel, "
                                     f"taken over the G tokens, shape (..., 1, D) = {stats}.")
            if tuple(t.shape) != stats:
                raise AssertionError(f"{where} {name} should have shape (..., 1, D) = {stats}, got {tuple(t.shape)}.")
            if t.dtype != torch.float16:
                raise AssertionError(f"{where} store {name} as float16 (2 bytes), as the chapter counts.")
        top = 2 ** bits - 1
        if int(codes.max()) > top:
            raise AssertionError(f"{where} a code is {int(codes.max())}; {bits} bits hold 0..{top}.")
        s, m = step.float(), lo.float()
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise AssertionError(f"{where} a step is 0 or not finite: a constant channel has max - min = 0; give "
                                 "such a channel any positive step (1, say).")
        span = k.amax(-2, keepdim=True) - k.amin(-2, keepdim=True)
        if bool(((s > span / top * 1.01 + 1e-3) & (span > 0)).any()):
            raise AssertionError(f"{where} a step is coarser than its channel needs: each channel takes its own min "
                                 f"and max over the tokens, and {top + 1} levels split that range into {top} steps.")
        back = codes.float() * s + m
        slack = 2e-3 * (k.abs() + 1)  # float16 statistics
        err = (back - k).abs()
        if bool((err > s / 2 + slack).any()):
            low = bool(((back - k) <= slack).all())
            raise AssertionError(f"{where} reading back code * step + lo is off by up to "
                                 f"{float((err / s).max()):.2f} steps" + (
                                     ", always too small: the codes were rounded down (floor, or a cast); round to "
                                     "the nearest level." if low else
                                     ": round to the nearest level, compute the codes with the float16 lo and step "
                                     f"you store, and clamp to 0..{top}."))
    passed("my_quantize_keys")


# --------------------------------------------------------------------------- reason: DeepSeek-V2's bytes

# DeepSeek-V2 (arXiv 2405.04434, section 3.1 and appendix): 60 layers, d_c = 512, d_h^R = 64,
# 128 heads of d_h = 128; the cache in bfloat16 here (2 bytes a number).
V2_SHAPE = dict(n_layers=60, kv_latent_dim=512, rope_head_dim=64, n_heads=128, head_dim=128)


@learner_check
def check_v2_bytes_per_token(answer) -> None:
    """`answer`: bytes per token of DeepSeek-V2's MLA cache, one sequence, 2-byte numbers."""
    value = require_answer(answer, "my_v2_bytes_per_token")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"my_v2_bytes_per_token should be a number of bytes, got {type(value).__name__}.")
    L, Dc, Dr, H, D = (V2_SHAPE[k] for k in ("n_layers", "kv_latent_dim", "rope_head_dim", "n_heads", "head_dim"))
    truth = L * (Dc + Dr) * 2
    wrong = {
        L * (Dc + Dr): "that is numbers, not bytes: each is 2 bytes in bfloat16.",
        L * Dc * 2: "the decoupled RoPE key is cached too: Dr more numbers per token and layer.",
        2 * L * (Dc + Dr) * 2: "twice the cache: the latent stands for the keys and the values at once (it is "
                               "cached once, not twice), and bfloat16 numbers are 2 bytes, not 4.",
        L * (Dc + H * Dr) * 2: "the RoPE key is shared by all heads: Dr numbers per layer, not H·Dr.",
        L * 2 * H * D * 2: "that is multi-head attention's cache for this shape (128 heads of 128 keys and values).",
    }
    judge_number(value, truth, wrong, "not MLA's bytes per token: per layer, the latent (Dc numbers) and the one "
                 "shared RoPE key (Dr numbers), 2 bytes each, times the layers.", "my_v2_bytes_per_token")


# --------------------------------------------------------------------------- reason: a sink's rotation

SINK_SETUP = dict(query_pos=1000, budget=32, n_sinks=4, token=2)


def sink_rotation_measured() -> int:
    """Run positions 0..query_pos through an evicting cache of SINK_SETUP's shape (2 RoPE dims, one
    head) and return the rotation (place - true position) its last read applies to `token`'s key."""
    s = SINK_SETUP
    layer = _eviction_module.EvictingLayerCache(s["budget"], n_sinks=s["n_sinks"], rope=(2, 10000.0))
    z = torch.zeros(1, 1, 1, 2)
    for t in range(s["query_pos"] + 1):
        layer.update(z, z, torch.tensor([t]))
    kept = layer.pos[0].tolist()
    places = list(range(layer.length - len(kept), layer.length))
    return places[kept.index(s["token"])] - s["token"]


@learner_check
def check_sink_rotation(answer) -> None:
    """`answer`: by how many positions the key of sink token 2 is rotated when the query at 1000 reads."""
    value = require_answer(answer, "my_sink_rotation")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"my_sink_rotation should be a number of positions, got {type(value).__name__}.")
    s = SINK_SETUP
    truth = sink_rotation_measured()
    place = s["token"] + truth
    assert truth == s["query_pos"] - s["budget"] + 1  # the places run up to the query's position
    wrong = {
        place: f"{place} is the place the key is read at; the rotation is place - true position.",
        s["query_pos"] - s["token"]: "that would move the sink next to the query; the other kept keys sit between "
                                     "them: the cache's places run from the oldest kept token to the newest.",
        0: "sinks are renumbered too: every kept key is read at its place in the cache, and a sink's true "
           "position is far behind its place once tokens between them have been dropped.",
        truth - 1: "off by one: the newest of the 32 kept tokens is at place 1000, so the oldest is at 969.",
        truth + 1: "off by one: the newest of the 32 kept tokens is at place 1000, so the oldest is at 969.",
    }
    judge_number(value, truth, wrong, "not the rotation: find the 32 places (the newest token's is the query's "
                 "position), the sink's place among them, and subtract its true position.", "my_sink_rotation")


# --------------------------------------------------------------------------- experiment: a window's budget

WINDOW_BUDGETS = (16, 24, 32, 48, 64)


def window_losses(budgets) -> dict:
    """Loss per character of the shipped multi-head member on the chapter's 8 validation windows, through
    its full cache ("full") and through a plain window of each of `budgets`; and the family's seed noise."""
    from ...bench.frontier import family_windows, loss_through_cache
    from ...data import load_shakespeare_text, train_val_split
    from ...pretrained import load_cache_family, load_cache_family_record

    model, tok = load_cache_family("mha")
    bos, noise = model.record["bos"]["id"], load_cache_family_record()["seed_noise_val_nats_per_char"]
    x, y = family_windows(torch.tensor(tok.encode(train_val_split(load_shakespeare_text())[1])), bos, n_windows=8)
    out = {"noise": noise,
           "full": loss_through_cache(model, x, y, lambda B: model.new_cache(B, max_seq_len=x.size(1)))["nats_per_char"]}
    for b in budgets:
        out[b] = loss_through_cache(model, x, y, lambda B, b=b: _eviction_module.evicting_cache(model, B, b))[
            "nats_per_char"]
    return out


@learner_check
def check_window_budget(answer) -> None:
    """`answer`: the smallest window budget (of WINDOW_BUDGETS) within the seed noise of the full cache.
    Measured again: the answer's budget and the next smaller one."""
    value = require_answer(answer, "my_window_budget")
    if isinstance(value, bool) or value not in WINDOW_BUDGETS:
        raise AssertionError(f"my_window_budget should be one of {WINDOW_BUDGETS}, got {value!r}.")
    i = WINDOW_BUDGETS.index(value)
    asked = WINDOW_BUDGETS[max(i - 1, 0):i + 1]
    losses = window_losses(asked)
    gaps = {b: losses[b] - losses["full"] for b in asked}
    said = ", ".join(f"window {b}: {gaps[b]:+.4f}" for b in asked)
    if gaps[value] > losses["noise"]:
        raise AssertionError(f"measured again against the full cache, {said} (seed noise {losses['noise']:.4f}): "
                             f"window {value} is not within the noise; the answer is a larger budget.")
    if i > 0 and gaps[asked[0]] <= losses["noise"]:
        raise AssertionError(f"measured again against the full cache, {said} (seed noise {losses['noise']:.4f}): "
                             f"window {asked[0]} is within the noise too; the answer is a smaller budget.")
    passed("my_window_budget")
