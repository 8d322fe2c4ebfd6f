"""`python -m kvlab.bench`: the command line of `kvlab.bench` (the sweep, the speed-up table, chapter 9's
serving measurements, chapter 10's measurements, chapter 11's frontier).

`--model` takes what `python -m kvlab.generate` takes (the shipped models, exported folders,
training checkpoints; GPT-2 names give GPT-2's shape with random weights, no download, since
speed does not depend on the weights' values) and the shape presets of `GPTConfig` and of
`kvlab.train`, which the shape flags of `python -m kvlab.train` (--d-model, --n-layers, ...)
override. Every flag is checked against the model's configuration before a model is built or a
clock started: a usage error (exit status 2) names the flag and what to do. Records store the
command with `shlex.join`, so it can be pasted back into a shell. Built in chapter 5.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .._cli import (Parser, add_shape_arguments, apply_shape_flags, command_line, pick_device_or_exit, positive_int,
                    positive_ints, shape_flags_given)
from ..cpu_kernels import fast_cpu_inference
from ..gpt import GPT, GPTConfig
from .chapter10 import beyond
from .serving import plot_serving, serving_bench
from .serving_hf import serving_vs_hf
from .cache_speedup import DEFAULT_LENGTHS, speedup_markdown, speedup_table
from .timing import decode_weight_bytes, read_bandwidth, sweep

__all__ = ["build_parser", "main"]

EPILOG = """--model: a shape with random weights (speed does not depend on the values): a GPTConfig preset
  (gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, tiny-modern) or a training preset (quick, shakespeare-cpu,
  shakespeare-bpe-cpu, shakespeare-char, bpe-6x384, modern-12x768), changed by the shape flags below; or a
  trained model: shakespeare, shakespeare-bpe, a folder written by `python -m kvlab.train --export`, a training
  checkpoint (runs/NAME/checkpoint.safetensors or runs/NAME). GPT-2 names are the shape: no download.

sweeps: every combination of --batch-sizes x --prompt-lens x --new-tokens x cached/uncached is
run (--warmup untimed runs, then --repeats timed ones; medians with min and max are reported).

examples:
  python -m kvlab.bench --batch-sizes 1,8 --hf --cache on           kvlab vs Hugging Face (both its caches), same weights
  python -m kvlab.bench --prompt-lens 32,128,512 --new-tokens 32 --cache on
                                                                    time to first token vs prompt length
  python -m kvlab.bench --new-tokens 1024 --max-seq-len 1056 --cache on
                                                                    a 1024-token per-token trace
  python -m kvlab.bench --serving --hf --threads 2                  the serving engine vs transformers' generate_batch,
                                                                    kvlab's static batch and one request at a time
  python -m kvlab.bench --dtype bfloat16 --hf                       the 16-bit path
  python -m kvlab.bench --device cuda --hf --compile --cache on --batch-sizes 1,8
                                                                    on a GPU, with the compiled (CUDA graph) step
  python -m kvlab.bench --speedup-table --model runs/quick --lengths 16,32 --prompt-lens 8 --plot speedup.png
                                                                    the model you trained: speed-up and tokens/s
  python -m kvlab.bench --model bpe-6x384 --d-model 512 --n-heads 8 --cache on
                                                                    a training preset's shape, changed
  python -m kvlab.bench --frontier --threads 2 --out data/bench/cpu_frontier.json --plot data/bench/cpu_frontier.png
                                                                    chapter 11: cache bytes against quality
chapter 5's recorded runs: bash scripts/record_bench_cpu.sh"""


