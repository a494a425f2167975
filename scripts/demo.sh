#!/usr/bin/env bash
# The whole HERO pipeline on the synthetic toy TV corpus, on CPU (what `make demo` runs):
#   raw corpus -> tokenizer -> preprocessing scripts -> text/video LMDBs -> pre-training
#   (mlm, mfm-nce, fom, vsm) -> fine-tuning + evaluation of TVR, TVQA, VIOLIN, TVC, DiDeMo and
#   MSR-VTT, each from the pre-trained checkpoint and from scratch -> demo_output/report.md.
# A finished step leaves a marker in $OUT/.steps/ and is reused by the next run (it says so);
# an unfinished one is rebuilt from a clean folder. A failing step stops the demo, named.
# Budgets (env): DEMO_PRETRAIN_STEPS, DEMO_FT_STEPS; DEMO_OUT, DEMO_SEED. The defaults (and
# the per-task batch sizes below) keep the demo under 15 min on 2 dedicated CPU cores.
# The configs in config/*-demo.json point at demo_output/; a copy with $OUT is used instead.
set -euo pipefail

OUT=${DEMO_OUT:-demo_output}
SEED=${DEMO_SEED:-0}
PY=${PYTHON:-python}
PRE_STEPS=${DEMO_PRETRAIN_STEPS:-80}
FT_STEPS=${DEMO_FT_STEPS:-24}
N_STEPS=0
STEP_NO=0

# step NAME COMMAND...: run COMMAND unless NAME's marker exists; time it; name it on failure.
step() {
    local name=$1 marker="$OUT/.steps/${1//[^A-Za-z0-9_.-]/_}.done" start rc=0
    shift
    STEP_NO=$((STEP_NO + 1))
    if [ -e "$marker" ]; then
        echo "==> [$STEP_NO/$N_STEPS] $name: already built, reusing it (delete $marker to redo)"
        printf '%s\t%s\treused\n' "$name" "$(cat "$marker")" >>"$OUT/timings.tsv"
        return 0
    fi
    echo "==> [$STEP_NO/$N_STEPS] $name"
    start=$(date +%s)
    "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "demo: step '$name' failed (exit code $rc); see its output above." \
             "Fix it and re-run: finished steps are reused." >&2
        exit 1
    fi
    mkdir -p "$OUT/.steps"
    echo "$(($(date +%s) - start))" >"$marker"  # the build time, reported again on reuse
    printf '%s\t%s\tbuilt\n' "$name" "$(cat "$marker")" >>"$OUT/timings.tsv"
    echo "    done in $(cat "$marker") s"
}

# fresh DIR COMMAND...: empty DIR (a half-built leftover of an interrupted run), then run.
fresh() {
    rm -rf "$1"
    shift
    "$@"
}

# demo_config NAME: config/NAME with demo_output/ replaced by $OUT/ (prints the copy's path).
demo_config() {
    mkdir -p "$OUT/configs"
    sed "s|\"demo_output/|\"$OUT/|g" "config/$1" >"$OUT/configs/$1"
    echo "$OUT/configs/$1"
}

check_tokenizer() {
    "$PY" - "$OUT/raw/tokenizer" <<'EOF'
import sys
from transformers import RobertaTokenizer
toker = RobertaTokenizer.from_pretrained(sys.argv[1])
text = "Chloe is cooking in the kitchen and talks about the phone."
print(f"    {sys.argv[1]}: RobertaTokenizer, vocabulary {len(toker)}")
print(f"    {text!r} -> {toker.encode(text)}")
EOF
}

# finetune TASK SCRIPT CONFIG BATCH INIT: one fine-tuning run (+ its final evaluation).
finetune() {
    local task=$1 script=$2 config=$3 batch=$4 init=$5 ckpt="" dir
    dir="$OUT/finetune/${task}_${init}"
    [ "$init" = pretrained ] && ckpt="$OUT/pretrain/ckpt/model_step_${PRE_STEPS}.pt"
    fresh "$dir" "$PY" "$script" --config "$(demo_config "$config")" --output_dir "$dir" \
        --checkpoint "$ckpt" --num_train_steps "$FT_STEPS" --valid_steps "$FT_STEPS" \
        --save_steps "$FT_STEPS" --warmup_steps $((FT_STEPS / 10 + 1)) \
        --train_batch_size "$batch"
}

# budget INIT: the step-name suffix, so a changed budget (or pre-training) is rebuilt.
budget() {
    if [ "$1" = pretrained ]; then
        echo "$FT_STEPS updates, pre-trained $PRE_STEPS"
    else
        echo "$FT_STEPS updates"
    fi
}

# task, script, config, train_batch_size (queries / questions / statements / videos)
FINETUNES=(
    "tvr train_vcmr.py train-tvr-demo.json 8"
    "tvqa train_videoQA.py train-tvqa-demo.json 4"
    "violin train_violin.py train-violin-demo.json 8"
    "tvc train_tvc.py train-tvc-demo.json 4"
    "didemo_video_only train_vcmr.py train-didemo_video_only-demo.json 8"
    "msrvtt_video_only train_vr.py train-msrvtt_video_only-demo.json 8"
)

main() {
    cd "$(dirname "$0")/.."
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    mkdir -p "$OUT"
    : >"$OUT/timings.tsv"
    N_STEPS=$((5 + 2 * ${#FINETUNES[@]}))
    local t0 spec task script config batch init
    t0=$(date +%s)
    echo "hero demo -> $OUT (pre-training $PRE_STEPS updates, fine-tuning $FT_STEPS updates)"
    step "generate toy corpus" fresh "$OUT/raw" \
        "$PY" scripts/make_toy_corpus.py --out "$OUT/raw" --seed "$SEED" --size demo
    step "tokenizer" check_tokenizer
    step "preprocess into text and video LMDBs" fresh "$OUT/dbs" \
        bash scripts/build_toy_dbs.sh "$OUT/raw" "$OUT/dbs"
    step "pre-train mlm, mfm-nce, fom, vsm ($PRE_STEPS updates)" fresh "$OUT/pretrain" \
        "$PY" pretrain.py --config "$(demo_config pretrain-demo.json)" \
        --output_dir "$OUT/pretrain" --num_train_steps "$PRE_STEPS" \
        --valid_steps "$PRE_STEPS" --save_steps "$PRE_STEPS" \
        --warmup_steps $((PRE_STEPS / 10 + 1)) --hard_negtiave_start_step "$((PRE_STEPS / 2))"
    for spec in "${FINETUNES[@]}"; do
        read -r task script config batch <<<"$spec"
        for init in pretrained scratch; do
            step "fine-tune + evaluate $task from $init ($(budget "$init"))" \
                finetune "$task" "$script" "$config" "$batch" "$init"
        done
    done
    STEP_NO=$((STEP_NO + 1))
    echo "==> [$STEP_NO/$N_STEPS] report"
    "$PY" scripts/make_report.py --demo_dir "$OUT" ||
        { echo "demo: step 'report' failed; see its output above." >&2; exit 1; }
    echo "demo finished in $(($(date +%s) - t0)) s; open $OUT/report.md"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
    exit  # bash reads scripts lazily: never read past here if the file is edited meanwhile
fi
