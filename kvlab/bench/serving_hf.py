"""The serving engine against what a user would pick instead, on one workload and the same weights.

Shape legend: R requests, T a prompt's length, N new tokens per request.

Four ways to serve the same R requests (seeded prompt lengths, N new tokens each, greedy):
one request at a time (`kvlab.generate`), kvlab's engine (`kvlab.serving.Engine`, continuous
batching over paged KV memory) at each `max_batch_size`, Hugging Face transformers' own
continuous batching (`model.generate_batch`, a paged cache and packed batches), and kvlab's
static ragged batch (`kvlab.serving.generate_batch`, every request in one padded batch, the
fastest case when all requests arrive together). They run in turns, `rounds` times, so a machine
that slows down slows all of them alike; each ratio is taken within a round and the median
over rounds reported. Every way must give the same tokens as one at a time.

Built for chapter 9's claim that the engine is made of the parts the learner builds and still
serves faster than the library a user would otherwise pick.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from ..cpu_kernels import fast_cpu_inference
from ..device import cpu_model_name, describe_device, synchronize
from ..generation import generate
from ..gpt import GPT
from ..serving import Engine, generate_batch, mixed_workload
from .serving import prefix_sharing_bytes, run_workload

__all__ = ["hf_generate_batch", "serving_vs_hf"]


def hf_generate_batch(hf_model, prompts: list[list[int]], new_tokens: int,
                      max_batch_size: int | None) -> list[list[int]]:
    """Greedy continuation of every prompt by transformers' continuous batching, in prompt order:
    each result is prompt + `new_tokens` tokens (end-of-text is not a stop: every request runs to
    its length, as in the other ways). With `max_batch_size`, at most that many requests run at
    once and its paged cache is sized to the workload; with None, it runs as
    `model.generate_batch(inputs, generation_config)` is called, with its own defaults (which
    size the cache from the device's free memory: on a CPU, gigabytes set up in every call)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    page = 256  # transformers' default page size, in tokens
    per_request = -(-(max(len(p) for p in prompts) + new_tokens) // page)
    batching = None if max_batch_size is None else ContinuousBatchingConfig(page_size=page, num_blocks=2 * len(prompts) * per_request,
                                        max_batch_tokens=sum(len(p) for p in prompts) + len(prompts),
                                        max_requests_per_batch=max_batch_size)
    outputs = hf_model.generate_batch([list(p) for p in prompts], generation_config=config,
                                      continuous_batching_config=batching)
    by_prompt: dict[tuple, list[list[int]]] = {}
    for out in outputs.values():
        if out.error:
            raise RuntimeError(f"transformers' generate_batch failed on request {out.request_id}: {out.error}")
        by_prompt.setdefault(tuple(out.prompt_ids), []).append(list(out.generated_tokens))
    return [list(p) + by_prompt[tuple(p)].pop() for p in prompts]


def _engine(model: GPT, workload, max_batch_size: int, block_size: int, max_seq_len: int) -> tuple[list, dict]:
    engine = Engine(model, max_batch_size=max_batch_size, block_size=block_size, max_seq_len=max_seq_len)
    run = run_workload(engine, workload)
    results = run.pop("results")
    return [results[i].tolist() for i in range(len(workload))], run


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.inference_mode()
def serving_vs_hf(model: GPT, hf_model, *, n_requests: int = 32, prompt_range=(16, 64), new_tokens: int = 32,
                  batch_sizes=(16, 32), block_size: int = 16, rounds: int = 3, prefix_len: int = 256,
                  prefix_requests: int = 16, hf_defaults: bool = True, seed: int = 0, progress=print) -> dict:
    """Tokens/s of the four ways above (median over `rounds` turns), their ratios, token equality,
    the engine's reserved ÷ used KV bytes, and a shared `prefix_len`-token prompt hit by
    `prefix_requests` requests (its bytes and their mean time to first token, shared against
    not). `hf_model` holds `model`'s weights (e.g. via `kvlab.to_hf_gpt2_state_dict`).
    `hf_defaults=False` leaves out transformers with its own defaults (slow to set up on a small
    model: its cache is sized by memory, not by the model)."""
    workload = mixed_workload(n_requests, seed=seed, prompt_range=prompt_range, new_range=(new_tokens, new_tokens),
                              vocab_size=model.config.vocab_size)
    prompts = [p for p, _ in workload]
    longest = max(len(p) for p in prompts) + new_tokens
    new = n_requests * new_tokens
    device = model.device

    def one_at_a_time():
        fast_cpu_inference(model, 1)  # each way runs with the CPU kernel choice made for its own batch size
        return [generate(model, torch.tensor([p], device=device), new_tokens, temperature=0)[0].tolist()
                for p in prompts]

    def static_batch():
        fast_cpu_inference(model, n_requests)
        return [r.tolist() for r in generate_batch(model, prompts, new_tokens, temperature=0)]

    ways = {"one_at_a_time": one_at_a_time}
    for mb in batch_sizes:
        ways[f"engine_{mb}"] = lambda mb=mb: _engine(model, workload, mb, block_size, longest)
        ways[f"hf_generate_batch_{mb}"] = lambda mb=mb: hf_generate_batch(hf_model, prompts, new_tokens, mb)
    if hf_defaults:
        ways["hf_generate_batch_default"] = lambda: hf_generate_batch(hf_model, prompts, new_tokens, None)
    ways["static_batch"] = static_batch

    progress("warm-up: every way once on two short requests, and the CPU kernel choice of each batch size")
    for size in (1, n_requests, *batch_sizes):
        fast_cpu_inference(model, size)  # measured once per machine and batch size, then read from a file
    _engine(model, workload[:2], max(batch_sizes), block_size, longest)
    hf_generate_batch(hf_model, prompts[:2], 2, 2)
    generate_batch(model, prompts[:2], 2, temperature=0)
    generate(model, torch.tensor([prompts[0]], device=device), 2, temperature=0)

    times: dict[str, list[float]] = {name: [] for name in ways}
    results: dict[str, list] = {}
    engine_runs: dict[str, dict] = {}
    for r in range(rounds):
        for name, fn in ways.items():
            synchronize(device)
            out, seconds = _timed(fn)
            synchronize(device)
            if name.startswith("engine_"):
                out, engine_runs[name] = out
            times[name].append(seconds)
            results.setdefault(name, out)
            progress(f"round {r + 1}/{rounds}  {name:18s} {new / seconds:8.1f} tok/s  ({seconds:.2f} s)")

    reference = results["one_at_a_time"]
    out = {
        "device": describe_device(device), "cpu": cpu_model_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "dtype": str(model.dtype).removeprefix("torch."), "model": model.config.to_dict(),
        "parameters": model.num_params(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "workload": dict(n_requests=n_requests, prompt_range=list(prompt_range), new_tokens=new_tokens, seed=seed,
                         block_size=block_size, greedy=True),
        "rounds": rounds,
        "note": "wall-clock times, the ways taken in turns; ratios are taken within a round (median over rounds)",
        "ways": {name: dict(seconds=ts, throughput_tok_s=statistics.median(new / t for t in ts),
                            tokens_equal_one_at_a_time=sum(a == b for a, b in zip(results[name], reference)) / n_requests)
                 for name, ts in times.items()},
        "engine_runs": engine_runs,
    }

    def ratio(a: str, b: str) -> float:  # speed of a over speed of b, round by round
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

    small, large = min(batch_sizes), max(batch_sizes)
    progress(f"-- a shared {prefix_len}-token prompt hit by {prefix_requests} requests")
    out["prefix"] = prefix_sharing_bytes(model, n_requests=prefix_requests, prefix_len=prefix_len,
                                         block_size=block_size, seed=seed, progress=progress)
    out["targets"] = {
        **{f"engine_{mb}_over_hf_generate_batch_{mb}": ratio(f"engine_{mb}", f"hf_generate_batch_{mb}")
           for mb in batch_sizes},
        **({f"engine_{small}_over_hf_generate_batch_default": ratio(f"engine_{small}", "hf_generate_batch_default")}
           if hf_defaults else {}),
        f"engine_{small}_over_one_at_a_time": ratio(f"engine_{small}", "one_at_a_time"),
        f"engine_{large}_over_static_batch": ratio(f"engine_{large}", "static_batch"),
        f"engine_{small}_reserved_over_used": engine_runs[f"engine_{small}"]["reserved_over_used"],
        "prefix_shared_over_unshared_bytes": out["prefix"]["prefix_ratio"],
        "prefix_unshared_over_shared_mean_ttft": out["prefix"]["ttft_ratio"],
        "all_tokens_equal": all(w["tokens_equal_one_at_a_time"] == 1.0 for w in out["ways"].values())
        and out["prefix"]["tokens_equal"],
    }
    return out