def build_parser() -> Parser:
    parser = Parser(
        prog="python -m kvlab.bench",
        description="Time generation with and without the KV cache: time to first token (prefill), time per "
                    "output token, throughput and peak memory, swept over batch size, prompt length and new "
                    "tokens. Greedy decoding, on a shape with random weights or on a trained model. Results go "
                    "to a JSON file; --plot also draws them.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--model", default=None,
                        help="a shape preset or a trained model (see below; default: gpt2, the 124M shape)")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1], help="comma-separated, e.g. 1,8 (default 1)")
    parser.add_argument("--prompt-lens", type=positive_ints, default=[32], help="comma-separated (default 32)")
    parser.add_argument("--new-tokens", type=positive_ints, default=[128], help="comma-separated (default 128)")
    parser.add_argument("--cache", choices=["both", "on", "off"], default="both",
                        help="time cached, uncached or both (default both)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per setting (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--hf", action="store_true",
                        help="also time Hugging Face generate on the same weights, with its default (dynamic) cache "
                             "and with cache_implementation='static', both eager (GPT-2 shapes; needs transformers); "
                             "with --serving: the serving engine against transformers' continuous batching "
                             "(generate_batch), kvlab's static batch and one request at a time, --repeats rounds in turns")
    parser.add_argument("--compile", action="store_true",
                        help="also time kvlab.generate(..., compile=True): the decode step through torch.compile, "
                             "with CUDA graphs on a GPU (the warm-up runs pay for compiling)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    parser.add_argument("--out", default="bench.json", help="JSON output path (default bench.json)")
    parser.add_argument("--plot", default=None,
                        help="also save a plot of the results here (PNG); with --speedup-table, tokens/s against "
                             "the number of generated tokens, cached and uncached")
    shape = parser.add_argument_group("shape (with a shape preset as --model; each overrides the preset)")
    add_shape_arguments(shape, max_seq_len_help="the context length (e.g. 1056 for a 32-token prompt + 1024 new "
                                                "tokens on the GPT-2 shape; a longer position table costs no time)")
    # Chapter 9 (serving): a separate set of measurements, see run_serving.
    serving = parser.add_argument_group("chapter 9 (--serving)")
    serving.add_argument("--serving", action="store_true",
                         help="instead of the sweep, run chapter 9's serving measurements (kvlab.serving_bench): "
                              "throughput and KV memory against --serving-batch-sizes cached and uncached, the "
                              "engine against one request at a time, reserved/used KV bytes, prefix sharing")
    serving.add_argument("--serving-batch-sizes", type=positive_ints, default=[1, 2, 4, 8, 16, 32],
                         help="batch sizes for --serving (default 1,2,4,8,16,32)")
    serving.add_argument("--serving-new-tokens", type=positive_int, default=64,
                         help="new tokens per row for --serving (default 64)")
    serving.add_argument("--serving-uncached-budget", type=float, default=30.0,
                         help="--serving stops the uncached side after a run longer than this many seconds "
                              "(default 30)")
    add_speedup_arguments(parser)
    # -- chapter 10: beam search, speculative decoding, the int8 cache (a separate run: --beyond) --
    beyond = parser.add_argument_group(
        "chapter 10 (--beyond)", "measure on the shipped Shakespeare model instead of sweeping: speculative greedy "
        "decoding vs plain greedy (n-gram and model drafts, acceptance vs k), the int8 cache's bytes and quality, "
        "and beam vs greedy on chapter 8's toy tasks; e.g. python -m kvlab.bench --beyond --threads 2 "
        "--out data/bench/cpu_beyond.json")
    beyond.add_argument("--beyond", action="store_true", help="run chapter 10's measurements and write them to --out")
    beyond.add_argument("--beyond-ks", type=positive_ints, default=[1, 2, 4, 8],
                        help="draft tokens per round (default 1,2,4,8)")
    beyond.add_argument("--beyond-new-tokens", type=positive_int, default=256, help="greedy tokens per run (default 256)")
    beyond.add_argument("--beyond-windows", type=positive_int, default=200,
                        help="128-character validation windows for the int8 cache's quality (default 200)")
    # -- chapter 11: cache size against quality on the family of kvlab.train.family (a separate run: --frontier) --
    front = parser.add_argument_group(
        "chapter 11 (--frontier)", "measure chapter 11's model family (kvlab.load_cache_family) instead of sweeping: "
        "every way of shrinking the cache in kvlab.bench.frontier.FRONTIER_METHODS, fed one token at a time through "
        "the cache on validation windows (nats per character, top-1 agreement with the full cache, KV bytes per "
        "token), eviction past the training length, and the attention each head puts on the start token; float32 "
        "on the CPU; e.g. python -m kvlab.bench --frontier --threads 2 --out data/bench/cpu_frontier.json "
        "--plot data/bench/cpu_frontier.png")
    front.add_argument("--frontier", action="store_true",
                       help="run chapter 11's measurements and write them to --out")
    front.add_argument("--frontier-windows", type=positive_int, default=64,
                       help=f"{FRONTIER_LENGTH}-character validation windows for every method (default 64)")
    front.add_argument("--frontier-long-windows", type=positive_int, default=8,
                       help=f"{LONG_LENGTH}-character validation windows for eviction past the training length "
                            "(default 8)")
    front.add_argument("--frontier-family", default=None, metavar="DIR",
                       help="a folder holding the members as exported folders, DIR/mha, DIR/gqa, DIR/mqa, DIR/mla "
                            "(default: the shipped family, data/cache_family)")
    return parser


def _config(parser: Parser, args) -> tuple[GPTConfig, bool]:
    """The model's configuration, read without building it, and whether it is a shape (random weights)."""
    from ..models import model_config, shape_config

    kwargs = shape_config(args.model)
    if kwargs is not None:
        try:
            return GPTConfig(**apply_shape_flags(kwargs, args)), True
        except (TypeError, ValueError) as err:
            parser.error(f"--model {args.model} with the shape flags: {err}")
    given = shape_flags_given(args)
    try:
        config = model_config(args.model, shapes=True)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if given:
        parser.error(f"{', '.join(given)}: --model {args.model} is a trained model, whose weights fix its shape; "
                     "the shape flags change a shape preset (e.g. --model gpt2 or --model quick)")
    return config, False


def _context_error(parser: Parser, what: str, needed: int, config: GPTConfig, random_weights: bool) -> None:
    fix = (f"lower them, or pass --max-seq-len {needed} (a longer context costs no time)" if random_weights else
           "lower them (a trained model's context is fixed by its weights)")
    parser.error(f"{what} = {needed} positions exceeds the model's context of {config.max_seq_len}: {fix}")


def _check_fits(parser: Parser, args, config: GPTConfig, random_weights: bool) -> None:
    """Every length the chosen measurement needs, against the model's context."""
    L = config.max_seq_len
    if args.serving:
        needed = args.prompt_lens[0] + args.serving_new_tokens
        if needed > L:
            _context_error(parser, f"--prompt-lens {args.prompt_lens[0]} + --serving-new-tokens "
                                   f"{args.serving_new_tokens}", needed, config, random_weights)
        if L < 4:
            parser.error(f"--serving needs a model with a context of at least 4 positions, got {L}")
    elif args.speedup_table:
        if len(args.prompt_lens) != 1:
            parser.error("--speedup-table takes one --prompt-lens value")
        if len(args.batch_sizes) != 1:
            parser.error("--speedup-table takes one --batch-sizes value")
        needed = args.prompt_lens[0] + max(args.lengths)
        if needed > L:
            _context_error(parser, f"--prompt-lens {args.prompt_lens[0]} + the longest of --lengths "
                                   f"{max(args.lengths)}", needed, config, random_weights)
    else:
        needed = max(args.prompt_lens) + max(args.new_tokens)
        if needed > L:
            _context_error(parser, f"the longest --prompt-lens {max(args.prompt_lens)} + --new-tokens "
                                   f"{max(args.new_tokens)}", needed, config, random_weights)
    gpt2_like = (config.norm, config.mlp, config.pos, config.bias, config.tie_embeddings, config.n_kv_heads) == \
        ("layernorm", "gelu", "learned", True, True, config.n_heads)
    if args.hf and not gpt2_like:
        parser.error(f"--hf compares with Hugging Face's GPT-2, which needs a GPT-2-style model (layernorm, "
                     f"gelu, learned positions, biases, tied embeddings, no grouped-query attention); "
                     f"--model {args.model} is not one")
    if args.serving and args.hf:
        needed = max(_SERVING_HF_PROMPT[1] + args.serving_new_tokens, _SERVING_HF_PREFIX + 16 + 4)
        if needed > L:
            _context_error(parser, f"--serving --hf's longest request ({_SERVING_HF_PROMPT[1]}-token prompt + "
                                   f"--serving-new-tokens {args.serving_new_tokens}) or its shared prompt "
                                   f"({_SERVING_HF_PREFIX} + 16 own tokens + 4 new)", needed, config, random_weights)
    _check_outputs(parser, args)


_SERVING_HF_PROMPT = (16, 64)  # --serving --hf: the requests' prompt lengths
_SERVING_HF_PREFIX = 256  # and the shared prompt's


def _check_outputs(parser: Parser, args) -> None:
    """--out and --plot must be writable where they point, and --plot an image format matplotlib
    writes: found now, not after the measurements."""
    for flag, value in (("--out", args.out), ("--plot", args.plot)):
        if value is not None and not Path(value).resolve().parent.is_dir():
            parser.error(f"{flag} {value}: the folder {Path(value).parent} does not exist")
    suffix = Path(args.plot).suffix.lower().lstrip(".") if args.plot else ""
    if suffix:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if suffix not in formats:
            parser.error(f"--plot {args.plot}: matplotlib cannot write .{suffix} files; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")


def _model(args, config: GPTConfig, random_weights: bool, device: torch.device) -> GPT:
    if random_weights:
        torch.manual_seed(0)
        model = GPT(config)
    else:
        from ..models import load_model

        model = load_model(args.model, device)[0]
    return model.to(device=device, dtype=getattr(torch, args.dtype)).eval()


def main(argv: list[str] | None = None) -> int:
    """`python -m kvlab.bench`: sweep cached and uncached generation and write JSON (and a plot)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = command_line("kvlab.bench", argv)
    if args.frontier:
        _check_frontier_flags(parser, args)
        return _frontier_main(parser, args, command)
    if args.beyond:
        if args.model is not None or shape_flags_given(args):
            parser.error("--beyond measures the shipped Shakespeare models; leave out --model and the shape flags")
        return _beyond_main(args, command)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.serving and args.speedup_table:
        parser.error("--serving and --speedup-table are separate runs; choose one")
    if args.serving and args.hf and args.plot:
        parser.error("--serving --hf writes a JSON record only; leave out --plot (--serving alone draws one)")
    args.model = args.model or "gpt2"
    config, random_weights = _config(parser, args)
    args.random_weights = random_weights
    _check_fits(parser, args, config, random_weights)
    device = pick_device_or_exit(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = _model(args, config, random_weights, device)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if args.serving and args.hf:
        return run_serving_vs_hf(model, args, command)
    if args.serving:
        return run_serving(model, args, command)
    if args.speedup_table:
        return run_speedup_cli(args, parser, model, command)
    return _run_sweep(model, args, command)


def _write(result: dict, args, command: str) -> None:
    result["command"] = command
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def _hf_twin(model: GPT, dtype: str):
    """Hugging Face's GPT2LMHeadModel holding `model`'s weights, on its device, in `dtype`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..pretrained import to_hf_gpt2_state_dict

    c = model.config
    hf_model = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model,
                                          n_layer=c.n_layers, n_head=c.n_heads)).eval()
    hf_model.load_state_dict(to_hf_gpt2_state_dict(model), strict=False)
    return hf_model.to(device=model.device, dtype=getattr(torch, dtype))


