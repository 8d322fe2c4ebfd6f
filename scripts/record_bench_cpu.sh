#!/usr/bin/env bash
# The recorded CPU benchmark behind chapter 5 (`notebooks/05_measuring.ipynb`).
# Run it on an otherwise idle machine: anything else running changes the numbers.
#   bash scripts/record_bench_cpu.sh [out_dir]    (about 30 minutes on 2 cores)
# Each record names the CPU it ran on; the chapter shows them as "on our machine".
set -euo pipefail
out=${1:-data/bench}
mkdir -p "$out"
bench() { python -m kvlab.bench --threads 2 "$@"; }
# kvlab vs Hugging Face generate with its default (dynamic) and its static cache, same weights,
# float32, batch 1 and 8, cached; the backends take turns, so a busy machine slows all alike.
bench --hf --cache on --batch-sizes 1,8 --repeats 3 --out "$out/cpu_fp32_vs_hf_caches.json"
# The float32 rows the bfloat16 record is compared with, on the same machine.
bench --hf --cache on --batch-sizes 1,8 --repeats 5 --out "$out/cpu_fp32_vs_hf.json"
bench --cache on --batch-sizes 1,8 --repeats 5 --out "$out/cpu_fp32_plain.json"
# The opt-in faster path: the whole model in bfloat16 (Hugging Face too, for a like-for-like row).
bench --hf --cache on --batch-sizes 1,8 --dtype bfloat16 --repeats 5 --out "$out/cpu_bf16_vs_hf.json"
# Cached and uncached, both libraries, batch 1: what the cache buys at 128 new tokens.
bench --hf --cache both --batch-sizes 1 --repeats 3 --out "$out/cpu_cache_vs_none.json"
# Time to first token as the prompt grows.
bench --cache on --prompt-lens 32,128,256,512 --new-tokens 32 --repeats 3 --out "$out/cpu_prompt_sweep.json"
# A 1024-token decode: the per-token trace with the cache, and the naive loop once (about 6 minutes).
bench --cache on --new-tokens 1024 --max-seq-len 1056 --repeats 3 --out "$out/cpu_long_cached.json"
bench --cache off --new-tokens 1024 --max-seq-len 1056 --repeats 1 --warmup 0 --out "$out/cpu_long_uncached.json"
