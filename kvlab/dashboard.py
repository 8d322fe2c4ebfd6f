"""`python -m kvlab.dashboard`: the KV dashboard of chapter 4 as a GIF, for any model and prompt.

    python -m kvlab.dashboard --model shakespeare --prompt "ROMEO:" --layer 1 --head 0 --kind sliding --window 16
    python -m kvlab.dashboard --model runs/quick/checkpoint.safetensors --prompt "To be" --out kv.gif

Each frame is one decode step of greedy generation: one attention head's query, the key and
value cache (one row per slot, labelled with the position it holds), and the attention
weights over the cached keys. `--kind` picks the cache: static (preallocated, sized to the
prompt plus the steps), dynamic (grows by concatenation) or sliding (keeps the last
`--window` positions). `--model` takes what `python -m kvlab.generate` takes. Built in
chapter 4.
"""

from __future__ import annotations

import argparse
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    from ._cli import non_negative_int, positive_int

    parser = argparse.ArgumentParser(prog="python -m kvlab.dashboard", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--prompt", required=True, help="text the model continues (greedily)")
    parser.add_argument("--model", default="shakespeare",
                        help="shakespeare, shakespeare-bpe, gpt2 (..-xl), an exported model folder or a training "
                             "checkpoint (what python -m kvlab.generate takes)")
    parser.add_argument("--layer", type=non_negative_int, default=0, help="which block's attention (default 0)")
    parser.add_argument("--head", type=non_negative_int, default=0, help="which query head (default 0)")
    parser.add_argument("--kind", choices=["static", "dynamic", "sliding"], default="static",
                        help="the KV cache (default static)")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="positions a sliding cache keeps (default: the model's own window)")
    parser.add_argument("--steps", type=positive_int, default=24, help="decode steps, one frame each (default 24)")
    parser.add_argument("--fps", type=positive_int, default=3, help="frames per second (default 3)")
    parser.add_argument("--out", default="kv_dashboard.gif", help="the GIF to write (default kv_dashboard.gif)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, check them against the model, record the frames and write the GIF."""
    from .device import pick_device
    from .models import load_model
    from .viz import animate_kv_dashboard, kv_dashboard_frames

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out.lower().endswith(".gif"):
        parser.error(f"--out must name a .gif file, got {args.out!r}")
    try:
        device = pick_device(args.device or "cpu")
        model, tokenizer = load_model(args.model, device)
        ids = tokenizer.encode(args.prompt)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    c = model.config
    if not ids:
        parser.error("--prompt encodes to no tokens")
    if args.layer >= c.n_layers or args.head >= c.n_heads:
        parser.error(f"--layer must be in [0, {c.n_layers - 1}] and --head in [0, {c.n_heads - 1}] for this model, "
                     f"got --layer {args.layer} --head {args.head}")
    if args.window is not None and args.kind != "sliding":
        parser.error("--window is for --kind sliding")
    if args.kind == "sliding" and args.window is None and c.window is None:
        parser.error("--kind sliding needs --window (this model has no window of its own)")
    total = len(ids) + args.steps  # the prompt, then one position per decode step
    slides = c.pos == "rope" and (args.kind == "sliding" or c.window is not None)
    if total > c.max_seq_len and not slides:
        parser.error(f"--prompt ({len(ids)} tokens) + --steps ({args.steps}) needs {total} positions; the model's "
                     f"context is {c.max_seq_len} (only a RoPE model with a sliding window goes past it)")
    if args.kind == "static" and total > c.max_seq_len:
        parser.error(f"a static cache holds at most {c.max_seq_len} positions; use --kind sliding or fewer --steps")
    idx = torch.tensor([ids], device=device)
    cache_len = total if args.kind == "static" else None
    frames = kv_dashboard_frames(model, idx, args.steps, layer=args.layer, head=args.head, kind=args.kind,
                                 window=args.window, cache_len=cache_len)
    title = f"{args.model}, layer {args.layer}, head {args.head}, {args.kind} cache"
    animate_kv_dashboard(frames, args.out, fps=args.fps, title=title)
    text = tokenizer.decode(ids + [f["token"] for f in frames])
    print(f"wrote {args.out}: {len(frames)} frames of {title}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
