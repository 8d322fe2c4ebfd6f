"""Draw the book's pictures of ideas (one or more per chapter) as SVG files in book/figures/.

    python scripts/draw_figures.py            # (re)draw every figure
    python scripts/draw_figures.py --check    # draw into a temporary folder, compare bytes

These are drawings of ideas, not plots of data: boxes, arrows and a few illustrative bars.
Each chapter shows its figure with a MyST `{figure}` directive whose `:alt:` and caption come
from FIGURES below (scripts/insert_figure_cells.py writes those cells), so the text that
describes a picture lives next to the code that draws it.

The output is deterministic: matplotlib's own DejaVu fonts drawn as paths, a fixed
`svg.hashsalt` for the ids, no date in the metadata. Running the script again with the same
matplotlib version gives the same bytes, which tests/test_figures.py checks. The SVG's
`dc:creator` names the matplotlib version that drew it; with another version the test
skips the byte comparison (glyph paths and ids may change) but still checks the rest.
"""

from __future__ import annotations

import argparse
import filecmp
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle, Wedge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "book" / "figures"

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
BLUE, ORANGE, GREEN, RED = "#0072B2", "#E69F00", "#009E73", "#D55E00"
SKY, PURPLE, YELLOW, GREY = "#56B4E9", "#CC79A7", "#F0E442", "#9A9A9A"
INK, LIGHT = "#222222", "#F2F2F2"
HEADS = (BLUE, ORANGE, GREEN)  # head 0, 1, 2 in chapter 2's figure

RC = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "svg.fonttype": "path",  # glyphs as paths: the page looks the same without the font
    "svg.hashsalt": "kvlab-figures",  # fixed ids, so the bytes repeat
    "svg.image_inline": True,
    "path.simplify": True,
    "axes.unicode_minus": True,
}


@dataclass(frozen=True)
class Figure:
    """One drawn figure: its file, the chapter that shows it, and the words that go with it."""

    name: str  # file stem in book/figures/, and the figure's :name: is "fig-" + name
    notebook: str  # the chapter's notebook stem
    after: str  # the id of the cell the figure's markdown cell follows
    alt: str  # the :alt: text: what a reader who cannot see the image needs
    caption: str  # the caption (MyST markdown)
    note: str = ""  # optional sentence after the figure, referring to it


# --- drawing helpers ------------------------------------------------------------------


def canvas(width: float, height: float):
    """A figure `width` x `height` inches whose data coordinates are inches, axes hidden."""
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def box(ax, x, y, w, h, text="", *, fc=LIGHT, ec=INK, lw=1.0, fs=10, color=INK, round_=True,
        weight="normal", ls="-", alpha=1.0, family=None):
    """A box with its lower-left corner at (x, y) and `text` centred in it."""
    style = "round,pad=0,rounding_size=0.06" if round_ else "square,pad=0"
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=fc, ec=ec, lw=lw, ls=ls,
                                alpha=alpha))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs, color=color,
                weight=weight, family=family)


def cells(ax, x, y, n, w, h, *, fc=LIGHT, ec=INK, labels=None, fs=9, lw=0.8, colors=None,
          text_colors=None, family=None):
    """A row of n cells of width w from (x, y); optional per-cell labels and colours."""
    for i in range(n):
        ax.add_patch(Rectangle((x + i * w, y), w, h, fc=(colors[i] if colors else fc), ec=ec, lw=lw))
        if labels is not None and labels[i] != "":
            ax.text(x + (i + 0.5) * w, y + h / 2, str(labels[i]), ha="center", va="center",
                    fontsize=fs, color=(text_colors[i] if text_colors else INK), family=family)


def grid(ax, x, y, rows, cols, cw, ch, *, fc=LIGHT, ec=INK, lw=0.6, col_colors=None):
    """A rows x cols matrix of cells, top-left at (x, y + rows * ch)."""
    for r in range(rows):
        for c in range(cols):
            color = col_colors[c] if col_colors else fc
            ax.add_patch(Rectangle((x + c * cw, y + (rows - 1 - r) * ch), cw, ch, fc=color, ec=ec, lw=lw))


def arrow(ax, start, end, *, color=INK, lw=1.2, style="-|>", ms=10, ls="-", connection="arc3"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=ms, color=color,
                                 lw=lw, ls=ls, connectionstyle=connection, shrinkA=0, shrinkB=0))


def text(ax, x, y, s, *, fs=10, ha="center", va="center", color=INK, weight="normal",
         style="normal", family=None, rotation=0):
    ax.text(x, y, s, ha=ha, va=va, fontsize=fs, color=color, weight=weight, style=style,
            family=family, rotation=rotation)


def tint(color: str, amount: float) -> tuple[float, float, float]:
    """`color` mixed with white: amount 0 is white, 1 the colour itself."""
    r, g, b = matplotlib.colors.to_rgb(color)
    return (1 - amount * (1 - r), 1 - amount * (1 - g), 1 - amount * (1 - b))


def brace(ax, x0, x1, y, label, *, fs=9, color=INK, below=True):
    """A horizontal bracket from x0 to x1 at height y, labelled."""
    d = -0.08 if below else 0.08
    ax.plot([x0, x0, x1, x1], [y - d, y, y, y - d], color=color, lw=1.0)
    text(ax, (x0 + x1) / 2, y + (0.17 if not below else -0.17), label, fs=fs, color=color)


# --- chapter 1: text -> characters -> merges -> ids --------------------------------------


