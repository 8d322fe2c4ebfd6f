"""Measuring generation: time to first token, time per output token, throughput, memory.

Shape legend: B batch size, T prompt length, N new tokens.

Definitions used everywhere in the course:
    TTFT   time to first token: the prefill (whole prompt, one forward) plus choosing token 1
    TPOT   time per output token: the median of the decode steps that follow
    throughput  B × N / total time, in generated tokens per second
Every time is taken between device synchronisations (`kvlab.synchronize`), after warm-up runs,
and repeated; medians are reported with the spread. The per-token trace (one latency per
generated token) is what shows the naive loop slowing down as the text grows while the cached
one stays flat. Built in chapter 5.

The command line is `kvlab.bench.cli` (`python -m kvlab.bench --help`).
"""

from __future__ import annotations

import contextlib
import functools
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import kv_cache_bytes
from ..cpu_kernels import measured_linears
from ..device import describe_device, synchronize
from ..generation import decode_loop, generate, prefill
from ..gpt import GPT
from ..sampling import SamplingConfig

__all__ = ["GenerationTiming", "time_generation", "time_hf_generation", "summarize", "sweep", "precision_cost",
           "cache_memory", "read_bandwidth", "decode_weight_bytes", "load_recorded"]


@dataclass
class GenerationTiming:
    """One timed generation: the prefill and every decode step, in seconds."""

    backend: str  # "kvlab", "kvlab-compile", "hf" (its default cache) or "hf-static"
    use_cache: bool
    batch_size: int
    prompt_len: int
    new_tokens: int
    ttft: float  # prefill + first token
    step_times: list[float] = field(default_factory=list)  # one per token after the first
    total: float = 0.0
    peak_memory_bytes: int | None = None  # CUDA allocator peak, or the cache's tensor bytes elsewhere

    @property
    def tpot(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")

    @property
    def throughput(self) -> float:
        return self.batch_size * self.new_tokens / self.total


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device, fallback: int) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return fallback


