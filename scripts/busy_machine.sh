#!/usr/bin/env bash
# The chapters that time things, run as `make test` runs notebooks, while a CPU hog holds one core.
#
#   bash scripts/busy_machine.sh [RUNS]            nbval on the timing chapters, RUNS times (default 3)
#   bash scripts/busy_machine.sh --full [RUNS]     a fresh clone of HEAD, then `make test` and
#                                                  `make book` in it, RUNS times each
#
# A reader's laptop is rarely idle: a browser or a build holds a core while the notebooks run.
# A chapter whose asserts or checks depend on timing luck fails there, so every timing statement
# must either be printed (not asserted) or rest on a margin that load cannot close. This script
# is that situation on purpose: `python3 -c "while True: pass"` holds one core for the whole run,
# and nbval runs two notebooks side by side with one math thread each (as `make test` does).
# It prints one line per run (pass/fail, seconds) and exits non-zero if any run failed.
#
# Needs .venv (`make setup`); --full needs git and network access to the package registries for
# the clone's own `make setup`. Timing chapters: those whose cells read a clock.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

full=0
if [[ ${1:-} == "--full" ]]; then full=1; shift; fi
runs=${1:-3}
if ! [[ $runs =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash scripts/busy_machine.sh [--full] [RUNS]   (RUNS: a positive integer, got '$runs')" >&2
    exit 2
fi

# As in CI (.ci/run): the local Tiny Shakespeare when there is one, and no model hub.
shakespeare="$repo/../shared/data/tinyshakespeare/input.txt"
if [[ -f $shakespeare && -z ${KVLAB_SHAKESPEARE:-} ]]; then
    KVLAB_SHAKESPEARE="$(cd "$(dirname "$shakespeare")" && pwd)/input.txt"
    export KVLAB_SHAKESPEARE
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python3 -c "while True: pass" &
hog=$!
trap 'kill $hog 2> /dev/null || true' EXIT
echo "CPU hog running (pid $hog) on one of $(nproc) cores"

declare -a results=()
failed=0
record() {  # record LABEL COMMAND...: run it, time it, keep one summary line
    local label=$1; shift
    local start=$SECONDS rc=0
    "$@" > "$log_dir/$label.log" 2>&1 || rc=$?
    local verdict="passed"
    ((rc == 0)) || { verdict="FAILED (exit $rc, log: $log_dir/$label.log)"; failed=1; }
    results+=("$(printf '%-14s %5ds  %s' "$label" $((SECONDS - start)) "$verdict")")
    echo "${results[-1]}"
}
log_dir=$(mktemp -d /tmp/busy-machine.XXXX)

if ((full)); then
    clone=$(mktemp -d /tmp/busy-clone.XXXX)
    git clone -q "$repo" "$clone"
    echo "fresh clone of $(git -C "$clone" rev-parse --short HEAD) in $clone"
    record setup make -C "$clone" setup
    for ((i = 1; i <= runs; i++)); do
        record "test-$i" make -C "$clone" test
        record "book-$i" make -C "$clone" book
    done
else
    # Every chapter that reads a clock, two at a time as `make test` runs them.
    mapfile -t timed < <(grep -l -E "perf_counter|time_generation|speedup_table|best_time" notebooks/*.ipynb)
    echo "timing chapters: ${timed[*]}"
    for ((i = 1; i <= runs; i++)); do
        record "nbval-$i" make --no-print-directory test-notebooks NB_PATHS="${timed[*]}"
    done
fi

echo
echo "=== busy machine: $runs run(s), one core held by a CPU hog, on $(nproc) cores ==="
printf '%s\n' "${results[@]}"
exit "$failed"