def run_serving_vs_hf(model: GPT, args, command: str) -> int:
    """`python -m kvlab.bench --serving --hf`: the engine against transformers' continuous batching,
    kvlab's static batch and one request at a time (kvlab.bench.serving_hf), as JSON."""
    import transformers

    result = serving_vs_hf(model, _hf_twin(model, args.dtype), prompt_range=_SERVING_HF_PROMPT,
                           new_tokens=args.serving_new_tokens, rounds=args.repeats, prefix_len=_SERVING_HF_PREFIX)
    result["transformers"] = transformers.__version__
    result["model_name"] = args.model
    _write(result, args, command)
    for name, value in result["targets"].items():
        print(f"{name}: {value:.3f}" if not isinstance(value, bool) else f"{name}: {value}")
    return 0


def _run_sweep(model: GPT, args, command: str) -> int:
    hf_model = _hf_twin(model, args.dtype) if args.hf else None
    use_cache = {"both": (True, False), "on": (True,), "off": (False,)}[args.cache]
    result = sweep(model, batch_sizes=args.batch_sizes, prompt_lens=args.prompt_lens, new_tokens=args.new_tokens,
                   use_cache=use_cache, repeats=args.repeats, warmup=args.warmup, hf_model=hf_model,
                   compile=args.compile)
    if hf_model is not None:
        import transformers

        result["transformers"] = transformers.__version__
    result["read_bandwidth_bytes_s"] = read_bandwidth(model.device)
    result["decode_weight_bytes"] = decode_weight_bytes(model)
    result["model_name"] = args.model
    _write(result, args, command)
    if args.plot:
        from ..viz import plot_bench

        plot_bench(result).savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")
    return 0


