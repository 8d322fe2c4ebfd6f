"""Checks for a whole layer cache: five named scenarios, and `check_cache` to run them all.

A layer cache is passed as its class (or any callable with a `kind` attribute) and built the
way kvlab builds its own caches of that kind:
    kind "dynamic"   cache_cls()
    kind "static"    cache_cls(batch_size, n_kv_heads, head_dim, max_seq_len)
    kind "sliding"   cache_cls(batch_size, n_kv_heads, head_dim, window)
so `kvlab.cache.StaticLayerCache` itself, the bug zoo's specimens and a learner's fixed
subclass all go in unchanged. A class without `kind` counts as "dynamic".

The checks, from the most basic property to the most involved (fix failures in this order):
    check_keys_values            update() keeps each key with its own value, in the right tensor
    check_decode_positions       prefill + decode steps give the tokens of generation without a cache
    check_chunked_prefill_mask   a prompt fed in chunks gives the logits of the whole prompt
    check_reset_between_prompts  a reused cache, after reset(), acts like a brand-new one
    check_window_eviction        (sliding caches) long generations equal a windowed model without a cache
A sliding cache runs the first four with a window wider than the whole run, so nothing is
evicted and it must act exactly like full attention; only the last check uses the small
`window`. The references are a small random model run without a cache (`kvlab.generate` with
`use_cache=False`, weights scaled up so greedy decoding varies), built inside
`torch.random.fork_rng` so a check never changes the notebook's random stream.
"""

from __future__ import annotations

import contextlib
import io

import torch

from ...cache import CACHE_KINDS, KVCache
from ...generation import generate
from ...gpt import GPT
from ._common import MODEL_STYLES, ExerciseNotDone, learner_check, passed, small_model as _model

__all__ = [
    "check_keys_values",
    "check_decode_positions",
    "check_chunked_prefill_mask",
    "check_reset_between_prompts",
    "check_window_eviction",
    "check_cache",
    "CacheCheckFailed",
]

_WIDE = 64  # the window of a sliding cache in every check but check_window_eviction: wider than any run
_WINDOW = 5  # check_window_eviction's default window


class CacheCheckFailed(AssertionError):
    """`check_cache`'s failure: `failed` maps each failing check's name to its message."""

    def __init__(self, message: str, failed: dict[str, str]):
        super().__init__(message)
        self.failed = failed


# -- building models and caches ---------------------------------------------------------------



