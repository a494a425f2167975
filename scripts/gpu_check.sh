#!/usr/bin/env bash
# One short run on a CUDA GPU that records the GPU figures (issue 15, item 5), in under 8 minutes
# on an H100, installing and downloading nothing:
#   - the toy "demo" corpus and its LMDBs (scripts/make_toy_corpus.py, scripts/build_toy_dbs.sh);
#   - the sub-benchmarks of `scripts/benchmark.py all`, one step each so that one failure or
#     timeout loses only its own figures: model step time, achieved TFLOP/s, MFU and peak memory
#     (bf16 and fp16 autocast, SDPA and math attention), full-corpus TVR ranking at
#     1k x 1k (vectorised vs reference, identical output checked) and 10k x 10k (vectorised),
#     the pre-training loop, TVC decoding and QA/VIOLIN evaluation, data loading, extraction;
#   - every entry script for 2 updates with --fp16 and with --bf16 (scripts/smoke_entry.py);
#   - $OUT/benchmarks_cuda.md: the figures with the device named, also put into
#     docs/benchmarks.md between the gpu_check markers (a copy lands in $OUT).
# Steps run most-wanted first, each under `timeout`; all of them share one time budget
# (GPU_CHECK_BUDGET, default 420 s), and a step that would not fit is skipped and listed.
#
# Usage: bash scripts/gpu_check.sh [--dry-run]
#   --dry-run   list the steps (time limit, command) and exit; runs nothing, needs no GPU.
#   OUT=DIR     output folder (default ./gpu_check_output); PYTHON=... the interpreter
#               (default .venv/bin/python when present, else python3).
# Exit codes: 0 all steps passed, 1 some step failed or was skipped, 2 no CUDA device.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=$(realpath -m "${OUT:-$ROOT/gpu_check_output}")
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BUDGET=${GPU_CHECK_BUDGET:-420}
REPORT_RESERVE=20  # seconds kept for the report at the end
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

DATA=$OUT/data
BENCH=$OUT/bench
LOGS=$OUT/logs
START=$(date +%s)
STATUS=()

# step NAME SECONDS STDOUT CMD...: run CMD under `timeout` (SECONDS, or what is left of the
# budget), stdout to STDOUT ("-": the step's log), stderr to $LOGS/NAME.log; record the outcome.
step() {
    local name=$1 limit=$2 stdout=$3 left rc=0 t0
    shift 3
    if [ "$DRY" = 1 ]; then
        printf '%-12s %4ss  ' "$name" "$limit"
        printf '%q ' "$@"
        printf '\n'
        return 0
    fi
    left=$((START + BUDGET - REPORT_RESERVE - $(date +%s)))
    if [ "$left" -lt 15 ]; then
        echo "==> $name: skipped, the ${BUDGET}s budget is spent"
        STATUS+=("$name|skipped (budget)|0")
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "==> $name (at most ${limit}s)"
    [ "$stdout" = - ] && stdout=$LOGS/$name.log
    t0=$(date +%s)
    timeout --kill-after 10 "$limit" "$@" >"$stdout" 2>>"$LOGS/$name.log" || rc=$?
    local secs=$(($(date +%s) - t0)) outcome=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        outcome="timed out after ${limit}s"
    elif [ "$rc" != 0 ]; then
        outcome="failed (exit $rc)"
    fi
    [ "$outcome" = ok ] || tail -n 15 "$LOGS/$name.log" | sed 's/^/    /'
    echo "    $outcome in ${secs}s"
    STATUS+=("$name|$outcome|$secs")
}

# preflight: this interpreter sees a CUDA device and has the project's packages; else exit 2.
preflight() {
    "$PYTHON" - <<'EOF'
import importlib.util
import sys

missing = [m for m in ("torch", "lmdb", "msgpack", "numpy", "transformers", "tqdm")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: {sys.executable} lacks {', '.join(missing)}; nothing is installed "
             "here: point PYTHON at an environment with requirements.txt and CUDA torch")
import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check.sh: no CUDA device visible to torch {torch.__version__} "
             f"(CUDA build: {torch.version.cuda}) in {sys.executable}. This script measures GPU "
             "figures: run it on a machine with a CUDA GPU (PYTHON=... picks the interpreter), "
             "or pass --dry-run to list its steps.")
print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}, "
      f"CUDA {torch.version.cuda})")
EOF
}

if [ "$DRY" = 0 ]; then
    preflight || exit 2
    rm -rf "$DATA" "$BENCH" "$LOGS" "$OUT/smoke"  # this script's own output of an earlier run
    mkdir -p "$DATA" "$BENCH" "$LOGS"
else
    echo "gpu_check.sh --dry-run: steps in order (time limit, command); OUT=$OUT"
fi