def run_serving(model: GPT, args, command: str) -> int:
    """`python -m kvlab.bench --serving`: chapter 9's measurements on `model`, written as JSON (and a plot).

    Built in chapter 9."""
    result = serving_bench(model, batch_sizes=args.serving_batch_sizes, prompt_len=args.prompt_lens[0],
                           new_tokens=args.serving_new_tokens, uncached_budget_s=args.serving_uncached_budget)
    _write(result, args, command)
    for name, value in result["targets"].items():
        print(f"{name}: {value:.3f}" if value is not None else f"{name}: skipped")
    if args.plot:
        plot_serving(result).savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")
    return 0


def _beyond_main(args, command: str) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = beyond(ks=args.beyond_ks, new_tokens=args.beyond_new_tokens, windows=args.beyond_windows,
                    repeats=args.repeats)
    result["note"] = ("one run on a machine shared with other jobs: absolute tokens/s are loaded numbers; the "
                      "speed-ups are ratios within this run (plain and speculative interleaved)")
    _write(result, args, command)
    return 0


# -- chapter 11's frontier (`python -m kvlab.bench --frontier`) ---------------------------------------

FRONTIER_LENGTH = 128  # characters per window: the family's training length
LONG_LENGTH, LONG_BUDGET, LONG_PAST = 512, 64, 128  # long_context: windows of four training lengths, caches of
# 64 tokens, scored past the first 128 positions
SINK_WINDOWS, SINK_FROM = 32, 32  # sink_share: windows, and the first query position counted