def _prompt(B: int, T: int, seed: int, vocab_size: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _name(cache_cls) -> str:
    return getattr(cache_cls, "__name__", type(cache_cls).__name__)


def _kind(cache_cls) -> str:
    if not callable(cache_cls):
        raise TypeError(f"pass your cache class itself (e.g. MyCache, not MyCache()), got {type(cache_cls).__name__}")
    kind = getattr(cache_cls, "kind", "dynamic")
    if kind not in CACHE_KINDS:
        raise AssertionError(f"{_name(cache_cls)}.kind must be one of {CACHE_KINDS}, got {kind!r}")
    return kind


def _layer(cache_cls, kind: str, B: int, Hkv: int, D: int, capacity: int, window: int):
    """One layer cache, built with the constructor arguments of kvlab's cache of that kind."""
    args = {"dynamic": (), "static": (B, Hkv, D, capacity), "sliding": (B, Hkv, D, window)}[kind]
    try:
        return cache_cls(*args)
    except NotImplementedError as err:
        raise ExerciseNotDone(f"{_name(cache_cls)} is not written yet: "
                              "replace each `raise NotImplementedError`") from err
    except Exception as err:
        shown = ", ".join(map(str, args))
        raise AssertionError(f"making a {kind} layer cache as {_name(cache_cls)}({shown}) failed with "
                             f"{type(err).__name__}: {err}. A {kind} cache takes the constructor arguments of "
                             f"kvlab's own {kind} cache.") from err


def _cache(cache_cls, model: GPT, B: int, *, capacity: int = 96, window: int = _WIDE) -> KVCache:
    """A `KVCache` of `cache_cls` layers for `model`: the container kvlab's own caches use."""
    kind, c = _kind(cache_cls), model.config
    layers = [_layer(cache_cls, kind, B, c.n_kv_heads, c.head_dim, capacity, window) for _ in range(c.n_layers)]
    return KVCache(layers, kind, max_seq_len=capacity if kind == "static" else None,
                   window=window if kind == "sliding" else None, batch_size=B)


def _guard(label: str, fn, *args, **kwargs):
    """Run code that uses the learner's cache; a stub becomes ExerciseNotDone, a crash a failure."""
    try:
        with torch.no_grad():
            return fn(*args, **kwargs)
    except NotImplementedError as err:
        who = label[1:].split("]")[0].split(",")[0] if label.startswith("[") else "the cache"  # "[Name, ...]"
        raise ExerciseNotDone(f"{who} is not written yet: replace each `raise NotImplementedError`") from err
    except AssertionError:
        raise
    except Exception as err:  # a shape error, an index past the end, a ValueError from the model...
        raise AssertionError(f"{label} failed with {type(err).__name__}: {err}\nHint: update(k, v, input_pos) "
                             "gets (B, Hkv, T, D) tensors and returns every key and value attention should "
                             "see, (B, Hkv, S, D), with key_positions(input_pos) listing those S positions "
                             "(asked before update).") from err


def _first_difference(got: torch.Tensor, expected: torch.Tensor) -> int:
    return int((got != expected).any(0).nonzero()[0])


def _window_arg(kind: str, window: int | None) -> int:
    """The small window check_window_eviction uses (and check_keys_values, so the ring wraps)."""
    if window is None:
        return _WINDOW
    if kind != "sliding":
        raise ValueError(f"window is only for sliding-window caches, not kind {kind!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2, got {window!r}")
    return window


def _run_plan(model: GPT, seq: torch.Tensor, plan: list[int], cache: KVCache) -> torch.Tensor:
    """Feed seq (B, L) through the cache in consecutive pieces of the sizes in `plan` (their sum is
    L - 1), each at its own positions: teacher forcing, so one wrong token cannot hide the rest.
    Returns the logits (B, L - 1, V), as a model without a cache gives them for seq[:, :-1]."""
    out, start = [], 0
    for T in plan:
        out.append(model(seq[:, start:start + T], cache, input_pos=start))
        start += T
    return torch.cat(out, 1)


def _stepwise(model: GPT, seq: torch.Tensor, T: int, cache: KVCache) -> torch.Tensor:
    """Prefill seq[:, :T], then feed the rest one token per decode step."""
    return _run_plan(model, seq, [T] + [1] * (seq.size(1) - 1 - T), cache)


def _first_bad_position(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> int | None:
    """The first position (axis 1) where two logit tensors differ by more than `atol`, or None."""
    bad = ((got - expected).abs() > atol + 1e-4 * expected.abs()).any(-1).any(0).nonzero()
    return int(bad[0]) if bad.numel() else None


# -- probes: feed a layer cache tagged keys and values and look at what comes back -----------

def _feed(layer, chunks: list[int], B: int = 2, Hkv: int = 2, D: int = 8, seed: int = 0):
    """Feed `layer` chunks of the given sizes at consecutive positions, each key and value a distinct
    random vector. Yields (position range, key positions, k_all, v_all, fed keys, fed values)."""
    g = torch.Generator().manual_seed(seed)
    keys, values = {}, {}
    start = 0
    for T in chunks:
        input_pos = torch.arange(start, start + T)
        k = torch.randn(B, Hkv, T, D, generator=g)
        v = torch.randn(B, Hkv, T, D, generator=g)
        for t in range(T):
            keys[start + t], values[start + t] = k[:, :, t].clone(), v[:, :, t].clone()
        k_pos = layer.key_positions(input_pos.clone())
        k_all, v_all = layer.update(k, v, input_pos.clone())
        yield range(start, start + T), torch.as_tensor(k_pos).cpu(), k_all, v_all, keys, values
        start += T


def _source(row: torch.Tensor, table: dict) -> int | None:
    for pos, vec in table.items():
        if torch.equal(row, vec):
            return pos
    return None


def _describe(row: torch.Tensor, keys: dict, values: dict) -> str:
    if not bool(row.any()):
        return "zeros (a slot that was never written)"
    pos = _source(row, keys)
    if pos is not None:
        return f"the key fed at position {pos}"
    pos = _source(row, values)
    if pos is not None:
        return f"the value fed at position {pos}"
    return "something that was never fed"


def _position_probe(cache_cls, kind: str, chunks: list[int], window: int) -> str | None:
    """The first place where a key reported at position p is not the key that was fed at p."""
    try:
        layer = _layer(cache_cls, kind, 2, 2, 8, 64, window)
        for fed, k_pos, k_all, _, keys, values in _feed(layer, chunks):
            for s, p in enumerate(k_pos.tolist()):
                if 0 <= p <= fed[-1] and s < k_all.size(2) and not torch.equal(k_all[:, :, s], keys[p]):
                    step = (f"the decode step at position {fed[0]}" if len(fed) == 1
                            else f"the chunk at positions {fed[0]}..{fed[-1]}")
                    return (f"After {step}, key_positions says index {s} of the returned keys is position {p}, "
                            f"but it holds {_describe(k_all[:, :, s], keys, values)}.")
    except Exception:  # the probe only refines the hint; the failure itself was already found
        return None
    return None


def _ring_probe(cache_cls, W: int, chunks: list[int]) -> str | None:
    """Where a sliding layer cache, fed tagged keys, stops offering a query its last W positions."""
    try:
        layer = _layer(cache_cls, "sliding", 2, 2, 8, 0, W)
        for fed, k_pos, k_all, _, keys, values in _feed(layer, chunks):
            q = fed[0]  # the earliest query of this step needs positions q - W + 1 .. q
            need = set(range(max(0, q - W + 1), q + 1))
            visible = {p for p in k_pos.tolist() if p >= 0 and q - W < p <= q}
            step = (f"the decode step at position {q}" if len(fed) == 1
                    else f"the chunk at positions {fed[0]}..{fed[-1]}")
            if not need <= visible:
                missing = sorted(need - visible)
                return (f"Hint: at {step}, the query at position {q} should see positions {min(need)}..{q} (the "
                        f"last {W}), but key_positions offers {sorted(visible)}: position(s) {missing} are "
                        "missing. Look at which slot each position goes to, and which position it evicts.")
            for s, p in enumerate(k_pos.tolist()):
                if p >= 0 and q - W < p <= fed[-1] and not torch.equal(k_all[:, :, s], keys[p]):
                    return (f"Hint: at {step}, index {s} of the returned keys is reported as position {p} but "
                            f"holds {_describe(k_all[:, :, s], keys, values)}.")
    except Exception:  # the probe only refines the hint; the failure itself was already found
        return None
    return None


# -- the checks -------------------------------------------------------------------------------

@learner_check
def check_keys_values(cache_cls, window: int | None = None) -> None:
    """update() must return keys in the key tensor and values in the value tensor, each key beside
    its own value. Feeds a layer cache distinct random keys and values (a prefill, decode steps, a
    chunk) and looks at every slot it returns."""
    kind = _kind(cache_cls)
    W = _window_arg(kind, window)
    name = _name(cache_cls)
    chunks = [5, 1, 1, 1, 1, 1, 1, 3, 1, 1]

    def probe():
        layer = _layer(cache_cls, kind, 2, 2, 8, 64, W)
        for fed, k_pos, k_all, v_all, keys, values in _feed(layer, chunks):
            where = f"[after feeding positions {fed[0]}..{fed[-1]}]"
            for label, t in (("keys", k_all), ("values", v_all)):
                if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:2] != (2, 2) or t.size(3) != 8:
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise AssertionError(f"{where} update returned {label} of shape {shape}; expected "
                                         "(B, Hkv, S, D) = (2, 2, S, 8).")
            if k_all.shape != v_all.shape or k_all.size(2) != k_pos.numel():
                raise AssertionError(f"{where} update returned keys {tuple(k_all.shape)} and values "
                                     f"{tuple(v_all.shape)} for {k_pos.numel()} key positions: one key, one "
                                     "value and one position per slot.")
            for s in range(k_all.size(2)):
                k_row, v_row = k_all[:, :, s], v_all[:, :, s]
                if _source(k_row, values) is not None or _source(v_row, keys) is not None:
                    raise AssertionError(
                        f"{where} slot {s} of the returned keys holds {_describe(k_row, keys, values)} and "
                        f"the same slot of the returned values holds {_describe(v_row, keys, values)}. "
                        "Hint: follow one key tensor from update's arguments to its return value.")
                pos = _source(k_row, keys)
                if pos is not None and not torch.equal(v_row, values[pos]):
                    raise AssertionError(
                        f"{where} slot {s} of the returned keys holds the key of position {pos}, but the "
                        f"same slot of the values holds {_describe(v_row, keys, values)}. Hint: keys and "
                        "values must be written to, and read from, the same slots.")

    _guard(f"[{name}] feeding a layer cache directly", probe)
    passed(f"{name}: check_keys_values")


@learner_check
def check_decode_positions(cache_cls, window: int | None = None) -> None:
    """Prefill a prompt in one pass, then decode one token per step: the logits of every step must
    equal those of the model without a cache, and greedy tokens those of `generate(...,
    use_cache=False)`. A sliding cache gets a window wider than the run, so nothing is evicted."""
    kind = _kind(cache_cls)
    _window_arg(kind, window)
    name = _name(cache_cls)
    steps = 24
    for style in MODEL_STYLES:
        model = _model(style)
        for B, T, seed in [(2, 7, 1), (1, 1, 2)]:
            label = f"[{name}, {style} model, batch {B}, prompt of {T}, {steps} greedy tokens]"
            prompt = _prompt(B, T, seed)
            seq = generate(model, prompt, steps, temperature=0, use_cache=False)  # the reference

            # Every step's logits, with the reference's tokens fed in (one wrong token cannot hide the rest).
            got = _guard(label, _stepwise, model, seq, T, _cache(cache_cls, model, B))
            with torch.no_grad():
                expected = model(seq[:, :-1])
            bad = _first_bad_position(got, expected)
            if bad is not None:
                if bad < T:
                    hint = (f"the prefill's own logits are already wrong (first at position {bad}), before any "
                            f"decode step: look at what update returns when the prompt's {T} token(s) go in at "
                            "position 0.")
                else:
                    hint = (f"the prefill's logits are right; the decode step at position {bad} is the first "
                            "that is not. Look at where a decode step writes its key and value, and which "
                            "slots update returns for it.")
                probe = _position_probe(cache_cls, kind, [T, 1, 1, 1, 1], _WIDE)
                raise AssertionError(f"{label} logits differ from the model without a cache. Hint: {hint}"
                                     + (f"\n{probe}" if probe else ""))

            cache = _cache(cache_cls, model, B)
            tokens = _guard(label, generate, model, prompt, steps, temperature=0, cache=cache)
            if not torch.equal(tokens, seq):
                first = _first_difference(tokens, seq)
                raise AssertionError(f"{label} greedy tokens differ from generation without a cache, first at "
                                     f"position {first}, although every step's logits matched when fed the "
                                     "same tokens. Hint: generate() calls reset() before the prefill.")
            if cache.length != T + steps - 1:
                raise AssertionError(f"{label} after a prompt of {T} and {steps - 1} decode steps, cache.length "
                                     f"should be {T + steps - 1}, got {cache.length}. Hint: length is the "
                                     "position the next token goes to.")
    passed(f"{name}: check_decode_positions")


@learner_check
def check_chunked_prefill_mask(cache_cls, window: int | None = None) -> None:
    """Feed prompts in chunks of several tokens: every chunk's logits must equal those of the whole
    prompt run without a cache. After the first chunk, T queries attend over S > T keys, and the
    model builds that mask from key_positions."""
    kind = _kind(cache_cls)
    _window_arg(kind, window)
    name = _name(cache_cls)
    for style in MODEL_STYLES:
        model = _model(style, seed=1)
        for B, sizes, seed in [(2, [5, 4, 3, 2], 3), (1, [2, 9], 4)]:
            x = _prompt(B, sum(sizes), seed)
            label = f"[{name}, {style} model, batch {B}, a prompt of {sum(sizes)} fed in chunks of {sizes}]"
            cache = _cache(cache_cls, model, B)
            with torch.no_grad():
                full = model(x)
            start = 0
            for i, T in enumerate(sizes):
                got = _guard(label, model, x[:, start:start + T], cache, input_pos=start)
                expected = full[:, start:start + T]
                if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
                    if i == 0:
                        hint = ("even the first chunk, a plain prefill from position 0, is wrong: "
                                "run check_keys_values and check_decode_positions first.")
                    else:
                        hint = (f"the chunks before it are right. Here {T} queries at positions {start}.."
                                f"{start + T - 1} attend over {start + T} keys, and the model builds their mask "
                                "from your key_positions(input_pos) (asked before update). Print "
                                "kvlab.attention_mask(q_pos, cache.key_positions(input_pos)) for this chunk "
                                "and compare it with the mask the queries need.")
                    raise AssertionError(f"{label} the logits of chunk {i + 1} (positions {start}..{start + T - 1}) "
                                         f"differ from the whole prompt's. Hint: {hint}")
                start += T
    passed(f"{name}: check_chunked_prefill_mask")


@learner_check
def check_reset_between_prompts(cache_cls, window: int | None = None) -> None:
    """Use one cache for a prompt and 20 generated tokens, reset() it, then run a second prompt and
    decode steps: every logit must equal that of a brand-new cache of the same class. (Compared
    with a new cache, not with the model alone, so this check blames reset() only.)"""
    kind = _kind(cache_cls)
    _window_arg(kind, window)
    name = _name(cache_cls)
    for style in MODEL_STYLES:
        model = _model(style, seed=2)
        first = _prompt(2, 12, 5)
        second = generate(model, _prompt(2, 9, 6), 12, temperature=0, use_cache=False)
        label = f"[{name}, {style} model, a prompt of 12 + 20 generated tokens, reset(), then a prompt of 9]"

        reused = _cache(cache_cls, model, 2)
        _guard(label, generate, model, first, 20, temperature=0, cache=reused)
        _guard(label, reused.reset)
        if reused.length != 0:
            raise AssertionError(f"{label} after reset(), length should be 0, got {reused.length}.")
        got = _guard(label, _stepwise, model, second, 9, reused)
        expected = _guard(label, _stepwise, model, second, 9, _cache(cache_cls, model, 2))
        bad = _first_bad_position(got, expected, atol=1e-5)
        if bad is not None:
            where = "the prefill" if bad < 9 else f"the decode step at position {bad}"
            raise AssertionError(f"{label} the second prompt's logits differ from a new cache's, first in {where} "
                                 f"(position {bad}). Hint: something from the first prompt is still visible to "
                                 "the second. List everything update and key_positions read, and what reset() "
                                 "does to each.")
    passed(f"{name}: check_reset_between_prompts")


@learner_check
def check_window_eviction(cache_cls, window: int | None = None) -> None:
    """A sliding cache with a small window W (default 5): short and long prompts, chunked prefill,
    and decoding far past W must give the logits and greedy tokens of a model with
    `config.window = W` run without a cache."""
    kind = _kind(cache_cls)
    if kind != "sliding":
        raise ValueError(f"check_window_eviction is for sliding-window caches (kind 'sliding'); "
                         f"{_name(cache_cls)} has kind {kind!r}")
    W = _window_arg(kind, window)
    name = _name(cache_cls)
    for style in MODEL_STYLES:
        model = _model(style, seed=3, window=W)  # its own mask keeps each query's last W positions
        scenarios = [  # (batch, prompt chunks, decode steps)
            (2, [2], 4 * W + 3),  # a short prompt, then decode far past the window
            (1, [2 * W + 3], 2 * W),  # a prompt longer than the window in one pass
            (2, [W + 2, 2, max(2, W - 1), 2 * W + 1], 10),  # chunks shorter and longer than the window
        ]
        for i, (B, chunks, steps) in enumerate(scenarios):
            T = sum(chunks)
            label = (f"[{name}, window {W}, {style} model, batch {B}, a prompt of {T}"
                     + (f" fed in chunks of {chunks}" if len(chunks) > 1 else "") + f", {steps} greedy tokens]")
            prompt = _prompt(B, T, 7 + i)
            seq = generate(model, prompt, steps, temperature=0, use_cache=False)
            plan = chunks + [1] * (steps - 1)
            got = _guard(label, _run_plan, model, seq, plan, _cache(cache_cls, model, B, window=W))
            with torch.no_grad():
                expected = model(seq[:, :-1])
            bad = _first_bad_position(got, expected)
            if bad is not None:
                where = (f"the decode step at position {bad}" if bad >= T
                         else f"the prompt, at position {bad}")
                probe = _ring_probe(cache_cls, W, plan)
                raise AssertionError(
                    f"{label} logits differ from the windowed model without a cache, first in {where}. "
                    + (probe or "Hint: look at which slot each position goes to, and which position it evicts."))
            if len(chunks) == 1:
                tokens = _guard(label, generate, model, prompt, steps, temperature=0,
                                cache=_cache(cache_cls, model, B, window=W))
                if not torch.equal(tokens, seq):
                    raise AssertionError(f"{label} greedy tokens differ from the windowed model without a cache, "
                                         f"first at position {_first_difference(tokens, seq)}, although every "
                                         "step's logits matched when fed the same tokens. Hint: generate() calls "
                                         "reset() before the prefill.")
    passed(f"{name}: check_window_eviction (window {W})")


_CLASS_BOOKKEEPING = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
                      "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__"}