B=(scripts/benchmark.py)
C=(--corpus "$DATA/dbs")
step corpus 45 - "$PYTHON" scripts/make_toy_corpus.py --out "$DATA/raw" --size demo
step dbs 60 - env PYTHON="$PYTHON" bash scripts/build_toy_dbs.sh "$DATA/raw" "$DATA/dbs"
step model_bf16 90 "$BENCH/model_bf16.jsonl" "$PYTHON" "${B[@]}" model --model_precision bf16
step model_fp16 75 "$BENCH/model_fp16.jsonl" "$PYTHON" "${B[@]}" model --model_precision fp16
step vcmr_1k 90 "$BENCH/vcmr_1k.jsonl" "$PYTHON" "${B[@]}" vcmr --vcmr_videos 1000 \
    --vcmr_queries 1000
step vcmr_10k 120 "$BENCH/vcmr_10k.jsonl" "$PYTHON" "${B[@]}" vcmr --vcmr_videos 10000 \
    --vcmr_queries 10000 --vcmr_q_batch 100 --vcmr_impls fast
for precision in fp16 bf16; do
    step "smoke_$precision" 150 - "$PYTHON" scripts/smoke_entry.py --dbs "$DATA/dbs" \
        --out "$OUT/smoke" --precision "$precision" --tag "$precision" --jobs 4 --no_java \
        --timeout 120 --markdown "$OUT/smoke_$precision.md"
done
step train 75 "$BENCH/train.jsonl" "$PYTHON" "${B[@]}" train "${C[@]}" --train_steps 7 \
    --train_rounds 3 --train_warmup 2
step tvc 75 "$BENCH/tvc.jsonl" "$PYTHON" "${B[@]}" tvc "${C[@]}" --toker "$DATA/raw/tokenizer" \
    --tvc_max_batches 5
step data 60 "$BENCH/data.jsonl" "$PYTHON" "${B[@]}" data "${C[@]}" --workers 0 4 \
    --num_batches 20
step virtual 60 "$BENCH/virtual.jsonl" "$PYTHON" "${B[@]}" virtual "${C[@]}" \
    --virtual_task vsm --virtual_n 2
step search 60 "$BENCH/search.jsonl" "$PYTHON" "${B[@]}" search --search_videos 1000
step extract 75 "$BENCH/extract.jsonl" "$PYTHON" "${B[@]}" extract --extract_devices cuda \
    --extract_videos 1 --extract_seconds 4 --extract_workers 0
[ "$DRY" = 1 ] && { echo "report        20s  writes $OUT/benchmarks_cuda.md and docs/benchmarks.md"; exit 0; }

# report: the figures (benchmark.py's own table), the entry-script runs and the step outcomes.
printf '%s\n' "${STATUS[@]}" >"$OUT/steps.txt"
timeout 60 "$PYTHON" - "$OUT" <<'EOF'
import json
import re
import sys
import time
from pathlib import Path

import torch

from scripts.benchmark import benchmarks_markdown, device_name

out = Path(sys.argv[1])
results = [json.loads(line) for f in sorted((out / "bench").glob("*.jsonl"))
           for line in f.read_text().splitlines() if line.startswith("{")]
device = device_name()
if torch.cuda.is_available():
    device += f" ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
steps = [line.split("|") for line in (out / "steps.txt").read_text().splitlines() if line]
table = [line for line in benchmarks_markdown(results, "").splitlines() if line.startswith("|")]
lines = [f"## CUDA: {device}, {time.strftime('%Y-%m-%d')}", "",
         f"Measured by `bash scripts/gpu_check.sh` (torch {torch.__version__}, CUDA "
         f"{torch.version.cuda}).", "", "| step | outcome | seconds |", "|---|---|---:|",
         *(f"| {n} | {o} | {s} |" for n, o, s in steps), "", *table, ""]
for precision in ("fp16", "bf16"):
    smoke = out / f"smoke_{precision}.md"
    if smoke.is_file():
        lines += [f"Every entry script, 2 updates on the toy demo corpus, `--{precision}`:", "",
                  smoke.read_text().strip(), ""]
section = "\n".join(lines)
(out / "benchmarks_cuda.md").write_text(section)
docs = Path("docs/benchmarks.md")
text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
block = f"<!-- gpu_check:start -->\n{section}<!-- gpu_check:end -->\n"
pattern = re.compile(r"<!-- gpu_check:start -->.*?<!-- gpu_check:end -->\n?", re.S)
if pattern.search(text):
    text = pattern.sub(lambda m: block, text)
else:
    text = f"{text.rstrip()}\n\n{block}"
docs.write_text(text)
(out / "docs_benchmarks.md").write_text(text)
print(f"wrote {out / 'benchmarks_cuda.md'} and {docs} ({len(results)} figures)")
EOF
report_rc=$?
total=$(($(date +%s) - START))
echo "gpu_check.sh: ${total}s in all; steps:"
printf '    %s\n' "${STATUS[@]}"
if [ "$report_rc" != 0 ] || printf '%s\n' "${STATUS[@]}" | grep -qv '|ok|'; then
    exit 1
fi
