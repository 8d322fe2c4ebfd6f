"""Plots shared by the chapters: one figure style, attention heatmaps.

Built in chapter 2; later chapters add their plots here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .validation import check_int

__all__ = ["use_style", "attention_heatmap", "plot_bench", "kv_dashboard_frames", "animate_kv_dashboard"]

STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 110,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "font.size": 10,
    "image.cmap": "viridis",
}


def use_style() -> None:
    """Apply the course's matplotlib style (call once at the top of a notebook)."""
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)


def attention_heatmap(
    weights: torch.Tensor,
    *,
    queries: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
    ax=None,
    title: str | None = None,
    colorbar: bool = True,
):
    """Draw a (T, S) attention-weight matrix: row = query, column = key, colour = weight.

    Masked entries (weight exactly 0) are drawn blank so the shape of the mask is visible.
    Returns the matplotlib Axes. Built in chapter 2.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    w = weights.detach().float().cpu()
    if w.dim() != 2:
        raise ValueError(f"weights must be a (T, S) matrix, got shape {tuple(w.shape)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.35 * w.size(1), 1.0 + 0.35 * w.size(0)))
    data = np.ma.masked_where(w.numpy() == 0, w.numpy())
    im = ax.imshow(data, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if keys is not None:
        ax.set_xticks(range(len(keys)), keys, rotation=90)
    if queries is not None:
        ax.set_yticks(range(len(queries)), queries)
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_bench(result: dict):
    """Plot a `kvlab.bench` result: per-token latency traces and throughput by setting.

    Left: the median latency of each decode step (cached runs stay flat, uncached runs grow
    with the sequence). Right: generated tokens per second for every setting. Returns the
    Figure. Built in chapter 5.
    """
    import matplotlib.pyplot as plt

    fig, (ax_trace, ax_tput) = plt.subplots(1, 2, figsize=(11, 4))
    labels, values = [], []
    for r in result["results"]:
        name = f"{r['backend']} {'cached' if r['use_cache'] else 'uncached'} B={r['batch_size']} T={r['prompt_len']}"
        ax_trace.plot([t * 1e3 for t in r["step_trace_s"]], label=name, lw=1)
        labels.append(f"{name} N={r['new_tokens']}")
        values.append(r["throughput_tok_s"]["median"])
    ax_trace.set_xlabel("decode step")
    ax_trace.set_ylabel("latency (ms)")
    ax_trace.set_title("Time per output token")
    ax_trace.legend(fontsize=7)
    ax_tput.barh(range(len(values)), values)
    ax_tput.set_yticks(range(len(values)), labels, fontsize=7)
    ax_tput.set_xlabel("generated tokens / s")
    ax_tput.set_title(f"Throughput ({result['device']}, {result['dtype']})")
    fig.tight_layout()
    return fig


def plot_speedup(table: dict, ax=None):
    """Tokens per second against the number of generated tokens, with and without the KV cache,
    from a `kvlab.speedup.speedup_table` result (`python -m kvlab.bench --speedup-table --plot`).

    Throughput is batch × new tokens / the generation's whole time. Without the cache every step
    recomputes the whole sequence, so its rate falls as the text grows; with it the rate stays
    nearly flat. Returns the Figure. Built in chapter 5.
    """
    import matplotlib.pyplot as plt

    if not isinstance(table, dict) or not table.get("rows"):
        raise ValueError("table must be a dict returned by speedup_table (with 'rows')")
    fig = ax.figure if ax is not None else plt.subplots(figsize=(6.4, 4.0))[1].figure
    ax = ax if ax is not None else fig.axes[0]
    rows = sorted(table["rows"], key=lambda r: r["new_tokens"])
    lengths = [r["new_tokens"] for r in rows]
    batch = table.get("batch_size", 1)
    unit = "CPU second" if table.get("clock") == "process" else "second"
    for key, label, style in (("cached_s", "KV cache", "o-"), ("uncached_s", "no cache", "s--")):
        ax.plot(lengths, [batch * n / r[key] for n, r in zip(lengths, rows)], style, label=label)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel(f"generated tokens per {unit}")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Throughput against length ({table.get('device', '')}, {table.get('dtype', '')}, "
                 f"batch {batch}, prompt {table.get('prompt_len', '?')})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    return fig


def kv_dashboard_frames(model, idx: torch.Tensor, steps: int, *, layer: int = 0, head: int = 0,
                        kind: str = "static", window: int | None = None, cache_len: int | None = None) -> list[dict]:
    """Record what one attention head sees at each decode step, for `animate_kv_dashboard`.

    Greedy-generates `steps` tokens after `idx` (1, T) with a cache of `kind` ("static",
    "dynamic" or "sliding" with `window`), and for each decode step stores, for `head` of
    `layer`: the query (D,), the cached keys and values (S, D), the position of each key
    (-1 = empty slot) and the attention weights (S,). The weights are recomputed from q and K
    and checked against the layer's real output. A static cache holds `cache_len` positions
    (default: the model's max_seq_len), one row each in the picture. Built in chapter 4 (the KV
    dashboard).
    """
    from .attention import attention_reference, repeat_kv
    from .generation import decode_step, next_token, prefill

    if idx.dim() != 2 or idx.size(0) != 1:
        raise ValueError(f"idx must be one prompt of shape (1, T), got {tuple(idx.shape)}")
    if not 0 <= layer < model.config.n_layers or not 0 <= head < model.config.n_heads:
        raise ValueError(f"layer must be in [0, {model.config.n_layers - 1}] and head in "
                         f"[0, {model.config.n_heads - 1}], got layer={layer}, head={head}")
    attn = model.blocks[layer].attn
    seen: dict = {}
    original = attn.attend_and_project

    def spy(q, k, v, mask, is_causal, return_weights):
        seen.update(q=q, k=k, v=v, mask=mask)
        return original(q, k, v, mask, is_causal, return_weights)

    if kind != "static" and cache_len is not None:
        raise ValueError(f"cache_len is for kind='static' only, got kind={kind!r}")
    check_int("cache_len", cache_len, low=idx.size(1) + steps, high=model.config.max_seq_len, allow_none=True,
              note="the prompt + steps, up to max_seq_len")
    cache = model.new_cache(1, kind=kind, window=window) if kind != "static" else \
        model.new_cache(1, max_seq_len=cache_len)
    frames = []
    attn.attend_and_project = spy  # an instance attribute shadows the method for this one layer only
    try:
        with torch.inference_mode():
            logits = prefill(model, idx, cache)
            token = next_token(logits, temperature=0)
            for step in range(steps):
                position = cache.length
                key_pos = cache.key_positions(torch.tensor([position])).cpu()
                logits = decode_step(model, token, cache)
                n_rep = attn.n_heads // attn.n_kv_heads
                q = seen["q"][0, head, -1]  # (D,)
                k = repeat_kv(seen["k"], n_rep)[0, head]  # (S, D)
                v = repeat_kv(seen["v"], n_rep)[0, head]
                mask = seen["mask"]
                row_mask = mask.reshape(-1, k.size(0))[-1] if mask is not None else None
                _, weights = attention_reference(q[None], k, v, row_mask)
                frames.append({"step": step, "position": position, "token": int(token), "q": q.float().cpu(),
                               "k": k.float().cpu(), "v": v.float().cpu(), "key_pos": key_pos,
                               "weights": weights[0].float().cpu()})
                token = next_token(logits, temperature=0)
    finally:
        del attn.attend_and_project  # back to the class's method
    return frames


def animate_kv_dashboard(frames: list[dict], path: str | None = None, *, fps: int = 3, title: str = ""):
    """Draw the recorded steps as an animation: query, key cache, attention weights, value cache.

    Rows of the cache panels are cache slots labelled with the position they hold, so a
    growing cache fills downwards and a sliding window overwrites its oldest row. Saves a GIF
    when `path` is given (needs pillow, which matplotlib installs). Returns the animation.
    Built in chapter 4.
    """
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    if not frames:
        raise ValueError("frames is empty: record at least one step with kv_dashboard_frames")
    S = max(f["k"].size(0) for f in frames)
    kmax = max(float(f["k"].abs().max()) for f in frames) or 1.0
    vmax = max(float(f["v"].abs().max()) for f in frames) or 1.0
    fig, axes = plt.subplots(1, 4, figsize=(12, 1.8 + 0.22 * max(S, 8)), width_ratios=[1, 3, 1, 3],
                             layout="constrained")

    def pad(t):  # (s, D) -> (S, D) with NaN rows below
        out = torch.full((S, t.size(1)), float("nan"))
        out[: t.size(0)] = t
        return out.numpy()

    def draw(i):
        f = frames[i]
        for ax in axes:
            ax.clear()
        axes[0].imshow(f["q"][:, None].numpy(), cmap="coolwarm", vmin=-kmax, vmax=kmax, aspect="auto")
        axes[0].set_title("query q")
        axes[0].set_xticks([])
        axes[0].set_ylabel("head dim")
        axes[1].imshow(pad(f["k"]), cmap="coolwarm", vmin=-kmax, vmax=kmax, aspect="auto")
        axes[1].set_title("key cache K")
        labels = [str(int(p)) if p >= 0 else "empty" for p in f["key_pos"].tolist()]
        axes[1].set_yticks(range(len(labels)), labels, fontsize=6)
        axes[1].set_ylabel("slot (position held)")
        axes[1].set_xlabel("head dim")
        w = torch.full((S,), float("nan"))
        w[: f["weights"].numel()] = f["weights"]
        axes[2].barh(range(S), w.nan_to_num(0).numpy(), color="tab:green")
        axes[2].set_ylim(S - 0.5, -0.5)
        axes[2].set_xlim(0, 1)
        axes[2].set_title("softmax(q·K/√D)")
        axes[2].set_yticks([])
        axes[3].imshow(pad(f["v"]), cmap="PuOr", vmin=-vmax, vmax=vmax, aspect="auto")
        axes[3].set_title("value cache V")
        axes[3].set_yticks([])
        axes[3].set_xlabel("head dim")
        fig.suptitle(f"{title}  decode step {f['step']}: query at position {f['position']}".strip())
        return axes

    anim = FuncAnimation(fig, draw, frames=len(frames), interval=1000 // fps)
    if path is not None:
        anim.save(path, writer=PillowWriter(fps=fps))
        plt.close(fig)
    return anim
