"""Measuring: every timing, table and quality measurement of the course, and its command line.

The measurement wing of kvlab: nothing in the library below imports it, so a reader of the model
and the generation loop never meets a timer. Its modules:

    timing         TTFT, TPOT, throughput and memory of one generation; sweeps; kvlab vs Hugging
                   Face; precision cost, cache memory, read bandwidth (chapter 5)
    cache_speedup  the speed-up table: generation with and without the cache, by number of new tokens (chapter 5)
    serving        the serving engine against one request at a time, batch sweeps (chapter 9)
    chapter10      speculative decoding, the int8 cache and beam search, measured (chapter 10)
    serving_hf     the serving engine against transformers' generate_batch (chapter 9)
    frontier       loss against cache bytes per token for every way of shrinking the cache, the
                   sink share, eviction past the training length (chapter 11)
    cli            `python -m kvlab.bench` (a sweep, --speedup-table, --serving, --beyond, --frontier); a
                   command line, so imported only by `python -m kvlab.bench` (`kvlab.bench.cli.main`)

    python -m kvlab.bench --help
"""

from .chapter10 import BEYOND_PROMPTS, beyond, cache_quality, speculative_speedup, toy_beam_accuracy
from .serving import (batch_sweep, engine_vs_sequential, fit_ranges, plot_serving, prefix_sharing_bytes, run_workload,
                      serving_bench)
from .cache_speedup import DEFAULT_LENGTHS, speedup_markdown, speedup_table
from .timing import (GenerationTiming, cache_memory, decode_weight_bytes, load_recorded, precision_cost, read_bandwidth,
                     summarize, sweep, time_generation, time_hf_generation)

__all__ = [
    "GenerationTiming", "time_generation", "time_hf_generation", "summarize", "sweep", "precision_cost",
    "cache_memory", "read_bandwidth", "decode_weight_bytes", "load_recorded",
    "DEFAULT_LENGTHS", "speedup_table", "speedup_markdown",
    "batch_sweep", "run_workload", "engine_vs_sequential", "prefix_sharing_bytes", "fit_ranges", "serving_bench",
    "plot_serving",
    "BEYOND_PROMPTS", "beyond", "cache_quality", "speculative_speedup", "toy_beam_accuracy",
]
