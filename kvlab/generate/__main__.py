"""`python -m kvlab.generate`: generate text from the command line and report how fast it was.

    python -m kvlab.generate --prompt "ROMEO:" --model shakespeare --temperature 0.8 --seed 1
    python -m kvlab.generate --prompt "The KV cache" --model gpt2 --top-p 0.9   # downloads GPT-2

--model is "shakespeare" (the course's small model, shipped in data/shakespeare), a GPT-2 size
(gpt2, gpt2-medium, gpt2-large, gpt2-xl; from the Hugging Face hub), or the path of a folder
written by `python -m kvlab.train --export`. Built in chapter 7.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _fraction(low_open: bool):
    def parse(text: str) -> float:
        value = float(text)
        ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be in {'(0, 1]' if low_open else '[0, 1]'}, got {text}")
        return value
    return parse


def _temperature(text: str) -> float:
    value = float(text)
    if not value >= 0.0 or value == float("inf"):  # rejects NaN too
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvlab.generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--model", default="shakespeare",
                        help="shakespeare, gpt2, gpt2-medium, gpt2-large, gpt2-xl, or an exported model folder")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=_temperature, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=_non_negative_int, default=None, help="keep the k most likely (0 = off)")
    parser.add_argument("--top-p", type=_fraction(True), default=None, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--min-p", type=_fraction(False), default=None, help="min-p threshold (0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CPU sampling generator (default 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything each step (slow)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    return parser


def load(name: str, device: torch.device):
    """(model, tokenizer) for a --model value."""
    from ..pretrained import GPT2_NAMES, load_gpt2, load_shakespeare
    from ..tokenizers import GPT2Tokenizer

    if name in GPT2_NAMES:
        return load_gpt2(name, device=device), GPT2Tokenizer()
    if name == "shakespeare":
        return load_shakespeare(device=device)
    if Path(name).is_dir():
        return load_shakespeare(name, device=device)
    raise ValueError(f"--model must be shakespeare, one of {', '.join(GPT2_NAMES)}, or an exported model folder; "
                     f"got {name!r}")


def main(argv: list[str] | None = None) -> int:
    from ..device import describe_device, pick_device
    from . import generate

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
        model, tokenizer = load(args.model, device)
        ids = tokenizer.encode(args.prompt)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if not ids:
        parser.error("--prompt encodes to no tokens")
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        parser.error(f"--prompt is {len(ids)} tokens; the model's context is {model.config.max_seq_len}")
    n = min(args.max_new_tokens, room)
    stats: dict = {}
    out = generate(model, torch.tensor([ids], device=device), n, use_cache=not args.no_cache,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   generator=torch.Generator().manual_seed(args.seed), stats=stats)
    print(tokenizer.decode(out[0].tolist()))
    print()
    decode_rate = (stats["new_tokens"] - 1) / stats["decode_s"] if stats["decode_s"] > 0 else float("nan")
    print(f"[{describe_device(device)}, {'no cache' if args.no_cache else 'KV cache'}] "
          f"prefill {stats['prefill_s'] * 1e3:.1f} ms for {len(ids)} prompt tokens, "
          f"decode {decode_rate:.1f} tokens/s, total {stats['total_s']:.2f} s for {stats['new_tokens']} new tokens",
          file=sys.stderr)
    if n < args.max_new_tokens:
        print(f"(stopped at the model's context of {model.config.max_seq_len} tokens)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
