"""Measuring serving: throughput and KV memory against batch size, the engine against one request
at a time, reserved against used KV bytes, and the bytes a shared prefix saves.

Shape legend: B batch size, T prompt length, N new tokens.

Every function takes the model, so the chapter runs them live on a small model and
`python -m kvlab.bench --serving` on the GPT-2 shape. Times are wall-clock seconds on whatever
else the machine is doing: compare ratios taken in one run, not numbers across runs. Greedy
decoding throughout. Built in chapter 9.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from ..cache import kv_cache_bytes
from ..device import cpu_model_name, describe_device, synchronize
from ..generation import generate
from ..gpt import GPT
from ..serving import Engine, mixed_workload

__all__ = ["run_workload", "batch_sweep", "engine_vs_sequential", "prefix_sharing_bytes", "fit_ranges",
           "serving_bench",
           "plot_serving", "cpu_model_name"]


def batch_sweep(model: GPT, *, batch_sizes=(1, 2, 4, 8, 16, 32), prompt_len: int = 32, new_tokens: int = 64,
                uncached_budget_s: float = 30.0, seed: int = 0, progress=print) -> list[dict]:
    """Greedy generation of `new_tokens` after a `prompt_len` prompt, batch by batch, with and without the cache.

    Each row of the result: use_cache, batch_size, total_s, throughput_tok_s (B·N / total) and
    kv_bytes (the static cache's bytes; 0 uncached, where keys and values are recomputed at every
    step and dropped). The uncached side stops after the first batch size whose run took longer
    than `uncached_budget_s`: its work grows as B·(T+N)² against B·(T+N) cached. Built in chapter 9.
    """
    c = model.config
    rows = []
    g = torch.Generator().manual_seed(seed)
    idx_all = torch.randint(0, c.vocab_size, (max(batch_sizes), prompt_len), generator=g).to(model.device)
    generate(model, idx_all[:1], 2, temperature=0)  # warm-up
    for use_cache in (True, False):
        for B in batch_sizes:
            stats: dict = {}
            generate(model, idx_all[:B], new_tokens, temperature=0, use_cache=use_cache, stats=stats)
            kv = kv_cache_bytes(c.n_layers, c.n_kv_heads, c.head_dim, prompt_len + new_tokens, B, model.dtype) \
                if use_cache else 0
            row = dict(use_cache=use_cache, batch_size=B, prompt_len=prompt_len, new_tokens=new_tokens,
                       total_s=stats["total_s"], throughput_tok_s=B * new_tokens / stats["total_s"], kv_bytes=kv)
            rows.append(row)
            progress(f"{'cached' if use_cache else 'uncached':8s} B={B:<3d} {row['throughput_tok_s']:8.1f} tok/s  "
                     f"total {row['total_s']:6.2f} s  KV {kv / 2**20:7.1f} MiB")
            if not use_cache and stats["total_s"] > uncached_budget_s:
                break
    return rows


def run_workload(engine: Engine, workload) -> dict:
    """Submit every (prompt, max_new_tokens) of `workload` (greedy) to `engine` and step it to the end.

    Returns total_s, new_tokens, throughput_tok_s, steps, reserved_over_used (the sum over steps of
    `kv_bytes_reserved()` over that of `kv_bytes_used()`, read after each step), the mean bytes
    reserved and used per step, preemptions, and results (id -> tokens). Built in chapter 9.
    """
    for prompt, n in workload:
        engine.submit(prompt, n, temperature=0)
    reserved = used = steps = 0
    synchronize(engine.model.device)
    start = time.perf_counter()
    while engine.num_waiting or engine.num_running:
        engine.step()
        reserved += engine.kv_bytes_reserved()
        used += engine.kv_bytes_used()
        steps += 1
    synchronize(engine.model.device)
    elapsed = time.perf_counter() - start
    results = engine.run()
    new = sum(len(results[i]) - len(p) for i, (p, _) in enumerate(workload))
    return dict(total_s=elapsed, new_tokens=new, throughput_tok_s=new / elapsed, steps=steps,
                reserved_over_used=reserved / used, mean_reserved_bytes=reserved / steps,
                mean_used_bytes=used / steps, preemptions=engine.preemptions, results=results)


@torch.inference_mode()
def engine_vs_sequential(model: GPT, *, n_requests: int = 32, max_batch_size: int = 16, block_size: int = 16,
                         prompt_range=(16, 64), new_range=(16, 64), seed: int = 0, progress=print) -> dict:
    """Serve `n_requests` seeded mixed-length requests one at a time (`kvlab.generate`) and with the
    engine, paged and static (slabs as long as the longest request); tokens/s and KV bytes.

    Reserved/used is the sum over engine steps of `kv_bytes_reserved()` over that of
    `kv_bytes_used()`, measured after each step. `tokens_equal` is the fraction of requests whose
    engine result equals the one-at-a-time result. Built in chapter 9.
    """
    workload = mixed_workload(n_requests, seed=seed, prompt_range=prompt_range, new_range=new_range,
                              vocab_size=model.config.vocab_size)
    longest = max(len(p) + n for p, n in workload)
    device = model.device
    generate(model, torch.tensor([workload[0][0]], device=device), 2, temperature=0)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    alone = [generate(model, torch.tensor([p], device=device), n, temperature=0)[0] for p, n in workload]
    synchronize(device)
    seq_s = time.perf_counter() - start
    new = sum(n for _, n in workload)
    out = dict(n_requests=n_requests, max_batch_size=max_batch_size, block_size=block_size,
               prompt_range=list(prompt_range), new_range=list(new_range), seed=seed, longest=longest,
               sequential=dict(total_s=seq_s, new_tokens=new, throughput_tok_s=new / seq_s))
    progress(f"one at a time: {new / seq_s:8.1f} tok/s ({seq_s:.1f} s)")
    for kv in ("paged", "static"):
        extra = dict(block_size=block_size) if kv == "paged" else {}
        engine = Engine(model, max_batch_size=max_batch_size, kv=kv, max_seq_len=longest, **extra)
        run = run_workload(engine, workload)
        results = run.pop("results")
        run["tokens_equal"] = sum(torch.equal(results[i].cpu(), a.cpu()) for i, a in enumerate(alone)) / n_requests
        run["speedup"] = run["throughput_tok_s"] / out["sequential"]["throughput_tok_s"]
        out[kv] = run
        progress(f"engine {kv:6s}: {run['throughput_tok_s']:8.1f} tok/s ({run['total_s']:.1f} s, "
                 f"{run['speedup']:.2f}x), reserved/used {run['reserved_over_used']:.3f}, "
                 f"equal to one-at-a-time {run['tokens_equal']:.0%}")
    return out


@torch.inference_mode()
def prefix_sharing_bytes(model: GPT, *, n_requests: int = 16, prefix_len: int = 256, suffix_len: int = 16,
                         new_tokens: int = 4, block_size: int = 16, seed: int = 0, progress=print) -> dict:
    """KV bytes of a shared `prefix_len`-token prompt held by `n_requests` requests, with and without sharing.

    Each request is the shared prompt followed by `suffix_len` tokens of its own. After every
    request is admitted, `prefix_bytes` counts the distinct blocks that hold positions below
    `prefix_len`; `reserved_bytes` is `kv_bytes_reserved()`. Greedy results must be equal with
    and without sharing (`tokens_equal`). All requests arrive together; `mean_ttft_s` is the mean
    time from then to each request's first token, and `ttft_ratio` unshared over shared. Built in
    chapter 9.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (a first token, then decoding), got {new_tokens}")
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    prefix = torch.randint(0, V, (prefix_len,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, V, (suffix_len,), generator=g).tolist() for _ in range(n_requests)]
    out = dict(n_requests=n_requests, prefix_len=prefix_len, suffix_len=suffix_len, block_size=block_size)
    results = {}
    for sharing in (False, True):
        engine = Engine(model, max_batch_size=n_requests, block_size=block_size, prefix_sharing=sharing,
                        max_seq_len=prefix_len + suffix_len + new_tokens)
        ids = [engine.submit(p, new_tokens, temperature=0) for p in prompts]
        first: dict[int, float] = {}  # request id -> seconds from submission to its first token
        start = time.perf_counter()
        while len(first) < n_requests:
            engine.step()
            now = time.perf_counter() - start
            for r in engine.scheduler.running:
                if r.n_generated >= 1:
                    first.setdefault(r.id, now)
        admitted_s = time.perf_counter() - start
        tables = engine.block_tables()
        prefix_blocks = {b for t in tables.values() for b in t[: -(-prefix_len // block_size)]}
        row = dict(prefix_bytes=len(prefix_blocks) * engine.pool.bytes_per_block,
                   reserved_bytes=engine.kv_bytes_reserved(), used_bytes=engine.kv_bytes_used(),
                   prefill_s=admitted_s, mean_ttft_s=sum(first.values()) / n_requests)
        results[sharing] = engine.run()
        results[sharing] = [results[sharing][i] for i in ids]
        out["shared" if sharing else "unshared"] = row
        progress(f"{'shared' if sharing else 'unshared':8s}: prompt KV {row['prefix_bytes'] / 2**20:7.2f} MiB, "
                 f"reserved {row['reserved_bytes'] / 2**20:7.2f} MiB, mean time to first token "
                 f"{row['mean_ttft_s']:.2f} s")
    out["prefix_ratio"] = out["shared"]["prefix_bytes"] / out["unshared"]["prefix_bytes"]
    out["ttft_ratio"] = out["unshared"]["mean_ttft_s"] / out["shared"]["mean_ttft_s"]
    out["tokens_equal"] = all(torch.equal(a, b) for a, b in zip(results[False], results[True]))
    return out


def serving_bench(model: GPT, *, batch_sizes=(1, 2, 4, 8, 16, 32), prompt_len: int = 32, new_tokens: int = 64,
                  uncached_budget_s: float = 30.0, n_requests: int = 32, max_batch_size: int = 16,
                  block_size: int = 16, prefix_len: int = 256, progress=print) -> dict:
    """All of chapter 9's measurements in one run, as a dict for JSON, labelled with the machine.

    The engine's request lengths (`fit_ranges`) and the shared prefix (whole blocks, at most
    `prefix_len`) are sized to the model's context; the prefix part is skipped, and says so, when
    not one block fits. Raises a ValueError before any work when `prompt_len + new_tokens` does
    not fit. Built in chapter 9."""
    c = model.config
    if prompt_len + new_tokens > c.max_seq_len:
        raise ValueError(f"prompt_len ({prompt_len}) + new_tokens ({new_tokens}) = {prompt_len + new_tokens} exceeds "
                         f"the model's max_seq_len={c.max_seq_len}")
    out = {
        "device": describe_device(model.device), "cpu": cpu_model_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "dtype": str(model.dtype).removeprefix("torch."), "model": c.to_dict(), "parameters": model.num_params(),
        "note": "wall-clock times; compare ratios within this run (load_average_1min: the machine's other work at the start)",
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    progress("-- throughput and KV memory against batch size")
    out["batch_sweep"] = batch_sweep(model, batch_sizes=batch_sizes, prompt_len=prompt_len, new_tokens=new_tokens,
                                     uncached_budget_s=uncached_budget_s, progress=progress)
    progress("-- the engine against one request at a time")
    prompt_range, new_range = fit_ranges(c.max_seq_len)
    out["engine"] = engine_vs_sequential(model, n_requests=n_requests, max_batch_size=max_batch_size,
                                         block_size=block_size, prompt_range=prompt_range, new_range=new_range,
                                         progress=progress)
    # The shared prompt, its requests' own 16 tokens and 4 new ones must fit in the model's context:
    # the prefix is cut to whole blocks that fit, and skipped when not even one block does.
    fitting = (c.max_seq_len - _PREFIX_SUFFIX - _PREFIX_NEW) // block_size * block_size
    prefix_len = min(prefix_len, fitting)
    if prefix_len >= block_size:
        progress(f"-- prefix sharing ({prefix_len}-token shared prompt)")
        out["prefix"] = prefix_sharing_bytes(model, n_requests=16, prefix_len=prefix_len, suffix_len=_PREFIX_SUFFIX,
                                             new_tokens=_PREFIX_NEW, block_size=block_size, progress=progress)
    else:
        reason = (f"skipped: the model's context of {c.max_seq_len} positions cannot hold a shared prompt of one "
                  f"{block_size}-token block + {_PREFIX_SUFFIX} tokens of each request + {_PREFIX_NEW} new ones")
        progress(f"-- prefix sharing {reason}")
        out["prefix"] = {"skipped": reason, "prefix_ratio": None}
    out["targets"] = {
        "engine_speedup": out["engine"]["paged"]["speedup"],
        "paged_reserved_over_used": out["engine"]["paged"]["reserved_over_used"],
        "static_reserved_over_used": out["engine"]["static"]["reserved_over_used"],
        "prefix_shared_over_unshared": out["prefix"]["prefix_ratio"],
    }
    return out


_PREFIX_SUFFIX, _PREFIX_NEW = 16, 4  # each request's own prompt tokens and new tokens after a shared prefix


def fit_ranges(max_seq_len: int, prompt_range=(16, 64), new_range=(16, 64)) -> tuple[tuple[int, int], tuple[int, int]]:
    """The engine workload's (prompt, new-token) length ranges, shrunk so the longest request fits a
    model of `max_seq_len` positions: unchanged when they fit, else each side gets half the context."""
    if prompt_range[1] + new_range[1] <= max_seq_len:
        return tuple(prompt_range), tuple(new_range)
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2 for a prompt and a new token, got {max_seq_len}")
    p_hi = min(prompt_range[1], max_seq_len // 2)
    n_hi = min(new_range[1], max_seq_len - p_hi)
    return (min(prompt_range[0], p_hi), p_hi), (min(new_range[0], n_hi), n_hi)


def plot_serving(result: dict):
    """Four panels from a `serving_bench` result: throughput and KV memory against batch size
    (cached and uncached), engine against one at a time, reserved against used KV bytes.
    Returns the Figure. Built in chapter 9."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    ax_tput, ax_mem, ax_engine, ax_bytes = axes
    for use_cache, style in ((True, "o-"), (False, "s--")):
        rows = [r for r in result["batch_sweep"] if r["use_cache"] == use_cache]
        label = "cached" if use_cache else "uncached"
        ax_tput.plot([r["batch_size"] for r in rows], [r["throughput_tok_s"] for r in rows], style, label=label)
        if use_cache:
            ax_mem.plot([r["batch_size"] for r in rows], [r["kv_bytes"] / 2**20 for r in rows], style, label=label)
    for ax in (ax_tput, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.legend()
    ax_tput.set_ylabel("generated tokens / s")
    ax_tput.set_title("Throughput against batch size")
    ax_mem.set_ylabel("KV cache (MiB)")
    ax_mem.set_title("KV memory (uncached keeps none)")
    e = result["engine"]
    names = ["one at a time", "engine, static", "engine, paged"]
    values = [e["sequential"]["throughput_tok_s"], e["static"]["throughput_tok_s"], e["paged"]["throughput_tok_s"]]
    ax_engine.bar(names, values, color=["#999999", "#4c72b0", "#dd8452"])
    ax_engine.set_ylabel("generated tokens / s")
    ax_engine.set_title(f"{e['n_requests']} mixed requests, {e['max_batch_size']} at once")
    ax_engine.tick_params(axis="x", labelsize=8)
    p = result["prefix"]
    names = ["static\nreserved/used", "paged\nreserved/used", "prompt KV\nshared ÷ unshared"]
    values = [e["static"]["reserved_over_used"], e["paged"]["reserved_over_used"], p["prefix_ratio"]]
    if values[-1] is None:  # prefix sharing skipped: the model's context was too short
        names, values = names[:2], values[:2]
    ax_bytes.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868"][: len(values)])
    ax_bytes.axhline(1.0, color="black", lw=0.8)
    for i, v in enumerate(values):
        ax_bytes.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    ax_bytes.set_title("KV bytes: ratios")
    ax_bytes.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{result['device']}, {result['dtype']}, GPT shape d_model={result['model']['d_model']}, "
                 f"{result['model']['n_layers']} layers; {result['note']}", fontsize=9)
    fig.tight_layout()
    return fig