@torch.inference_mode()
def time_generation(model: GPT, idx: torch.Tensor, new_tokens: int, *, use_cache: bool = True,
                    cache_kind: str = "static", compile: bool = False) -> tuple[GenerationTiming, torch.Tensor]:
    """Greedy-generate `new_tokens` after `idx` (B, T), timing the prefill and every step.

    The loop is `kvlab.generate`'s own (`kvlab.generation.decode_loop`: prefill → next_token →
    decode_step), with a device synchronisation after each token so each time is the step's real cost. Returns the timing
    and the tokens (B, T + N), which equal `kvlab.generate(..., temperature=0)`. With
    `compile=True` the decode steps are `kvlab.generate(..., compile=True)`'s compiled step
    (CUDA graphs on CUDA); warm up first, since the first call compiles. The model is timed as
    it is: on a CPU, make the linear-kernel choice first if you want it
    (`kvlab.cpu_kernels.fast_cpu_inference`; `sweep` makes it per batch size). Built in chapter 5.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    device = model.device
    B, T = idx.shape
    model.check_inputs(idx)
    if T + new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt {T} + new_tokens {new_tokens} exceeds max_seq_len={model.config.max_seq_len}")
    if compile and not use_cache:
        raise ValueError("compile=True needs use_cache=True")
    stamps: list[float] = []

    def clock(n: int, token) -> bool:  # each token's time: kvlab.generate's loop, synchronised per token
        synchronize(device)
        stamps.append(time.perf_counter())
        return False

    cache = None
    _reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    if use_cache:  # made inside the timed region, as Hugging Face's generate makes its own
        cache = model.new_cache(B, max_seq_len=T + new_tokens, kind=cache_kind) if cache_kind == "static" \
            else model.new_cache(B, kind=cache_kind)
    out = decode_loop(model, idx, new_tokens, cache, sampling=SamplingConfig(temperature=0), compile=compile,
                      on_token=clock)
    total = stamps[-1] - start
    ttft = stamps[0] - start
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    cache_bytes = cache.nbytes if cache is not None else 0
    timing = GenerationTiming("kvlab-compile" if compile else "kvlab", use_cache, B, T, new_tokens, ttft, steps,
                              total, _peak(device, cache_bytes))
    return timing, out


class _TokenClock:
    """A Hugging Face streamer that timestamps each generated token (its `put` is called per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def put(self, value) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def time_hf_generation(hf_model, idx: torch.Tensor, new_tokens: int, *, use_cache: bool = True,
                       cache_implementation: str | None = None) -> tuple[GenerationTiming, torch.Tensor]:
    """The same measurement for a Hugging Face model's `generate` (greedy, exactly `new_tokens`).

    A streamer timestamps each token; its first call receives the prompt, so the stamps after
    it mark token 1 (TTFT) and each decode step. `cache_implementation="static"` asks
    `generate` for its preallocated cache instead of its default concatenating one (the timing's
    backend is then "hf-static"). Built in chapter 5.
    """
    device = idx.device
    clock = _TokenClock(device)
    _reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    extra = {}
    if cache_implementation is not None and use_cache:
        # On a GPU, generate compiles the model by itself when its cache is static: keep it eager.
        extra = {"cache_implementation": cache_implementation, "disable_compile": True}
    out = hf_model.generate(idx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            use_cache=use_cache, pad_token_id=0, streamer=clock, **extra)
    synchronize(device)
    total = time.perf_counter() - start
    stamps = clock.stamps[1:]  # the first put() is the prompt
    ttft = stamps[0] - start
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    B, T = idx.shape
    cfg = hf_model.config
    est = kv_cache_bytes(cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, T + new_tokens, B,
                         next(hf_model.parameters()).dtype) if use_cache else 0
    backend = "hf-static" if extra else "hf"
    return GenerationTiming(backend, use_cache, B, T, new_tokens, ttft, steps, total, _peak(device, est)), out


def summarize(runs: list[GenerationTiming]) -> dict:
    """Median and spread (min, max) over repeats of TTFT, TPOT, throughput and total time."""
    def stats(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    first = runs[0]
    trace = [statistics.median(step) for step in zip(*(r.step_times for r in runs))]
    return {
        "backend": first.backend, "use_cache": first.use_cache, "batch_size": first.batch_size,
        "prompt_len": first.prompt_len, "new_tokens": first.new_tokens, "repeats": len(runs),
        "ttft_s": stats([r.ttft for r in runs]), "tpot_s": stats([r.tpot for r in runs]),
        "throughput_tok_s": stats([r.throughput for r in runs]), "total_s": stats([r.total for r in runs]),
        "peak_memory_bytes": max(r.peak_memory_bytes or 0 for r in runs),
        "step_trace_s": trace,  # median latency of each decode step across repeats
    }


@torch.inference_mode()
def precision_cost(model: GPT, idx: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> dict:
    """What running `model` in `dtype` instead of float32 costs, measured on token windows `idx` (B, T).

    Both copies read the same text (teacher forcing) and predict every next token. Returns the
    loss of each (nats per token), the mean KL divergence of the `dtype` model's distribution
    from the float32 one (nats), how often their top-1 predictions agree, and how many greedy
    tokens they generate identically from the first 8 tokens of each row. `model` itself is
    left as it was. Built in chapter 5.
    """
    import copy

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    model.check_inputs(idx)
    if idx.size(1) < 9:
        raise ValueError(f"idx must have at least 9 tokens per row (8 prompt + targets), got {idx.size(1)}")
    reference = copy.deepcopy(model).float().eval()
    low = copy.deepcopy(model).to(dtype).eval()
    x, y = idx[:, :-1], idx[:, 1:]
    logp_ref = torch.log_softmax(reference(x).float(), dim=-1)
    logp_low = torch.log_softmax(low(x).float(), dim=-1)
    loss_ref = -logp_ref.gather(-1, y[..., None]).mean().item()
    loss_low = -logp_low.gather(-1, y[..., None]).mean().item()
    kl = (logp_ref.exp() * (logp_ref - logp_low)).sum(-1).mean().item()
    agree = (logp_ref.argmax(-1) == logp_low.argmax(-1)).float().mean().item()
    n = min(64, reference.config.max_seq_len - 8)
    greedy_ref = generate(reference, idx[:, :8], n, temperature=0)[:, 8:]
    greedy_low = generate(low, idx[:, :8], n, temperature=0)[:, 8:]
    differs = (greedy_ref != greedy_low).int()
    first_diff = torch.where(differs.any(1), differs.argmax(1), torch.full_like(differs[:, 0], n))
    return {"dtype": str(dtype).removeprefix("torch."), "loss_float32": loss_ref, "loss": loss_low,
            "loss_increase": loss_low - loss_ref, "kl_nats": kl, "top1_agreement": agree,
            "greedy_tokens_identical": first_diff.tolist(), "greedy_tokens_generated": n}


def cache_memory(model: GPT, batch_size: int, tokens: int, kind: str = "static", window: int | None = None) -> int:
    """Measured bytes of a KV cache after a prefill of `tokens` random tokens for `batch_size` sequences.

    On CUDA: the allocator's growth from before the cache was made to after the prefill (its
    activations freed). Elsewhere (CPU, MPS): the bytes of every tensor the cache's layers
    hold, counted once per storage. Compare with `kv_cache_bytes`. Built in chapter 5.
    """
    if tokens < 1 or batch_size < 1:
        raise ValueError(f"tokens and batch_size must be >= 1, got tokens={tokens}, batch_size={batch_size}")
    device = model.device
    idx = torch.randint(0, model.config.vocab_size, (batch_size, tokens), generator=torch.Generator().manual_seed(0))
    synchronize(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    cache = model.new_cache(batch_size, max_seq_len=tokens) if kind == "static" else \
        model.new_cache(batch_size, kind=kind, window=window)
    with torch.inference_mode():
        logits = prefill(model, idx.to(device), cache)
    del logits
    synchronize(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device) - before)
    storages = {}
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def read_bandwidth(device: torch.device | str = "cpu", mib: int = 256, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the median time to sum a buffer far larger than the caches.

    A decode step reads every weight once, so this is the speed limit of decoding: a step cannot
    take less than its bytes divided by this. Built in chapter 5.
    """
    device = torch.device(device)
    buffer = torch.randn(mib * 2**18, device=device)  # mib MiB of float32
    buffer.sum()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        buffer.sum()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return buffer.nbytes / statistics.median(times)


def decode_weight_bytes(model: GPT) -> int:
    """Bytes of weights one decode step reads: every block, the final norm and the output layer, once.

    The embedding tables are left out (a step reads one row per sequence), except that a tied
    output layer *is* the token table. Built in chapter 5.
    """
    params = {id(p): p for p in (*model.blocks.parameters(), *model.norm_f.parameters(), *model.lm_head.parameters())}
    return sum(p.numel() * p.element_size() for p in params.values())


def load_recorded(name: str) -> dict:
    """A benchmark record the course committed in `data/bench` (e.g. "cpu_fp32_vs_hf"); see its README.

    From an installed kvlab (as on Colab) the file is downloaded once from the course
    repository and verified (`kvlab.data.repo_file`). Built in chapter 5.
    """
    from ..data import checkout_root, repo_file

    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a record's name such as 'cpu_fp32_vs_hf', got {name!r}")
    try:
        path = repo_file(f"data/bench/{name}.json")
    except FileNotFoundError:
        path = None
    if path is None or not path.is_file():
        root = checkout_root()
        known = sorted(p.stem for p in (root / "data" / "bench").glob("*.json")) if root is not None else []
        raise FileNotFoundError(f"no recorded benchmark {name!r} (the course has: {', '.join(known) or 'see data/bench'})")
    from ..files import read_json

    return read_json(path, "benchmark record")


def sweep(model: GPT, *, batch_sizes=(1,), prompt_lens=(32,), new_tokens=(128,), use_cache=(True, False),
          repeats: int = 3, warmup: int = 1, hf_model=None, hf_caches=("dynamic", "static"), compile: bool = False,
          seed: int = 0, cpu_kernels: bool = True, progress=print) -> dict:
    """Run every combination, `warmup` untimed runs first, `repeats` timed; results as a dict for JSON.

    With `hf_model` (the same weights, e.g. from `to_hf_gpt2_state_dict`), each cached setting
    also runs Hugging Face `generate` with each cache of `hf_caches` ("dynamic", its default,
    and "static", its preallocated one; both eager), an uncached one once, and the run checks
    that every backend produced the tokens kvlab did. `compile=True` adds kvlab's compiled
    decode step ("kvlab-compile"). Within a setting the backends take turns, one run each per
    round, so a machine that slows down during the sweep slows them all alike. With `cpu_kernels`
    (the default), kvlab's eager runs on a CPU use the linear kernel measured fastest for this
    model and batch size (`kvlab.cpu_kernels.measured_linears`); the model is unchanged afterwards.
    """
    def kvlab_run(idx, N, cached):
        with measured_linears(model, idx.size(0)) if cpu_kernels else contextlib.nullcontext():
            return time_generation(model, idx, N, use_cache=cached)

    device = model.device
    results = []
    for B in batch_sizes:
        for T in prompt_lens:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randint(0, model.config.vocab_size, (B, T), generator=g).to(device)
            for N in new_tokens:
                for cached in use_cache:
                    backends = [("kvlab", functools.partial(kvlab_run, idx, N, cached))]
                    if compile and cached:
                        backends.append(("kvlab-compile", lambda: time_generation(model, idx, N, compile=True)))
                    if hf_model is not None:
                        for impl in (hf_caches if cached else ("dynamic",)):
                            backends.append(("hf" if impl == "dynamic" else f"hf-{impl}", functools.partial(
                                time_hf_generation, hf_model, idx, N, use_cache=cached,
                                cache_implementation=None if impl == "dynamic" else impl)))
                    tokens, runs = {}, {name: [] for name, _ in backends}
                    for name, run in backends:
                        for _ in range(warmup):
                            run()
                    for _ in range(repeats):  # round-robin: one timed run of each backend per round
                        for name, run in backends:
                            timing, tokens[name] = run()
                            runs[name].append(timing)
                    for name, _ in backends:
                        summary = summarize(runs[name])
                        results.append(summary)
                        progress(f"{name:13s} cache={cached!s:5s} B={B:<3d} T={T:<5d} N={N:<5d} "
                                 f"TTFT {summary['ttft_s']['median'] * 1e3:8.1f} ms  "
                                 f"TPOT {summary['tpot_s']['median'] * 1e3:7.2f} ms  "
                                 f"{summary['throughput_tok_s']['median']:8.1f} tok/s")
                        if name == "kvlab":
                            continue
                        same = (tokens[name].cpu() == tokens["kvlab"].cpu())[:, T:].float().mean().item()
                        summary["tokens_equal_to_kvlab"] = same
                        # In float32 the two must agree exactly; in 16-bit formats they round
                        # differently, and a near-tie can flip a greedy choice, so that is recorded.
                        if model.dtype == torch.float32 and same != 1.0 and model.device.type == "cpu":
                            raise AssertionError(f"{name} and kvlab generated different tokens at B={B}, T={T}")
    c = model.config
    return {
        "device": describe_device(device), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "model": c.to_dict(), "parameters": model.num_params(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "results": results,
    }
