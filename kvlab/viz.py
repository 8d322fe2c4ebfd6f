"""Plots shared by the chapters: one figure style, attention heatmaps.

Built in chapter 2; later chapters add their plots here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["use_style", "attention_heatmap", "plot_bench"]

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