def _check_frontier_flags(parser: Parser, args) -> None:
    """--frontier's usage errors, before the text or any model is read."""
    others = [flag for flag, on in (("--beyond", args.beyond), ("--serving", args.serving),
                                    ("--speedup-table", args.speedup_table)) if on]
    if others:
        parser.error(f"--frontier and {', '.join(others)} are separate runs; choose one")
    if args.model is not None or shape_flags_given(args):
        parser.error("--frontier measures chapter 11's model family (kvlab.load_cache_family); leave out --model and "
                     "the shape flags (--frontier-family DIR measures another export of the family)")
    ignored = [flag for flag, on in (("--hf", args.hf), ("--compile", args.compile),
                                     (f"--dtype {args.dtype}", args.dtype != "float32"),
                                     (f"--device {args.device}", args.device not in (None, "cpu"))) if on]
    if ignored:
        parser.error(f"{', '.join(ignored)}: --frontier measures float32 caches on the CPU; leave it out")
    if args.frontier_family is not None:
        from ..train.family import CACHE_FAMILY

        folder = Path(args.frontier_family)
        missing = [m for m in CACHE_FAMILY if not (folder / m / "model.safetensors").is_file()]
        if missing:
            parser.error(f"--frontier-family {args.frontier_family}: no exported {', '.join(missing)} there (it must "
                         f"hold DIR/NAME/model.safetensors, config.json, tokenizer.json for each of "
                         f"{', '.join(CACHE_FAMILY)}, as scripts/train_cache_family.py exports them)")
    _check_outputs(parser, args)


def uniform_sink_share(length: int = FRONTIER_LENGTH, from_pos: int = SINK_FROM) -> float:
    """The share of attention on position 0 if every query spread its attention evenly over the
    positions it sees: the mean of 1/(p + 1) over the query positions p >= `from_pos`."""
    return sum(1 / (p + 1) for p in range(from_pos, length)) / (length - from_pos)