def draw_tokens():
    word = "the cat sat"
    # The chapter's hand-made BPE learns `at`, then `th`, then `the` first, on its sentence.
    # Byte-level BPE numbers single bytes 0-255 and each merge after them, in order.
    merges = [("a", "t", 256), ("t", "h", 257), ("th", "e", 258)]
    pieces = list(word)
    rows = [(pieces, None)]
    for a, b, new_id in merges:
        out, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == (a, b):
                out.append(a + b)
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
        rows.append((pieces, (a, b, new_id)))
    ids = {a + b: new_id for a, b, new_id in merges}

    def token_id(piece):
        return ids.get(piece, ord(piece) if len(piece) == 1 else None)

    fig, ax = canvas(10.0, 4.5)
    unit = 0.42  # width of one character
    x0, top = 1.9, 3.9
    text(ax, 0.15, top + 0.3, "text", fs=10, ha="left", weight="bold")
    text(ax, x0, top + 0.3, f"\u201c{word}\u201d", fs=12, ha="left", family="DejaVu Sans Mono")
    merged_colors = {256: SKY, 257: YELLOW, 258: GREEN}
    row_h, gap = 0.42, 0.36
    y = top - 0.45
    for r, (row, merge) in enumerate(rows):
        label = "characters\n(one byte each)" if merge is None else f"merge {r}: {merge[0]} + {merge[1]}"
        text(ax, 0.15, y + row_h / 2, label, fs=9.5, ha="left")
        x = x0
        for piece in row:
            w = unit * len(piece)
            new = merge is not None and piece == merge[0] + merge[1]
            tid = token_id(piece)
            fc = merged_colors.get(tid, "white") if len(piece) > 1 else "white"
            ax.add_patch(Rectangle((x, y), w, row_h, fc=fc, ec=INK, lw=1.4 if new else 0.8))
            text(ax, x + w / 2, y + row_h / 2, piece.replace(" ", "\u2423"), fs=11,
                 family="DejaVu Sans Mono")
            x += w
        right = x0 + unit * len(word) + 0.25
        if merge is None:
            text(ax, right, y + row_h / 2, f"{len(row)} symbols", fs=9, ha="left", color="#555555")
        else:
            text(ax, right, y + row_h / 2, f"\u201c{merge[0] + merge[1]}\u201d = id {merge[2]}:"
                 f" {len(row)} symbols", fs=9, ha="left", color="#555555")
        if r + 1 < len(rows):
            arrow(ax, (x0 - 0.2, y - 0.02), (x0 - 0.2, y - gap + row_h * 0.0 - 0.02), lw=0.9, ms=8)
        y -= row_h + gap
    # The final row's ids.
    y += row_h + gap
    text(ax, 0.15, y - 0.45, "token ids", fs=10, ha="left", weight="bold")
    x = x0
    for piece in rows[-1][0]:
        w = unit * len(piece)
        text(ax, x + w / 2, y - 0.45, str(token_id(piece)), fs=10, family="DejaVu Sans Mono",
             color=BLUE, weight="bold")
        arrow(ax, (x + w / 2, y - 0.03), (x + w / 2, y - 0.3), lw=0.7, ms=6, color=GREY)
        x += w
    text(ax, x0, y - 0.85,
         "a single byte keeps its value as id (\u2423 = 32, c = 99, s = 115); merged symbols get 256, 257, \u2026 in the order learned",
         fs=8.5, ha="left", color="#555555")
    return fig


# --- chapter 2: Q, K, V and the heads, split and merged ------------------------------------