def _require_override(cache_cls) -> None:
    """A fix-the-bug stub subclasses a zoo cache and overrides nothing yet: not done, not failed."""
    # Everything the class body defines, __init__ included, but not the bookkeeping Python adds to every class.
    own = {k for k in vars(cache_cls) if k not in _CLASS_BOOKKEEPING}
    zoo_bases = [b for b in cache_cls.__mro__[1:] if b.__module__ == "kvlab.course.bugzoo"]
    if not own and zoo_bases:
        raise ExerciseNotDone(f"{_name(cache_cls)} is not written yet: override the method that holds "
                              f"{zoo_bases[0].__name__}'s bug")


_CHECKS = (check_keys_values, check_decode_positions, check_chunked_prefill_mask, check_reset_between_prompts,
           check_window_eviction)


@learner_check
def check_cache(cache_cls, window: int | None = None) -> None:
    """Run every check that applies to `cache_cls` (all five for a sliding cache, the first four
    otherwise) and report which named checks fail, each with its message. `window` is the small
    window check_window_eviction uses (sliding caches only; default 5)."""
    kind = _kind(cache_cls)
    _window_arg(kind, window)
    name = _name(cache_cls)
    _require_override(cache_cls)
    checks = [c for c in _CHECKS if kind == "sliding" or c is not check_window_eviction]
    failed: dict[str, str] = {}
    for check in checks:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                check.__wrapped__(cache_cls, window)  # raising, not the notebook-facing wrapper
        except ExerciseNotDone:
            raise
        except AssertionError as err:
            failed[check.__name__] = str(err)
    if failed:
        lines = [f"{name} (kind {kind!r}) fails {len(failed)} of {len(checks)} checks: {', '.join(failed)}", ""]
        for check in checks:
            mark = "FAIL" if check.__name__ in failed else "ok  "
            lines.append(f"  {mark} {check.__name__}")
        for check_name, message in failed.items():
            lines.append(f"\n{check_name}: {message}")
        if len(failed) > 1:
            lines.append("\nThe checks go from the most basic property to the most involved: fix the first "
                         "failure first, it may be the cause of the others.")
        raise CacheCheckFailed("\n".join(lines), failed)
    passed(f"{name} (kind {kind!r}): " + ", ".join(c.__name__ for c in checks))