def frontier_record(models: dict, ids: torch.Tensor, bos: int, *, windows: int = 64, long_windows: int = 8,
                    methods: dict | None = None, progress: bool = False) -> dict:
    """Chapter 11's measurements on the family `models` (member name -> model) over the validation
    ids: `frontier` on `windows` windows of 128, `long_context` on every member but MLA (the baseline's
    also as `nats_per_char`), `sink_share`
    of every member. Built in chapter 11."""
    from .frontier import family_windows, frontier, long_context, sink_share

    x, y = family_windows(ids, bos, length=FRONTIER_LENGTH, n_windows=windows)
    points = frontier(models, x, y, methods, progress=progress)
    t0 = time.perf_counter()
    # every member an evicting cache can hold (not MLA's latents): the StreamingLLM comparison belongs on
    # whichever member has a sink
    by_member = {name: long_context(model, ids, bos, length=LONG_LENGTH, n_windows=long_windows, budget=LONG_BUDGET,
                                    past=LONG_PAST) for name, model in models.items() if name != "mla"}
    long = by_member["mha"]
    long_s = time.perf_counter() - t0
    xs, _ = family_windows(ids, bos, length=FRONTIER_LENGTH, n_windows=SINK_WINDOWS)
    sinks = {}
    for name, model in models.items():
        share = sink_share(model, xs, from_pos=SINK_FROM)  # (n_layers, n_heads)
        sinks[name] = {"max": round(share.max().item(), 4),
                       "share": [[round(v, 4) for v in row] for row in share.tolist()]}
    return {
        "windows": {"n_windows": windows, "length": FRONTIER_LENGTH, "split": "val", "bos": bos,
                    "characters": windows * FRONTIER_LENGTH},
        "points": points,
        "long_context": {"member": "mha", "n_windows": long_windows, "length": LONG_LENGTH, "budget": LONG_BUDGET,
                         "past": LONG_PAST, "nats_per_char": long, "by_member": by_member,
                         "seconds": round(long_s, 2),
                         "what": "nats per character over the positions >= past of windows of length, fed one "
                                 "token at a time through the model's sliding window and through evicting caches "
                                 "of budget tokens"},
        "sink_share": {"n_windows": SINK_WINDOWS, "length": FRONTIER_LENGTH, "from_pos": SINK_FROM,
                       "uniform": round(uniform_sink_share(), 4), "members": sinks,
                       "what": "mean attention weight that queries at positions >= from_pos put on position 0 "
                               "(BOS), per layer (rows) and head; uniform: the same if attention were spread "
                               "evenly"},
    }