def draw_heads():
    fig, ax = canvas(10.7, 4.9)
    T, C, H = 4, 6, 3  # drawn sizes: 4 tokens, 6 features, 3 heads of 2
    cw, ch = 0.17, 0.17
    band = [HEADS[c // (C // H)] for c in range(C)]
    light = [tint(c, 0.35) for c in band]

    # x: (T, C)
    gx, gy = 0.25, 1.95
    grid(ax, gx, gy, T, C, cw, ch, fc="white")
    text(ax, gx + C * cw / 2, gy + T * ch + 0.2, "x", fs=11, weight="bold")
    text(ax, gx + C * cw / 2, gy - 0.2, "(T, C)", fs=8.5)

    # Q, K, V: (T, C), columns coloured by the head that owns them.
    names = ("Q", "K", "V")
    qx = 1.85
    ys = (3.4, 1.95, 0.5)
    for name, y in zip(names, ys):
        arrow(ax, (gx + C * cw + 0.05, gy + T * ch / 2), (qx - 0.08, y + T * ch / 2), lw=0.9, ms=8)
        grid(ax, qx, y, T, C, cw, ch, col_colors=light)
        text(ax, qx - 0.25, y + T * ch / 2, name, fs=11, weight="bold")
        text(ax, qx + C * cw / 2, y - 0.17, "(T, C)", fs=8)
    text(ax, 1.42, 4.45, "project:\nx W_q + b_q, \u2026", fs=8.5)

    # split
    sx = 3.25
    arrow(ax, (qx + C * cw + 0.12, 2.3), (sx + 0.75, 2.3), lw=1.3)
    text(ax, (qx + C * cw + sx + 0.87) / 2, 2.75, "split heads", fs=9.5, weight="bold")
    text(ax, (qx + C * cw + sx + 0.87) / 2, 1.75,
         "view (T, H, D)\n+ transpose\n\u2192 (H, T, D)", fs=8.5)

    # per head: q_h, k_h, v_h -> attention -> y_h
    hx = 4.2
    head_y = (3.55, 2.2, 0.85)
    for h, y in enumerate(head_y):
        color = HEADS[h]
        for j, name in enumerate(("q", "k", "v")):
            x = hx + j * 0.52
            grid(ax, x, y, T, C // H, cw, ch, col_colors=[tint(color, 0.35)] * (C // H))
            text(ax, x + cw, y + T * ch + 0.13, f"{name}{chr(0x2080 + h)}", fs=9)
        box(ax, hx + 1.6, y + 0.02, 1.45, T * ch - 0.04,
            "softmax(q k\u1d40/\u221aD) v", fs=8, fc=tint(color, 0.15), ec=color)
        arrow(ax, (hx + 1.45, y + T * ch / 2), (hx + 1.6, y + T * ch / 2), lw=0.9, ms=7)
        arrow(ax, (hx + 3.05, y + T * ch / 2), (hx + 3.25, y + T * ch / 2), lw=0.9, ms=7)
        grid(ax, hx + 3.3, y, T, C // H, cw, ch, col_colors=[tint(color, 0.6)] * (C // H))
        text(ax, hx + 3.3 + cw, y + T * ch + 0.13, f"y{chr(0x2080 + h)}", fs=9)
        text(ax, hx - 0.25, y + T * ch / 2, f"head {h}", fs=8.5, ha="right", color=color, weight="bold")
    text(ax, hx + 2.1, 4.55, "each head attends on its own D features  (all heads in one batched call)",
         fs=8.5, color="#444444")
    text(ax, hx + 0.52 + cw * 1.0, 0.5, "(H, T, D) each", fs=8)

    # merge
    mx = 8.95
    arrow(ax, (hx + 3.75, 2.3), (mx + 0.05, 2.3), lw=1.3)
    text(ax, (hx + 3.75 + mx) / 2, 2.75, "merge", fs=9.5, weight="bold")
    text(ax, (hx + 3.75 + mx) / 2, 1.75, "transpose\n+ reshape\n\u2192 (T, C)", fs=8.5)
    grid(ax, mx + 0.1, 1.95, T, C, cw, ch, col_colors=[tint(c, 0.6) for c in band])
    text(ax, mx + 0.1 + C * cw / 2, 1.95 + T * ch + 0.2, "heads side by side", fs=8.5)
    arrow(ax, (mx + 0.1 + C * cw / 2, 1.9), (mx + 0.1 + C * cw / 2, 1.35), lw=1.0, ms=8)
    box(ax, mx - 0.05, 0.8, C * cw + 0.3, 0.45, "\u00b7 W_o + b_o", fs=9)
    text(ax, mx + 0.1 + C * cw / 2, 0.55, "output (T, C)", fs=8.5)
    text(ax, 0.25, 0.12,
         "B (the batch) is left out: it rides along in front of every shape.  C = H \u00b7 D; here T = 4, C = 6, H = 3, D = 2.",
         fs=8, ha="left", color="#555555")
    return fig


# --- chapter 3: the block and the residual stream -----------------------------------------


def draw_block():
    fig, ax = canvas(9.1, 7.4)
    sx = 2.1  # the residual stream's x
    stream_top, stream_bottom = 6.55, 1.05
    ax.add_patch(Rectangle((sx - 0.09, stream_bottom), 0.18, stream_top - stream_bottom,
                           fc=tint(BLUE, 0.3), ec="none"))
    text(ax, sx + 0.2, 2.3, "\u2190 the residual stream x  (B, T, C)", fs=9.5, ha="left", color=BLUE,
         weight="bold")

    # Bottom: embeddings (the chapter draws the data flowing downwards: ids at the top).
    box(ax, 0.5, 6.75, 3.2, 0.5, "token ids  (B, T)", fs=9.5, fc="white")
    box(ax, 0.3, 6.02, 3.6, 0.5, "tok_emb[idx] + pos_emb[0 \u2026 T\u22121]", fs=9, fc=tint(PURPLE, 0.3))
    arrow(ax, (sx, 6.75), (sx, 6.53), lw=1.0, ms=8)

    def sublayer(y, norm, name, note, color):
        """One residual update: x <- x + name(norm(x)), drawn as a branch to the right."""
        ax.add_patch(Circle((sx, y), 0.16, fc="white", ec=INK, lw=1.2))
        text(ax, sx, y, "+", fs=12, weight="bold")
        by = y + 0.52
        arrow(ax, (sx, by), (3.05, by), lw=1.0, ms=8)
        box(ax, 3.05, by - 0.22, 0.85, 0.44, norm, fs=9, fc="white")
        arrow(ax, (3.9, by), (4.2, by), lw=1.0, ms=8)
        box(ax, 4.2, by - 0.3, 1.4, 0.6, name, fs=10, fc=tint(color, 0.35), ec=color, weight="bold")
        arrow(ax, (5.6, by), (5.85, by), lw=1.0, ms=8, style="-")
        ax.plot([5.85, 5.85], [by, y], color=INK, lw=1.0)
        arrow(ax, (5.85, y), (sx + 0.17, y), lw=1.0, ms=8)
        text(ax, 6.05, by - 0.02, note, fs=8.5, ha="left", color="#444444")

    block_top, block_bottom = 5.8, 3.05
    ax.add_patch(FancyBboxPatch((1.45, block_bottom), 6.95, block_top - block_bottom,
                                boxstyle="round,pad=0,rounding_size=0.1", fc="none", ec=GREY,
                                lw=1.2, ls="--"))
    text(ax, 8.3, block_top - 0.2, "block 1", fs=9.5, ha="right", weight="bold", color="#555555")
    sublayer(4.65, "LN\u2081", "Attn", "causal self-attention:\nthe only place positions mix", BLUE)
    sublayer(3.35, "LN\u2082", "MLP", "C \u2192 4C \u2192 C, GELU,\neach position on its own", ORANGE)
    text(ax, 4.9, 2.8, "blocks 2 \u2026 L: the same, each with its own weights", fs=9, color="#555555")
    ax.plot([sx, sx], [2.55, 2.4], color=BLUE, lw=0)

    box(ax, 0.5, 1.55, 3.2, 0.45, "norm_f (final LayerNorm)", fs=9, fc="white")
    arrow(ax, (sx, 1.55), (sx, 1.22), lw=1.0, ms=8)
    box(ax, 0.3, 0.6, 3.6, 0.55, "lm_head: \u00b7 tok_emb\u1d40 (tied)\n\u2192 logits (B, T, V)", fs=9,
        fc=tint(PURPLE, 0.3))
    text(ax, 4.2, 1.1,
         "Every branch reads a normalised copy of x and adds its result back:\n"
         "x \u2190 x + Attn(LN\u2081(x)),   x \u2190 x + MLP(LN\u2082(x)).\n"
         "Nothing overwrites the stream, so the gradient flows straight down it.",
         fs=8.5, ha="left", color="#333333")
    return fig


# --- chapter 4: prefill and decode, and the ring buffer -------------------------------------


def draw_prefill_decode():
    fig, ax = canvas(10.0, 5.4)
    cw = 0.36
    T = 5  # prompt tokens
    slots = 8  # cache capacity drawn
    tokens = ["To", "be", ",", "or", "not", "to"]

    def cache_rows(x, y, filled, new, title):
        for r, (name, color) in enumerate((("K", ORANGE), ("V", GREEN))):
            yy = y - r * (cw + 0.08)
            colors = [tint(color, 0.75) if i in new else (tint(color, 0.3) if i < filled else "white")
                      for i in range(slots)]
            cells(ax, x, yy, slots, cw, cw, colors=colors,
                  labels=[str(i) if i < filled else "" for i in range(slots)], fs=8)
            text(ax, x - 0.18, yy + cw / 2, name, fs=10, weight="bold", color=color)
        text(ax, x + slots * cw / 2, y + cw + 0.2, title, fs=9)

    def mask(x, y, rows, cols, first_q, title):
        for r in range(rows):
            q = first_q + r
            for c in range(cols):
                seen = c <= q
                ax.add_patch(Rectangle((x + c * 0.2, y - r * 0.2), 0.2, 0.2,
                                       fc=tint(BLUE, 0.7) if seen else "white", ec=GREY, lw=0.5))
        text(ax, x + cols * 0.1, y + 0.4, title, fs=8.5)

    # Prefill panel.
    px = 0.3
    text(ax, px, 5.1, "Prefill: the whole prompt in one pass", fs=11, ha="left", weight="bold")
    cells(ax, px + 0.55, 4.35, T, 0.55, 0.36, labels=tokens[:T], fc=tint(SKY, 0.4), fs=9)
    text(ax, px + 0.55 + T * 0.55 / 2, 4.2, "input_pos = [0, 1, 2, 3, 4]", fs=8.5, va="top",
         family="DejaVu Sans Mono")
    arrow(ax, (px + 0.55 + T * 0.55 / 2, 3.85), (px + 0.55 + T * 0.55 / 2, 3.5), lw=1.0, ms=8)
    box(ax, px + 0.4, 2.95, T * 0.55 + 0.3, 0.55, "model: T = 5 queries,\n5 keys, causal mask", fs=8.5)
    mask(px + 3.6, 3.95, T, T, 0, "weights (5 \u00d7 5)")
    arrow(ax, (px + 0.55 + T * 0.55 / 2, 2.95), (px + 0.55 + T * 0.55 / 2, 2.6), lw=1.0, ms=8)
    cache_rows(px + 0.55, 1.95, T, set(range(T)), "each layer's cache: positions 0\u20134 written")
    text(ax, px + 0.2, 0.75, "output: the logits of the last position only \u2192 the first new token",
         fs=8.5, ha="left")

    ax.plot([5.05, 5.05], [0.4, 5.2], color=GREY, lw=0.8, ls=":")

    # Decode panel.
    dx = 5.35
    text(ax, dx, 5.1, "Decode step: one new token", fs=11, ha="left", weight="bold")
    cells(ax, dx + 0.55 + 2 * 0.55, 4.35, 1, 0.55, 0.36, labels=[tokens[T]], fc=tint(RED, 0.35), fs=9)
    text(ax, dx + 0.55 + 2.5 * 0.55, 4.2, "input_pos = [5]", fs=8.5, va="top", family="DejaVu Sans Mono")
    arrow(ax, (dx + 0.55 + 2.5 * 0.55, 3.85), (dx + 0.55 + 2.5 * 0.55, 3.5), lw=1.0, ms=8)
    box(ax, dx + 0.4, 2.95, T * 0.55 + 0.3, 0.55, "model: 1 query (position 5),\nits own k, v only", fs=8.5)
    mask(dx + 3.3, 3.95, 1, T + 1, T, "weights (1 \u00d7 6)")
    arrow(ax, (dx + 0.55 + 2.5 * 0.55, 2.95), (dx + 0.55 + 2.5 * 0.55, 2.6), lw=1.0, ms=8)
    cache_rows(dx + 0.55, 1.95, T + 1, {T}, "k\u2085, v\u2085 written at slot 5; q\u2085 reads slots 0\u20135")
    text(ax, dx + 0.2, 0.75, "output: the logits for position 6; repeat with input_pos = [6], [7], \u2026",
         fs=8.5, ha="left")
    text(ax, 0.3, 0.25,
         "Darker cells are written by this call; lighter ones were already in the cache. "
         "Keys and values of a position never change once written.",
         fs=8.5, ha="left", color="#555555")
    return fig


def draw_ring():
    fig, ax = canvas(10.0, 4.1)
    W = 4

    def ring(cx, cy, held, title, new_slot=None, evicted=None):
        r_out, r_in = 0.95, 0.45
        for s in range(W):
            # Slot 0 at the top, going clockwise.
            theta2 = 90 - s * 360 / W
            theta1 = theta2 - 360 / W
            p = held[s]
            fc = "white" if p < 0 else (tint(RED, 0.45) if s == new_slot else tint(ORANGE, 0.35))
            ax.add_patch(Wedge((cx, cy), r_out, theta1, theta2, width=r_out - r_in, fc=fc, ec=INK, lw=1.0))
            mid = math.radians((theta1 + theta2) / 2)
            rm = (r_out + r_in) / 2
            text(ax, cx + rm * math.cos(mid), cy + rm * math.sin(mid), "\u2013" if p < 0 else f"p{p}",
                 fs=10, weight="bold" if s == new_slot else "normal")
            rl = r_out + 0.18
            text(ax, cx + rl * math.cos(mid), cy + rl * math.sin(mid), f"slot {s}", fs=7.5, color="#555555")
        text(ax, cx, cy, f"W = {W}", fs=8.5, color="#555555")
        text(ax, cx, cy + 1.45, title, fs=9.5)
        if evicted is not None:
            text(ax, cx, cy - 1.35, evicted, fs=8.5, color=RED)

    ring(1.4, 2.25, [0, 1, 2, 3], "after positions 0\u20133")
    arrow(ax, (2.65, 2.25), (3.35, 2.25), lw=1.2)
    text(ax, 3.0, 2.55, "write 4, 5", fs=8.5)
    ring(4.6, 2.25, [4, 5, 2, 3], "after positions 4, 5", evicted="4 and 5 replaced 0 and 1")
    arrow(ax, (5.85, 2.25), (6.55, 2.25), lw=1.2)
    text(ax, 6.2, 2.55, "decode 6", fs=8.5)
    ring(7.8, 2.25, [4, 5, 6, 3], "decode step at position 6", new_slot=6 % W,
         evicted="slot 6 mod 4 = 2: position 2 evicted")
    # The window on the position line.
    y = 0.3
    text(ax, 0.25, y + 0.14, "positions", fs=8.5, ha="left")
    for p in range(7):
        inside = 6 - W < p <= 6
        ax.add_patch(Rectangle((1.3 + p * 0.42, y), 0.42, 0.28,
                               fc=tint(ORANGE, 0.35) if inside else "white", ec=INK, lw=0.6))
        text(ax, 1.3 + p * 0.42 + 0.21, y + 0.14, str(p), fs=8.5)
    text(ax, 1.3 + 7 * 0.42 + 0.2, y + 0.14,
         "query 6 sees keys 3, 4, 5, 6: the last W positions (q \u2212 W < k \u2264 q).\n"
         "The slots are out of order, so the cache records each slot's position.",
         fs=8.5, ha="left")
    return fig


# --- chapter 5: where generation's time goes --------------------------------------------------


def draw_timeline():
    fig, ax = canvas(10.0, 5.3)
    # Top: one generation on a time axis.
    y = 4.0
    text(ax, 0.25, 4.95, "One generation: a prefill, then one decode step per new token", fs=11,
         ha="left", weight="bold")
    x0 = 0.8
    arrow(ax, (x0 - 0.3, y - 0.1), (9.7, y - 0.1), lw=0.9, ms=8)
    text(ax, 9.7, y - 0.3, "time", fs=8.5, ha="right")
    text(ax, x0 - 0.35, y + 0.55, "prompt\narrives", fs=8, ha="center", color="#555555")
    ax.plot([x0, x0], [y - 0.1, y + 0.35], color=INK, lw=1.0)
    box(ax, x0, y, 2.3, 0.34, "prefill (T prompt tokens)", fs=8.5, fc=tint(BLUE, 0.45), round_=False)
    step_w = 0.62
    x = x0 + 2.3
    for n in range(8):
        box(ax, x + 0.02, y, step_w - 0.04, 0.34, f"d{n + 1}", fs=8, fc=tint(ORANGE, 0.45), round_=False)
        x += step_w
    text(ax, x + 0.25, y + 0.17, "\u2026", fs=12)
    for n in range(9):
        xt = x0 + 2.3 + n * step_w
        text(ax, xt, y + 0.5, "\u25bc", fs=7, color=RED)
    text(ax, x0 + 2.3 + 4.0 * step_w, y + 0.72, "a token appears at the end of the prefill and of every step",
         fs=8, color=RED)
    brace(ax, x0, x0 + 2.3, y - 0.3, "TTFT: time to first token", fs=8.5)
    brace(ax, x0 + 2.3 + 3 * step_w, x0 + 2.3 + 4 * step_w, y - 0.3, "TPOT: one decode step", fs=8.5)
    text(ax, x0 + 2.3 + 4 * step_w + 0.3, y - 0.68,
         "throughput = B \u00d7 N new tokens \u00f7 total time", fs=8.5, ha="left")

    # Bottom: inside one decode step.
    text(ax, 0.25, 2.55, "Inside one decode step: every weight is streamed from memory once", fs=11,
         ha="left", weight="bold")
    box(ax, 0.3, 0.55, 2.4, 1.55, "", fc=tint(GREY, 0.25))
    text(ax, 1.5, 1.88, "memory", fs=9.5, weight="bold")
    for i in range(6):
        ax.add_patch(Rectangle((0.5 + i * 0.34, 0.75), 0.28, 0.9, fc=tint(PURPLE, 0.55), ec=INK, lw=0.5))
    text(ax, 1.5, 0.65, "weights of every layer", fs=7.5, va="top")
    box(ax, 5.0, 0.75, 1.7, 1.15, "", fc=tint(GREEN, 0.25))
    text(ax, 5.85, 1.65, "processor", fs=9.5, weight="bold")
    text(ax, 5.85, 1.2, "2 FLOPs per weight\nper sequence", fs=8)
    arrow(ax, (2.75, 1.32), (4.95, 1.32), lw=5.0, ms=18, color=PURPLE)
    text(ax, 3.85, 1.62, "all the weights, every step", fs=8.5)
    text(ax, 3.85, 1.02, "limited by bandwidth (GB/s)", fs=8, color="#555555")
    text(ax, 7.0, 1.6,
         "time \u2248 bytes read \u00f7 bandwidth\n(memory-bound): the arithmetic\nwaits for the data.",
         fs=8.5, ha="left")
    text(ax, 7.0, 0.75,
         "A batch of B sequences shares each\nread, so one step for B costs far\nless than B steps for one.",
         fs=8.5, ha="left")
    return fig


# --- chapter 6: the training loop ------------------------------------------------------------


def draw_training_loop():
    fig, ax = canvas(9.6, 5.2)
    # Five steps of the loop, placed around a rectangle.
    steps = [
        (0.4, 3.75, "1. batch", "get_batch \u2192 x, y  (B, T)\ny = x shifted by one"),
        (3.55, 3.75, "2. forward", "logits = model(x)\n(B, T, V)"),
        (6.7, 3.75, "3. loss", "cross-entropy(logits, y)\nin nats per token"),
        (6.7, 1.2, "4. backward", "loss.backward()\n\u2192 p.grad for every p"),
        (3.55, 1.2, "5. update", "clip the global grad norm;\nAdamW step at lr(step)"),
    ]
    w, h = 2.6, 1.1
    colors = [SKY, BLUE, RED, ORANGE, GREEN]
    for (x, y, title, body), color in zip(steps, colors):
        box(ax, x, y, w, h, "", fc=tint(color, 0.25), ec=color, lw=1.4)
        text(ax, x + w / 2, y + h - 0.25, title, fs=10.5, weight="bold")
        text(ax, x + w / 2, y + 0.38, body, fs=8.5)
    arrow(ax, (0.4 + w, 4.3), (3.55, 4.3), lw=1.4)
    arrow(ax, (3.55 + w, 4.3), (6.7, 4.3), lw=1.4)
    arrow(ax, (6.7 + w / 2, 3.75), (6.7 + w / 2, 2.3), lw=1.4)
    arrow(ax, (6.7, 1.75), (3.55 + w, 1.75), lw=1.4)
    arrow(ax, (3.55, 1.75), (0.4 + w / 2, 1.75), lw=1.4, style="-")
    arrow(ax, (0.4 + w / 2, 1.75), (0.4 + w / 2, 3.75), lw=1.4)
    text(ax, 0.4 + w / 2 - 0.1, 2.75, "zero_grad,\nnext step", fs=8.5, ha="right")

    # The schedule the update reads, as a small inset: warmup, then cosine to min_lr.
    ix, iy, iw, ih = 0.35, 0.25, 2.6, 1.15
    warm, total, lr_min = 0.12, 1.0, 0.12
    xs = [i / 200 for i in range(201)]

    def lr(t):
        if t < warm:
            return t / warm
        progress = (t - warm) / (total - warm)
        return lr_min + 0.5 * (1 - lr_min) * (1 + math.cos(math.pi * progress))

    ax.plot([ix + t * iw for t in xs], [iy + 0.12 + lr(t) * (ih - 0.35) for t in xs], color=GREEN, lw=1.6)
    ax.plot([ix, ix + iw], [iy + 0.12, iy + 0.12], color=INK, lw=0.6)
    ax.plot([ix, ix], [iy + 0.12, iy + ih - 0.15], color=INK, lw=0.6)
    text(ax, ix + 0.05, iy + ih - 0.05, "lr(step): warmup, then cosine to min_lr", fs=8, ha="left")
    arrow(ax, (ix + iw + 0.05, iy + 0.6), (3.5, 1.45), lw=0.8, ms=7, color=GREEN, connection="arc3,rad=0.2")

    # Around the loop.
    text(ax, 3.55, 0.55,
         "every eval_interval steps: the validation loss (no gradients);\n"
         "every checkpoint_interval: an atomic checkpoint, to resume exactly",
         fs=8.5, ha="left", va="top", color="#444444")
    return fig


# --- chapter 7: the filters cutting a distribution ---------------------------------------------


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def draw_filters():
    n = 20
    confident = _softmax([3.2 - 0.55 * i - 0.02 * i * i for i in range(n)])
    flat = _softmax([1.0 - 0.16 * i for i in range(n)])
    k, p, min_p = 5, 0.9, 0.1

    def keep_top_k(probs):
        return [i < k for i in range(len(probs))]  # already sorted, most likely first

    def keep_top_p(probs):
        kept, total = [], 0.0
        for q in probs:
            kept.append(total < p)  # keep until the mass reaches p, the crossing token included
            total += q
        return kept

    def keep_min_p(probs):
        return [q >= min_p * max(probs) for q in probs]

    rules = [(f"top-k, k = {k}", keep_top_k), (f"top-p, p = {p}", keep_top_p),
             (f"min-p, min_p = {min_p}", keep_min_p)]
    fig, axes = plt.subplots(2, 3, figsize=(10.0, 5.2), sharex=True)
    for row, (label, probs) in enumerate((("a confident step", confident), ("an unsure step", flat))):
        for col, (name, rule) in enumerate(rules):
            ax = axes[row][col]
            kept = rule(probs)
            colors = [BLUE if kk else "#C8C8C8" for kk in kept]
            ax.bar(range(n), probs, color=colors, width=0.8)
            mass = sum(q for q, kk in zip(probs, kept) if kk)
            ax.set_title(f"{name}\nkeeps {sum(kept)} tokens, {mass:.0%} of the mass", fontsize=9)
            if name.startswith("min-p"):
                ax.axhline(min_p * max(probs), color=RED, lw=1.0, ls="--")
                ax.text(n - 0.5, max(probs) * 0.55, "dashed: min_p \u00d7 top probability", color=RED,
                        fontsize=7.5, ha="right", va="bottom")
            if name.startswith("top-k"):
                ax.axvline(k - 0.5, color=RED, lw=1.0, ls="--")
            if name.startswith("top-p"):
                ax.axvline(sum(kept) - 0.5, color=RED, lw=1.0, ls="--")
            ax.set_ylim(0, max(probs) * 1.15)
            ax.spines[["top", "right"]].set_visible(False)
            ax.tick_params(labelsize=7.5)
            if col == 0:
                ax.set_ylabel(f"{label}\nprobability", fontsize=8.5)
            if row == 1:
                ax.set_xlabel("tokens, most likely first", fontsize=8.5)
            ax.set_xticks([0, 5, 10, 15])
    fig.text(0.5, 0.005, "blue: kept, then renormalised to sum to 1;  grey: set to probability 0",
             ha="center", va="bottom", fontsize=8.5, color="#444444")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


# --- chapter 8: encoder-decoder and the cross cache ---------------------------------------------


def draw_seq2seq():
    fig, ax = canvas(10.0, 5.6)
    cw = 0.36
    src = ["3", "1", "4", "EOS"]
    # Encoder, once.
    text(ax, 0.3, 5.25, "Encoder: runs once per source", fs=10.5, ha="left", weight="bold")
    cells(ax, 0.45, 4.55, len(src), 0.5, 0.36, labels=src, fc=tint(SKY, 0.4), fs=9)
    arrow(ax, (0.45 + len(src) * 0.25, 4.5), (0.45 + len(src) * 0.25, 4.15), lw=1.0, ms=8)
    box(ax, 0.3, 3.55, 2.3, 0.6, "encoder blocks\n(no causal mask)", fs=9, fc=tint(PURPLE, 0.3))
    arrow(ax, (0.45 + len(src) * 0.25, 3.55), (0.45 + len(src) * 0.25, 3.2), lw=1.0, ms=8)
    box(ax, 0.3, 2.65, 2.3, 0.55, "memory M  (B, S, C)", fs=9, fc="white")
    arrow(ax, (0.45 + len(src) * 0.25, 2.65), (0.45 + len(src) * 0.25, 2.3), lw=1.0, ms=8)
    box(ax, 0.3, 1.7, 2.3, 0.6, "project_memory(M)\nin every decoder layer", fs=8.5, fc="white")

    # The cross cache, computed once.
    ccx, ccy = 0.5, 0.55
    for r, (name, color) in enumerate((("K\u02e3", ORANGE), ("V\u02e3", GREEN))):
        cells(ax, ccx + 0.25, ccy + 0.45 - r * (cw + 0.06), len(src), cw, cw,
              colors=[tint(color, 0.5)] * len(src), labels=src, fs=7.5)
        text(ax, ccx, ccy + 0.45 - r * (cw + 0.06) + cw / 2, name, fs=9.5, weight="bold", color=color)
    arrow(ax, (1.45, 1.7), (1.45, 1.35), lw=1.0, ms=8)
    text(ax, ccx + 0.25 + len(src) * cw / 2, 0.2, "cross cache: filled once, never changes", fs=8.5,
         color=RED)

    ax.plot([3.6, 3.6], [0.3, 5.4], color=GREY, lw=0.8, ls=":")

    # Decoder steps.
    text(ax, 3.85, 5.25, "Decoder: one step per output token", fs=10.5, ha="left", weight="bold")
    outs = ["EOS", "4", "1", "3"][::-1]  # the reversed source, then EOS
    ins = ["BOS"] + outs[:-1]
    bus_y = 1.75
    cache_right = ccx + 0.25 + len(src) * cw
    ax.plot([cache_right + 0.05, 3.3, 3.3, 3.9 + 2 * 2.05 + 0.35], [ccy + 0.4, ccy + 0.4, bus_y, bus_y],
            color=RED, lw=1.0, ls="--")
    for n in range(3):
        x = 3.9 + n * 2.05
        text(ax, x + 0.85, 4.9, f"step {n + 1}", fs=9, weight="bold")
        cells(ax, x + 0.6, 4.35, 1, 0.5, 0.36, labels=[ins[n]], fc=tint(RED, 0.3), fs=8.5)
        text(ax, x + 0.85, 4.22, f"input_pos = [{n}]", fs=7.5, va="top", family="DejaVu Sans Mono")
        arrow(ax, (x + 0.85, 3.95), (x + 0.85, 3.75), lw=0.9, ms=7)
        # self-attention cache: grows by one per step
        for r, color in enumerate((ORANGE, GREEN)):
            cells(ax, x + 0.2, 3.35 - r * 0.3, 4, 0.28, 0.26,
                  colors=[(tint(color, 0.7) if i == n else tint(color, 0.3)) if i <= n else "white"
                          for i in range(4)], labels=[str(i) if i <= n else "" for i in range(4)], fs=7)
        text(ax, x + 0.2 + 0.56, 2.78, "self cache: +1 slot", fs=7.5)
        box(ax, x + 0.1, 1.95, 1.55, 0.6, "self-attn \u2192 cross-attn\n\u2192 MLP (each layer)", fs=7.5,
            fc="white")
        arrow(ax, (x + 0.85, 1.95), (x + 0.85, 1.6), lw=0.9, ms=7)
        cells(ax, x + 0.6, 1.2, 1, 0.5, 0.36, labels=[outs[n]], fc=tint(BLUE, 0.35), fs=8.5)
        text(ax, x + 0.85, 1.05, "next token", fs=7.5, va="top")
        # every step reads the same cross cache, from the line below its box
        arrow(ax, (x + 0.35, bus_y), (x + 0.35, 1.95), lw=0.9, ms=7, color=RED)
        if n < 2:
            text(ax, x + 1.75, 1.38, "\u2192 next\n  input", fs=7, ha="left", color="#555555")
    text(ax, 3.9, 0.35,
         "Every step reads the same cross keys and values; only the self-attention cache grows.",
         fs=8.5, ha="left", color="#444444")
    return fig


# --- the figures, in chapter order ------------------------------------------------------------

FIGURES: list[tuple[Figure, object]] = [
    (Figure(
        name="ch01_text_to_ids", notebook="01_tokens", after="tokens-023",
        alt=("The text 'the cat sat' as eleven one-character boxes, then three rows of merges: "
             "a plus t becomes 'at' (id 256), t plus h becomes 'th' (id 257), th plus e becomes "
             "'the' (id 258), leaving seven symbols. The last row shows their ids: 258, 32, 99, "
             "256, 32, 115, 256."),
        caption=("From text to token ids with byte-pair encoding. Each merge replaces every "
                 "occurrence of a pair by one new symbol; single characters keep their byte value "
                 "as id, and merged symbols are numbered from 256 in the order they were learned. "
                 "(Spaces are drawn as ␣.)"),
        note=("The {term}`merges <merge>` in {numref}`fig-ch01_text_to_ids` are the first three the "
              "table above learned, replayed on a shorter text.")), draw_tokens),
    (Figure(
        name="ch02_heads_split_merge", notebook="02_attention", after="attention-031",
        alt=("Diagram: the input x, a T by C matrix, is projected into Q, K and V, each T by C "
             "with its columns coloured in three bands, one per head. Splitting the heads turns "
             "each into three T by D slices; each head computes softmax of q k-transpose over "
             "root D times v on its own slice. Merging puts the three outputs side by side again "
             "as a T by C matrix, which the output projection W_O mixes."),
        caption=("Multi-head attention as shapes. Head $h$ owns features $hD \\ldots (h+1)D-1$ "
                 "of every token's query, key and value. *Split* is a view to $(T, H, D)$ and a "
                 "transpose to $(H, T, D)$, so that one batched attention call runs every head; "
                 "*merge* undoes it, and $W_O$ mixes what the heads found."),
        note=("{numref}`fig-ch02_heads_split_merge` is the code below, drawn: `split_heads` and "
              "`merge_heads` are the two reshapes around the {term}`attention heads <attention head>`.")), draw_heads),
    (Figure(
        name="ch03_block_residual", notebook="03_gpt_decoder", after="d29ec944",
        alt=("Diagram of a GPT-2 decoder as a vertical residual stream. Token and position "
             "embeddings enter at the top. In block 1 the stream passes two plus nodes: the first "
             "adds Attn of LN1 of x, the second adds MLP of LN2 of x, each drawn as a branch to "
             "the side. Blocks 2 to L repeat it. At the bottom come the final LayerNorm and the "
             "tied output layer, giving logits of shape B, T, V."),
        caption=("The pre-norm block and the residual stream. Each sublayer reads a normalised "
                 "copy of the stream and *adds* its result back; only attention mixes "
                 "positions. The same embedding table turns the final vectors into logits."),
        note=("{numref}`fig-ch03_block_residual` is the function `block` above, drawn inside the "
              "whole model, with the {term}`residual stream` running through it.")), draw_block),
    (Figure(
        name="ch04_prefill_decode", notebook="04_kv_cache", after="b08508c3",
        alt=("Two panels. Left, prefill: five prompt tokens at input_pos 0 to 4 go through the "
             "model in one pass with a 5 by 5 causal weight pattern, and the keys and values of "
             "positions 0 to 4 are written into the cache. Right, decode step: one token at "
             "input_pos 5 produces one query, key and value; its key and value are written at "
             "slot 5 and its query attends over cache slots 0 to 5, a 1 by 6 row of weights."),
        caption=("The two phases of cached generation. The prefill writes the keys and values of "
                 "the whole prompt; each decode step computes them for one new position, writes "
                 "them, and attends with one query over everything cached."),
        note=("{numref}`fig-ch04_prefill_decode` shows one layer's cache; every layer has its "
              "own.")), draw_prefill_decode),
    (Figure(
        name="ch04_ring_buffer", notebook="04_kv_cache", after="3c344433",
        alt=("Three rings of four slots. After positions 0 to 3 the slots hold p0, p1, p2, p3. "
             "After positions 4 and 5 they hold p4, p5, p2, p3. At the decode step for position 6, "
             "slot 6 mod 4 equals 2 receives p6, evicting p2, so the slots hold p4, p5, p6, p3. "
             "A line of positions 0 to 6 highlights 3, 4, 5 and 6: the keys query 6 may see."),
        caption=("A sliding-window cache is a ring buffer of $W$ slots: position $p$ lives in "
                 "slot $p \\bmod W$, so writing it evicts position $p - W$, the one that just left "
                 "the window. The slots are no longer in position order, which is why the cache "
                 "keeps each slot's position and builds the mask from positions."),
        note=("{numref}`fig-ch04_ring_buffer` is the decode-step case above; a multi-token step "
              "into the {term}`ring buffer` is different, as the next paragraph shows.")), draw_ring),
    (Figure(
        name="ch05_time", notebook="05_measuring", after="f1dc42d5",
        alt=("Top: a time axis with one long prefill bar, labelled TTFT, followed by equal decode "
             "steps d1 to d8, one of them labelled TPOT; a token appears at the end of the prefill "
             "and of every step; throughput is B times N new tokens over the total time. Bottom: "
             "inside a decode step, a thick arrow carries all the weights from memory to the "
             "processor, which does two floating-point operations per weight per sequence; time "
             "is about bytes read divided by bandwidth."),
        caption=("Where generation's time goes. TTFT is mostly the prefill, TPOT is one decode "
                 "step, and a decode step streams every weight from memory to do very little "
                 "arithmetic with it, so its time is set by memory bandwidth."),
        note=("{numref}`fig-ch05_time` puts what this section found, a {term}`memory-bound` decode "
              "step, next to the numbers defined at the start of the chapter, {term}`TTFT` and "
              "{term}`TPOT`.")), draw_timeline),
    (Figure(
        name="ch06_training_loop", notebook="06_training", after="training-008",
        alt=("A loop of five boxes: 1 batch (get_batch gives x and y, y is x shifted by one), "
             "2 forward (logits = model of x), 3 loss (cross-entropy in nats), 4 backward "
             "(gradients for every parameter), 5 update (clip the global gradient norm, AdamW "
             "step at the scheduled learning rate), then zero_grad and back to 1. A small curve "
             "shows the learning rate rising linearly during warmup, then following a cosine "
             "down to min_lr. A note says the validation loss is measured every eval_interval "
             "steps and a checkpoint written every checkpoint_interval steps."),
        caption=("The training loop and what `kvlab.train` adds to it: the learning-rate schedule "
                 "(warmup, then cosine decay), clipping of the global gradient norm before the "
                 "AdamW step, and periodic evaluation and checkpoints."),
        note=("{numref}`fig-ch06_training_loop` is the loop above, with the pieces the rest of this "
              "chapter adds to it in place: {term}`AdamW`, the {term}`warmup` and "
              "{term}`cosine decay` of the learning rate, {term}`gradient clipping` and "
              "{term}`checkpoints <checkpoint>`.")), draw_training_loop),
    (Figure(
        name="ch07_filters", notebook="07_sampling", after="51a4d92c",
        alt=("Six bar charts of a sorted next-token distribution over 20 tokens, kept tokens in "
             "blue and removed ones in grey. Top row, a confident distribution: top-k with k 5 "
             "keeps 5 tokens, top-p with p 0.9 keeps only a few, min-p with 0.1 keeps those above "
             "a dashed line at a tenth of the top probability. Bottom row, a flat distribution: "
             "top-k still keeps 5, while top-p and min-p keep many more tokens."),
        caption=("The three filters on two illustrative distributions. Top-k keeps the same "
                 "number of tokens whatever the model's confidence; top-p and min-p keep few "
                 "tokens when the model is sure and many when it is not."),
        note=("{numref}`fig-ch07_filters` puts the three rules side by side, on a confident "
              "step and an unsure one, as the cell above did for min-p.")), draw_filters),
    (Figure(
        name="ch08_cross_cache", notebook="08_seq2seq", after="37edf79b",
        alt=("Left: the source 3, 1, 4, EOS goes through the encoder blocks, without a causal "
             "mask, once, giving the memory M; each decoder layer projects M once into cross keys "
             "and values, the cross cache, which never changes. Right: three decoder steps, fed "
             "BOS, 3 and 1 at input_pos 0, 1 and 2; at each step the self-attention cache grows "
             "by one slot, and dashed arrows show every step reading the same cross cache; the "
             "steps output 3, 1 and 4."),
        caption=("Encoder–decoder generation with two caches. The encoder and the cross-attention "
                 "keys and values are computed once per source; each decoder step adds one "
                 "position to its self-attention cache and reads the cross cache unchanged."),
        note=("{numref}`fig-ch08_cross_cache` is the loop the four steps below build, drawn for one "
              "source of the reversal task, with its {term}`cross-attention cache`.")), draw_seq2seq),
]


def figure_by_name(name: str) -> Figure:
    for fig, _ in FIGURES:
        if fig.name == name:
            return fig
    raise KeyError(f"no figure named {name!r}; known: {[f.name for f, _ in FIGURES]}")


def check_fonts() -> None:
    """Refuse to draw with a system font: matplotlib's bundled DejaVu keeps the bytes stable."""
    for family in ("DejaVu Sans", "DejaVu Sans Mono"):
        path = Path(font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False))
        if "mpl-data" not in path.parts:
            raise RuntimeError(f"{family} resolves to {path}, not matplotlib's bundled font")


def save(fig, path: Path) -> None:
    metadata = {"Date": None, "Creator": f"matplotlib {matplotlib.__version__}; scripts/draw_figures.py"}
    fig.savefig(path, format="svg", metadata=metadata, facecolor="white")
    plt.close(fig)


def draw_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context(RC):
        check_fonts()
        for fig_info, draw in FIGURES:
            path = out / f"{fig_info.name}.svg"
            save(draw(), path)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder for the SVG files (default {OUT})")
    parser.add_argument("--check", action="store_true",
                        help="draw into a temporary folder and fail if any file differs from --out")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = draw_all(Path(tmp))
            differ = [p.name for p in fresh
                      if not (args.out / p.name).exists() or not filecmp.cmp(p, args.out / p.name, shallow=False)]
        if differ:
            print("differ from a fresh drawing:", ", ".join(differ), file=sys.stderr)
            return 1
        print(f"{len(fresh)} figures match a fresh drawing")
        return 0
    for path in draw_all(args.out):
        print("wrote", path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
