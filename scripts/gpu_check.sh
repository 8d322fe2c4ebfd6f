#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on a machine with a CUDA GPU, run the unit tests, record the
# CUDA benchmarks behind chapter 5, and run every notebook with `device` = the GPU.
#
#   bash scripts/gpu_check.sh OUT_DIR          about 5-8 minutes on one GPU
#   bash scripts/gpu_check.sh --tiny OUT_DIR   a minute-long rehearsal of this script on any machine
#                                              (CPU allowed; tiny model; a few unit tests)
#
# Runs with $PYTHON (default python3), which needs torch, transformers and pytest (pytest-xdist
# is used if present), and with PYTHONPATH set to this repository, so no install is needed. The
# notebooks run under nbval when nbval and ipykernel are importable; otherwise each notebook's
# code cells run in order in one plain Python process (no Jupyter needed; IPython display calls
# become no-ops), which checks the same thing minus output comparison. No internet is needed
# if Tiny Shakespeare is found (data/shakespeare, or KVLAB_SHAKESPEARE=/path/to/input.txt).
#
# Writes into OUT_DIR: env.txt, unit_tests.log, bench/cuda_*.json (+ bench_*.log),
# notebooks.log, summary.txt. Copy the records into the course with
#   cp OUT_DIR/bench/cuda_*.json data/bench/
# Exit status: 0 when every step passed.
set -uo pipefail

tiny=0
if [ "${1:-}" = "--tiny" ]; then tiny=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: bash scripts/gpu_check.sh [--tiny] OUT_DIR" >&2; exit 2; fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1/bench" || exit 2
out=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${KVLAB_SHAKESPEARE:-}" ] && [ -f "$root/../shared/data/tinyshakespeare/input.txt" ]; then
  export KVLAB_SHAKESPEARE="$root/../shared/data/tinyshakespeare/input.txt"
fi
cd "$root" || exit 2
summary="$out/summary.txt"
: > "$summary"
status=0
note() { echo "$*" | tee -a "$summary"; }
step() {  # step NAME LOG COMMAND...: run, log, record pass/fail with the time taken
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  echo "== $name ($(date -u +%H:%M:%S)): $*"
  if "$@" > "$log" 2>&1; then note "PASS  $name ($((SECONDS - t0)) s)"; else
    note "FAIL  $name ($((SECONDS - t0)) s): see $log"; tail -n 30 "$log"; status=1; fi
}

# -- 0. where this runs ----------------------------------------------------------------------
"$PY" - > "$out/env.txt" 2>&1 <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for name in ("transformers", "pytest", "xdist", "nbval", "ipykernel", "IPython", "ipywidgets", "tiktoken", "tokenizers"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "present"))
    except ImportError:
        print(name, "missing")
EOF
cat "$out/env.txt"
has() { grep -q "^$1 " "$out/env.txt" && ! grep -q "^$1 missing" "$out/env.txt"; }
if [ $tiny -eq 0 ] && ! grep -q "available True" "$out/env.txt"; then
  note "FAIL  no CUDA GPU visible to $PY (use --tiny for a rehearsal on a CPU)"; exit 1
fi
device=cuda; [ $tiny -eq 1 ] && device=$("$PY" -c "import kvlab; print(kvlab.pick_device().type)")

# -- 1. the CUDA benchmark records (chapter 5): first, since only a GPU can give them ----------
# GPT-2's 124M shape, float32, greedy, 32-token prompt, 128 new tokens: kvlab eager, kvlab with
# compile=True (CUDA graphs), Hugging Face generate eager with its default and its static cache.
# Each step has a time limit (seconds), so one slow step cannot take the others' time.
bench() { local name=$1 limit=$2; shift 2; step "bench $name" "$out/bench_$name.log" timeout "$limit" "$PY" -m kvlab.bench --device "$device" "$@" --out "$out/bench/$name.json"; }
if [ $tiny -eq 1 ]; then
  bench tiny_vs_hf 300 --model tiny --hf --compile --cache on --batch-sizes 1,2 --new-tokens 8 --repeats 1 --warmup 1
else
  bench cuda_fp32_vs_hf 170 --hf --compile --cache on --batch-sizes 1,8 --repeats 3 --warmup 1
  # A tiny model's cache saves nothing on a GPU (launch-bound); the GPT-2 shape's, at 1024 tokens, does.
  bench cuda_tiny_cache_vs_none 40 --model tiny --max-seq-len 512 --new-tokens 256 --cache both --repeats 3
  bench cuda_long 60 --new-tokens 1024 --max-seq-len 1056 --cache both --repeats 1 --warmup 1
  "$PY" - "$out/bench/cuda_fp32_vs_hf.json" <<'EOF' | tee -a "$summary"
import json, sys
record = json.load(open(sys.argv[1]))
tput = {(r["backend"], r["batch_size"]): r["throughput_tok_s"]["median"] for r in record["results"]}
print(f"      {record['gpu']}: tokens/s")
for B in sorted({b for _, b in tput}):
    row = {name: tput.get((name, B)) for name in ("kvlab", "kvlab-compile", "hf", "hf-static")}
    print(f"      B={B}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items() if v)
          + f"; kvlab-compile / hf = {row['kvlab-compile'] / row['hf']:.2f}x (target >= 3 at B=1)")
EOF
fi

# -- 2. unit tests -----------------------------------------------------------------------------
# Not here: the Colab install test (it needs the package index) and the top-to-bottom chapter runs
# (step 3 runs every notebook).
jobs=()
if has xdist && [ $tiny -eq 0 ]; then jobs=(-n 8); fi
if [ $tiny -eq 1 ]; then
  step "unit tests (tiny: compile and bench only)" "$out/unit_tests.log" \
    env MPLBACKEND=Agg "$PY" -m pytest -x -q -p no:cacheprovider tests/test_compiled.py tests/test_bench.py
else
  step "unit tests" "$out/unit_tests.log" \
    timeout 120 env MPLBACKEND=Agg OMP_NUM_THREADS=2 "$PY" -m pytest -q -p no:cacheprovider "${jobs[@]}" tests --ignore=tests/browser \
      -k "not colab_install and not top_to_bottom"
fi

# -- 3. every notebook, device = the GPU -------------------------------------------------------
notebooks=(notebooks/*.ipynb)
[ $tiny -eq 1 ] && notebooks=(notebooks/03_gpt_decoder.ipynb)
if has nbval && has ipykernel; then
  nbjobs=()
  if has xdist && [ $tiny -eq 0 ]; then nbjobs=(-n 8 --dist loadfile); fi
  step "notebooks (nbval)" "$out/notebooks.log" timeout 170 env OMP_NUM_THREADS=2 "$PY" -m pytest -q -p no:cacheprovider \
    --nbval-lax --nbval-current-env --nbval-cell-timeout=300 "${nbjobs[@]}" "${notebooks[@]}"
else
  note "NOTE  nbval/ipykernel not importable by $PY: running the notebooks' code cells in plain Python instead"
  step "notebooks (plain Python, no nbval)" "$out/notebooks.log" \
    env NOTEBOOK_JOBS=$([ $tiny -eq 1 ] && echo 1 || echo 4) OMP_NUM_THREADS=2 \
    "$PY" "$root/scripts/run_notebook_cells.py" "${notebooks[@]}"
fi

echo; echo "== summary (also in $summary)"; cat "$summary"
[ $tiny -eq 0 ] && echo "records: cp $out/bench/cuda_*.json $root/data/bench/"
exit $status
