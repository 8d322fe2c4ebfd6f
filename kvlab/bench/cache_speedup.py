"""The speed-up table: generation with and without the KV cache, by number of generated tokens.

Shape legend: B batch size, T prompt length, N new tokens.

For each length N the same greedy generation runs twice, once with the cache (prefill, then
one token per step) and once without it (the whole sequence recomputed every step), and the
table reports both times, the speed-up (uncached / cached) and the time saved
(1 - cached / uncached, in percent), then the average and best speed-up and the total time
saved over all lengths. Both runs must produce the same tokens: the table is of one
computation done two ways. Built in chapter 5.

    python -m kvlab.bench --speedup-table --lengths 100,200,300,500
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ..device import describe_device
from ..gpt import GPT
from ..validation import check_choice, check_positive_int
from .timing import time_generation

__all__ = ["DEFAULT_LENGTHS", "speedup_table", "speedup_markdown"]

DEFAULT_LENGTHS = (100, 200, 300, 500)


def _check_lengths(lengths: Sequence[int]) -> list[int]:
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
        raise ValueError(f"lengths must be a non-empty sequence of positive ints, got {lengths!r}")
    out = []
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"lengths must be positive ints, got {n!r} in {list(lengths)!r}")
        out.append(n)
    return out


def speedup_table(model, lengths: Sequence[int] = DEFAULT_LENGTHS, *, prompt_len: int = 32, batch_size: int = 1,
                  repeats: int = 1, seed: int = 0, clock: str = "wall",
                  progress: Callable[[str], None] | None = print) -> dict:
    """Time cached and uncached greedy generation of each of `lengths` new tokens; return the table.

    One random prompt (`batch_size` × `prompt_len`, seeded) is continued by each length, with
    and without the cache, `repeats` times each (the median total is kept), after one short
    untimed warm-up of each kind. Rows hold `new_tokens`, `uncached_s`, `cached_s`, `speedup`
    and `time_saved_pct`; `summary` holds the average and best speed-up and the total time
    saved (seconds and percent of all uncached time). Raises if the two generations differ.

    `clock="wall"` times each generation as `kvlab.bench` does (wall time between device
    synchronisations). `clock="process"` counts the CPU seconds this process spent instead: on
    a CPU shared with other jobs, wall time mostly measures the others, while CPU time (best
    with one thread) still measures what each generation cost. CPU only. The model is timed as it
    is (`python -m kvlab.bench --speedup-table` first makes the CPU kernel choice,
    `kvlab.cpu_kernels.fast_cpu_inference`). Built in chapter 5.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a kvlab.GPT, got {type(model).__name__}")
    lengths = _check_lengths(lengths)
    for name, value in (("prompt_len", prompt_len), ("batch_size", batch_size), ("repeats", repeats)):
        check_positive_int(name, value)
    check_choice("clock", clock, ("wall", "process"))
    if clock == "process" and model.device.type != "cpu":
        raise ValueError(f"clock='process' measures CPU time; the model is on {model.device}: use clock='wall'")
    longest = prompt_len + max(lengths)
    if longest > model.config.max_seq_len:
        raise ValueError(f"prompt_len ({prompt_len}) + the longest length ({max(lengths)}) = {longest} exceeds the "
                         f"model's max_seq_len={model.config.max_seq_len}; shorten them, or use a model with a longer "
                         "context (max_seq_len=; python -m kvlab.bench: --max-seq-len)")
    say = progress or (lambda _: None)
    device = model.device
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=g).to(device)
    warm = min(8, min(lengths))
    for cached in (True, False):  # untimed: first calls pay for allocations and kernel choices
        time_generation(model, idx, warm, use_cache=cached)

    rows = []
    for n in lengths:
        totals, tokens = {}, {}
        for cached in (True, False):
            runs = []
            for _ in range(repeats):
                cpu_start = time.process_time()
                timing, tokens[cached] = time_generation(model, idx, n, use_cache=cached)
                runs.append(timing.total if clock == "wall" else time.process_time() - cpu_start)
            totals[cached] = statistics.median(runs)
        if not torch.equal(tokens[True], tokens[False]):
            raise AssertionError(f"cached and uncached generation of {n} tokens differ: the cache is wrong")
        row = {"new_tokens": n, "uncached_s": totals[False], "cached_s": totals[True],
               "speedup": totals[False] / totals[True], "time_saved_pct": 100.0 * (1 - totals[True] / totals[False])}
        rows.append(row)
        say(f"N={n:<5d} no cache {row['uncached_s']:8.2f} s   cache {row['cached_s']:7.2f} s   "
            f"speed-up {row['speedup']:5.2f}x   saved {row['time_saved_pct']:5.1f}%")
    best = max(rows, key=lambda r: r["speedup"])
    uncached_total = sum(r["uncached_s"] for r in rows)
    cached_total = sum(r["cached_s"] for r in rows)
    summary = {
        "average_speedup": statistics.mean(r["speedup"] for r in rows),
        "best_speedup": best["speedup"], "best_at_new_tokens": best["new_tokens"],
        "uncached_total_s": uncached_total, "cached_total_s": cached_total,
        "time_saved_s": uncached_total - cached_total,
        "time_saved_pct": 100.0 * (1 - cached_total / uncached_total),
    }
    c = model.config
    return {
        "device": describe_device(device), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "model": c.to_dict(), "parameters": model.num_params(),
        "batch_size": batch_size, "prompt_len": prompt_len,
        "repeats": repeats, "decoding": "greedy", "clock": clock, "rows": rows, "summary": summary,
    }


def speedup_markdown(table: dict, title: str | None = None) -> str:
    """The table as Markdown: one row per length, then the summary lines. Built in chapter 5."""
    if not isinstance(table, dict) or "rows" not in table or "summary" not in table:
        raise ValueError("table must be a dict returned by speedup_table (with 'rows' and 'summary')")
    s = table["summary"]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += [f"{table['device']}, {table['dtype']}, batch {table['batch_size']}, prompt {table['prompt_len']} "
              f"tokens, greedy, median of {table['repeats']} run(s)"
              + ("; times are CPU seconds of the process (clock=process)." if table.get("clock") == "process"
                 else ".")
              + (f" {table['note']}" if table.get("note") else ""), "",
              "| new tokens | no cache (s) | KV cache (s) | speed-up | time saved |",
              "|---:|---:|---:|---:|---:|"]
    for r in table["rows"]:
        lines.append(f"| {r['new_tokens']} | {r['uncached_s']:.2f} | {r['cached_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['time_saved_pct']:.1f}% |")
    lines += ["", f"- average speed-up: {s['average_speedup']:.2f}x",
              f"- best speed-up: {s['best_speedup']:.2f}x (at {s['best_at_new_tokens']} new tokens)",
              f"- total time saved: {s['time_saved_s']:.2f} s of {s['uncached_total_s']:.2f} s "
              f"({s['time_saved_pct']:.1f}%)"]
    return "\n".join(lines) + "\n"
