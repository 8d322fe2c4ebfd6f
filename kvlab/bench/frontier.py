"""Chapter 11's measurements: how much each way of shrinking the cache costs, on one model family.

Every number here comes from the same protocol, so that all of them fit on one plot:

- the text is the validation split of Tiny Shakespeare, cut into consecutive windows of
  `length` characters; a window is fed as the start token (BOS) + its first length - 1
  characters, and all `length` characters are predicted, the first from BOS alone (the family's
  `evaluate_split(bos=...)` windows);
- a cache method is measured **teacher-forced, one token per forward**, through the cache it
  makes (`loss_through_cache`), exactly as a generation loop would feed it; its quality is the
  mean cross-entropy in nats per character, and how often its most likely character is the one
  the full-cache model ranks first (top-1 agreement);
- its size is the cache's own `nbytes` after the window's last token, per token of the window
  (bytes per token of context, float32 unless a method says otherwise), so an evicting cache of
  budget 32 over 128 tokens counts a quarter of its per-token size.

`frontier` runs a list of methods over the family's shipped models and returns one point per
method; `long_context` measures eviction past the training length; `sink_share` measures the
attention every head puts on the first token. `python -m kvlab.bench --frontier` writes the record
and the plot. Built in chapter 11.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..eviction import evicting_cache
from ..lowbit import lowbit_cache
from ..validation import check_positive_int

__all__ = ["EVICTION_POLICY_SETTINGS", "eviction_settings", "FRONTIER_METHODS", "family_windows", "loss_through_cache",
           "method_cache", "frontier", "long_context",
           "attention_weights", "sink_share", "plot_frontier"]

# KIVI's groups and exact recent tokens, scaled to 128-token windows (its authors' examples keep 32
# exact tokens of contexts in the thousands; here 16 of 128 are already an eighth of the cache).
KIVI_SHORT = dict(group=16, residual=16)

# The four eviction policies as chapter 11 measures them at a budget b: label prefix -> the arguments of
# `evicting_cache`. H2O protects the newest half of its budget; SnapKV the newest quarter, voting with as
# many queries (its rule needs recent >= observe_window), plus one sink.
EVICTION_POLICY_SETTINGS: dict[str, Callable[[int], dict]] = {
    "window": lambda b: dict(budget=b, policy="window"),
    "sinks 4 + window": lambda b: dict(budget=b, policy="window", n_sinks=4),
    "H2O": lambda b: dict(budget=b, policy="h2o", recent=b // 2),
    "SnapKV vote": lambda b: dict(budget=b, policy="snapkv", recent=b // 4, observe_window=b // 4, n_sinks=1),
}


def eviction_settings(budget: int) -> dict[str, dict]:
    """{"window 32": evicting_cache's arguments, ...}: the four policies at `budget`. Built in chapter 11."""
    return {f"{name} {budget}": make(budget) for name, make in EVICTION_POLICY_SETTINGS.items()}


# label -> (family member, cache maker name, its arguments). Eviction and low bits are measured on the
# baseline (mha); two combinations show what composes. Bytes are float32 unless the method stores less.
FRONTIER_METHODS: dict[str, tuple[str, str, dict]] = {
    "MHA": ("mha", "dense", {}),
    "GQA (2 KV heads)": ("gqa", "dense", {}),
    "MQA (1 KV head)": ("mqa", "dense", {}),
    "MLA (latent 48 + RoPE 16)": ("mla", "dense", {}),
    **{f"{name} {b}": ("mha", "evict", make(b))
       for name, make in EVICTION_POLICY_SETTINGS.items() for b in (16, 32, 64)},
    "int8": ("mha", "int8", {}),
    **{f"KIVI {bits}-bit": ("mha", "lowbit", dict(bits=bits, **KIVI_SHORT)) for bits in (4, 2)},
    "MQA + KIVI 4-bit": ("mqa", "lowbit", dict(bits=4, **KIVI_SHORT)),
    "MQA + sinks 4 + window 32": ("mqa", "evict", EVICTION_POLICY_SETTINGS["sinks 4 + window"](32)),
}


def family_windows(ids: Tensor, bos: int, *, length: int = 128, n_windows: int = 16, start: int = 0
                   ) -> tuple[Tensor, Tensor]:
    """(x, y), each (n_windows, length): consecutive windows of `ids` from `start`; x is bos + the
    window's first length - 1 tokens, y the window. Built in chapter 11."""
    check_positive_int("length", length)
    check_positive_int("n_windows", n_windows)
    need = start + n_windows * length
    if need > len(ids):
        raise ValueError(f"{n_windows} windows of {length} from {start} need {need} tokens; ids has {len(ids)}")
    y = ids[start:need].reshape(n_windows, length)
    x = torch.cat([torch.full_like(y[:, :1], bos), y[:, :-1]], dim=1)
    return x, y


def method_cache(model, kind: str, batch_size: int, length: int, **kwargs):
    """The cache a frontier method feeds: "dense" (the model's own, static), "int8" (chapter 10's),
    "evict" (`kvlab.eviction.evicting_cache`) or "lowbit" (`kvlab.lowbit.lowbit_cache`)."""
    if kind == "dense":
        return model.new_cache(batch_size, max_seq_len=length)
    if kind == "int8":
        return model.new_cache(batch_size, max_seq_len=length, quantize="int8")
    if kind == "evict":
        return evicting_cache(model, batch_size, **kwargs)
    if kind == "lowbit":
        return lowbit_cache(model, batch_size, **kwargs)
    raise ValueError(f"kind must be one of dense, int8, evict, lowbit; got {kind!r}")


def _fed_one_at_a_time(model, x: Tensor, cache) -> Tensor:
    """Logits (B, L, V) of x (B, L) fed one token per forward through `cache`, as generation feeds it."""
    return torch.cat([model.forward_unchecked(x[:, t:t + 1], cache, t) for t in range(x.size(1))], dim=1)


@torch.inference_mode()
def loss_through_cache(model, x: Tensor, y: Tensor, make_cache: Callable[[int], object]) -> dict:
    """Feed x (B, L) one token per forward through `make_cache(B)`; return nats_per_char against
    y, top1_agreement with the model's full forward, and bytes_per_token (the cache's nbytes after
    the last token / (B·L)). Built in chapter 11."""
    B, L = x.shape
    cache = make_cache(B)
    logits = _fed_one_at_a_time(model, x, cache)  # (B, L, V)
    full = model(x)
    return {
        "nats_per_char": F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item(),
        "top1_agreement": (logits.argmax(-1) == full.argmax(-1)).float().mean().item(),
        "bytes_per_token": cache.nbytes / (B * L),
    }


def frontier(models: dict, x: Tensor, y: Tensor, methods: dict | None = None, *, progress: bool = False) -> list[dict]:
    """One point per method of `methods` (default FRONTIER_METHODS): label, member, kind, arguments,
    nats_per_char, top1_agreement (against the same member's full cache), bytes_per_token, seconds.
    `models` maps family member names to loaded models. Built in chapter 11."""
    methods = FRONTIER_METHODS if methods is None else methods
    missing = sorted({m for m, _, _ in methods.values()} - set(models))
    if missing:
        raise ValueError(f"models has no {missing}; the methods need them")
    points = []
    for label, (member, kind, kwargs) in methods.items():
        t0 = time.perf_counter()
        model = models[member]
        result = loss_through_cache(model, x, y, lambda B: method_cache(model, kind, B, x.size(1), **kwargs))
        points.append({"label": label, "member": member, "kind": kind, "args": kwargs, **result,
                       "seconds": round(time.perf_counter() - t0, 2)})
        if progress:
            p = points[-1]
            print(f"  {label:28s} {p['bytes_per_token']:7.0f} B/token  {p['nats_per_char']:.4f} nats/char  "
                  f"top-1 {p['top1_agreement']:.3f}  ({p['seconds']} s)")
    return points


def long_context(model, ids: Tensor, bos: int, *, length: int = 512, n_windows: int = 4, budget: int = 64,
                 past: int = 128) -> dict:
    """Eviction past the training length: windows of `length` tokens fed one at a time through the
    model's sliding window (its own attention window, all of it kept) and through evicting caches
    of `budget` tokens; nats per character over the positions >= `past`. Built in chapter 11."""
    x, y = family_windows(ids, bos, length=length, n_windows=n_windows)
    methods = {f"sliding window {model.config.window}": lambda B: model.new_cache(B, kind="sliding"),
               **{label: (lambda B, kw=kw: evicting_cache(model, B, **kw))
                  for label, kw in eviction_settings(budget).items()}}
    out = {}
    with torch.inference_mode():
        for label, make in methods.items():
            logits = _fed_one_at_a_time(model, x, make(x.size(0)))
            out[label] = F.cross_entropy(logits[:, past:].flatten(0, 1).float(), y[:, past:].flatten()).item()
    return out


@torch.inference_mode()
def attention_weights(model, x: Tensor) -> list[Tensor]:
    """The attention weights of every layer for inputs x (B, T), each (B, H, T, T): one full forward
    with each attention layer asked for its weights (`return_weights=True`) through hooks. Built
    in chapter 11."""
    weights = []

    def ask_weights(module, args, kwargs):
        return args, {**kwargs, "return_weights": True}

    def keep_weights(module, args, kwargs, output):
        out, w = output  # w (B, H, T, S)
        weights.append(w)
        return out

    hooks = []
    for block in model.blocks:
        hooks.append(block.attn.register_forward_pre_hook(ask_weights, with_kwargs=True))
        hooks.append(block.attn.register_forward_hook(keep_weights, with_kwargs=True))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return weights


def sink_share(model, x: Tensor, *, from_pos: int = 32) -> Tensor:
    """(n_layers, n_heads): the mean attention weight that queries at positions >= `from_pos` put on
    position 0 (the BOS of a family window), per layer and head. A uniform share would be the
    mean of 1/(p + 1) over those positions. Built in chapter 11."""
    return torch.stack([w[:, :, from_pos:, 0].mean(dim=(0, 2)) for w in attention_weights(model, x)])


def plot_frontier(points: list[dict], ax=None, *, live: list[dict] | None = None):
    """Loss per character against KV bytes per token (log axis): dense members as large dots, each
    eviction policy and the low-bit caches as lines, `live` points (measured now) as crosses."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.8))
    groups: dict[str, list[dict]] = {}
    for p in points:
        name = p["label"].rsplit(" ", 1)[0] if p["kind"] == "evict" and not p["label"].startswith("MQA") else (
            "KIVI" if p["kind"] == "lowbit" and p["member"] == "mha" else p["label"])
        groups.setdefault(name, []).append(p)
    colors = plt.get_cmap("tab20").colors  # pairs (dark, light): the ten dark ones first, then their light twins
    for i, (name, group) in enumerate(groups.items()):
        group = sorted(group, key=lambda p: p["bytes_per_token"])
        xs, ys = [p["bytes_per_token"] for p in group], [p["nats_per_char"] for p in group]
        kind = group[0]["kind"]
        marker = {"dense": "o", "int8": "D", "lowbit": "s"}.get(kind, "^")
        if group[0]["label"].startswith("MQA +"):
            marker = "*"  # two ideas combined
        ax.plot(xs, ys, marker + ("-" if len(group) > 1 else ""), ms=10 if marker in "o*" else 6,
                color=colors[(2 * i) % 20 + (i >= 10)], label=name)
    if live:
        ax.plot([p["bytes_per_token"] for p in live], [p["nats_per_char"] for p in live], "kx", ms=8,
                label="measured in this run")
    ax.set_xscale("log")
    ax.set_xlabel("KV cache bytes per token of context (log scale)")
    ax.set_ylabel("validation loss (nats per character)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, off the points
    return ax