def _frontier_main(parser: Parser, args, command: str) -> int:
    from ..data import load_shakespeare_text, train_val_split
    from ..device import cpu_model_name, describe_device
    from ..pretrained import CACHE_FAMILY_DIR, load_cache_family
    from ..train.family import BOS_CHAR, CACHE_FAMILY, family_tokenizer

    started = time.perf_counter()
    text = load_shakespeare_text()
    tok = family_tokenizer(text)
    ids = torch.tensor(tok.encode(train_val_split(text)[1]))
    for flag, n, length in (("--frontier-windows", args.frontier_windows, FRONTIER_LENGTH),
                            ("--frontier-long-windows", args.frontier_long_windows, LONG_LENGTH)):
        if n * length > len(ids):
            parser.error(f"{flag} {n}: {n} windows of {length} need {n * length} characters; the validation split "
                         f"has {len(ids)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    models, family = {}, {}
    for name in CACHE_FAMILY:
        try:
            model, member_tok = load_cache_family(name, args.frontier_family)
        except (ValueError, OSError) as err:
            parser.error(str(err))
        if getattr(member_tok, "chars", None) != tok.chars:
            parser.error(f"family member {name}: its tokenizer is not the family's (the 65 characters of Tiny "
                         f"Shakespeare and the start token, kvlab.train.family.family_tokenizer)")
        models[name] = model
        record = model.record
        family[name] = {"parameters": sum(p.numel() for p in model.parameters()),
                        **{k: record[k] for k in ("steps", "val_nats_per_char", "smoke") if k in record}}
    print(f"--frontier: {len(CACHE_FAMILY)} members, {args.frontier_windows} windows of {FRONTIER_LENGTH} "
          f"validation characters, {torch.get_num_threads()} thread(s)")
    result = {"what": "chapter 11's frontier: quality against KV cache bytes per token for every method of "
                      "kvlab.bench.frontier.FRONTIER_METHODS on the family of kvlab.train.family, float32, "
                      "teacher-forced one token per forward through each cache",
              "device": describe_device(torch.device("cpu")), "cpu": cpu_model_name(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "family_dir": args.frontier_family or CACHE_FAMILY_DIR,
              "family": family}
    result.update(frontier_record(models, ids, tok.stoi[BOS_CHAR], windows=args.frontier_windows,
                                  long_windows=args.frontier_long_windows, progress=True))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    _write(result, args, command)
    print("past the training length (nats/char, positions >= 128 of 512):",
          ", ".join(f"{k} {v:.4f}" for k, v in result["long_context"]["nats_per_char"].items()))
    print(f"attention on BOS, largest head (uniform {result['sink_share']['uniform']}):",
          ", ".join(f"{k} {v['max']}" for k, v in result["sink_share"]["members"].items()))
    if args.plot:
        import matplotlib.pyplot as plt

        from .frontier import plot_frontier

        ax = plot_frontier(result["points"])  # its legend sits beside the axes
        ax.set_title(f"chapter 11's family: {args.frontier_windows} windows of {FRONTIER_LENGTH} validation "
                     f"characters, {result['device']}", fontsize=8)
        ax.figure.savefig(args.plot, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        print(f"wrote {args.plot}")
    return 0


# -- the speed-up table (`python -m kvlab.bench --speedup-table`) -----------------------------------


def add_speedup_arguments(parser) -> None:
    """The flags `python -m kvlab.bench` takes for the speed-up table."""
    group = parser.add_argument_group("speed-up table (--speedup-table)")
    group.add_argument("--speedup-table", action="store_true",
                       help="instead of a sweep: time cached vs uncached generation for each of --lengths new "
                            "tokens, and write the speed-up table as JSON (--out) and Markdown (same name, .md); "
                            "--plot draws tokens/s against the number of generated tokens, cached and uncached")
    group.add_argument("--lengths", type=positive_ints, default=list(DEFAULT_LENGTHS),
                       help="new-token counts for --speedup-table, comma-separated (default 100,200,300,500)")
    group.add_argument("--clock", choices=["wall", "process"], default="wall",
                       help="wall: wall time between device syncs (default); process: CPU seconds this process used "
                            "(a CPU shared with other jobs; best with --threads 1)")
    group.add_argument("--note", default=None, help="a remark stored with the table (e.g. how loaded the machine was)")


def run_speedup_cli(args, parser, model, command: str) -> int:
    """Run the table for parsed `args` on `model` (its lengths already checked against the model by
    `main`); write JSON, Markdown and, with --plot, the tokens/s chart. Returns the exit code."""
    fast_cpu_inference(model, args.batch_sizes[0])  # the CPU kernel choice, made once for this process
    try:
        table = speedup_table(model, args.lengths, prompt_len=args.prompt_lens[0], batch_size=args.batch_sizes[0],
                              repeats=args.repeats, clock=args.clock)
    except ValueError as err:
        parser.error(str(err))
    if args.note:
        table["note"] = args.note
    table["model_name"] = args.model
    table["command"] = command
    out = Path(args.out)
    out.write_text(json.dumps(table, indent=1) + "\n")
    md = out.with_suffix(".md")
    shape = " shape" if getattr(args, "random_weights", False) else ""
    md.write_text(speedup_markdown(table, title=f"KV cache speed-up, {args.model}{shape}"))
    print(speedup_markdown(table))
    print(f"wrote {out} and {md}")
    if args.plot:
        from ..viz import plot_speedup

        plot_speedup(table).savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")
    return 0
