#!/usr/bin/env bash
# The whole HERO pipeline on the synthetic toy TV corpus, on CPU (what `make demo` runs):
#   raw corpus -> tokenizer -> preprocessing scripts -> text/video LMDBs -> pre-training
#   (mlm, mfm-nce, fom, vsm) -> fine-tuning + evaluation of TVR, TVQA, VIOLIN, TVC, DiDeMo and
#   MSR-VTT, each from the pre-trained checkpoint and from scratch -> demo_output/report.md.
# A finished step leaves a marker in $OUT/.steps/ and is reused by the next run (it says so)
# unless its configs or an earlier step changed; an unfinished one is rebuilt from a clean
# folder. A failing step stops the demo, named.
# Budgets live in the demo configs (config/*-demo.json: updates, batch size, learning rate);
# DEMO_PRETRAIN_STEPS / DEMO_FT_STEPS override the number of updates for a quick run; DEMO_OUT,
# DEMO_SEED. The two fine-tuning runs of a task (pre-trained, scratch) run side by side, one CPU
# thread each: on 2 cores that is ~1.3x faster than one after the other with 2 threads.
# The configs in config/*-demo.json point at demo_output/; a copy with $OUT is used instead.
set -euo pipefail

OUT=${DEMO_OUT:-demo_output}
SEED=${DEMO_SEED:-0}
PY=${PYTHON:-python}
PRE_STEPS=${DEMO_PRETRAIN_STEPS:-}
FT_STEPS=${DEMO_FT_STEPS:-}
N_STEPS=0
STEP_NO=0

# step NAME COMMAND...: run COMMAND unless NAME's marker exists with the same STEP_KEY (the
# fingerprint of the step's inputs, see inputs_key; empty = none); time it; name it on failure.
step() {
    local name=$1 marker="$OUT/.steps/${1//[^A-Za-z0-9_.-]/_}.done" start rc=0
    local keyfile="${marker%.done}.key" key=${STEP_KEY:-}
    shift
    STEP_NO=$((STEP_NO + 1))
    if [ -e "$marker" ] && [ "$(cat "$keyfile" 2>/dev/null)" = "$key" ]; then
        echo "==> [$STEP_NO/$N_STEPS] $name: already built, reusing it (delete $marker to redo)"
        printf '%s\t%s\treused\n' "$name" "$(cat "$marker")" >>"$OUT/timings.tsv"
        return 0
    fi
    echo "==> [$STEP_NO/$N_STEPS] $name"
    if [ -e "$marker" ]; then
        echo "    its configs or an earlier step changed since it was built; rebuilding"
        rm -f "$marker"
    fi
    start=$(date +%s)
    "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "demo: step '$name' failed (exit code $rc); see its output above." \
             "Fix it and re-run: finished steps are reused." >&2
        exit 1
    fi
    mkdir -p "$OUT/.steps"
    echo "$key" >"$keyfile"
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

# inputs_key PREV WORD_OR_FILE...: fingerprint of an earlier step's key, these words and the
# contents of those that are files. A step is rebuilt when its key changes, so editing a config
# redoes its step and the steps built on it (code changes are not tracked: delete $OUT/.steps).
inputs_key() {
    local arg
    for arg in "$@"; do
        echo "$arg"
        if [ -f "$arg" ]; then cat "$arg"; fi
    done | sha256sum | cut -c1-16
}

# config_value CONFIG KEY: the value of KEY in config/CONFIG.
config_value() {
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "config/$1" "$2"
}

# config_files CONFIG: config/CONFIG and the model config it names.
config_files() {
    echo "config/$1"
    config_value "$1" model_config
}

# config_steps CONFIG: num_train_steps of config/CONFIG.
config_steps() {
    config_value "$1" num_train_steps
}

# steps_args N: the flags that make a run of N updates validate and save at its end.
steps_args() {
    echo "--num_train_steps $1 --valid_steps $1 --save_steps $1 --warmup_steps $(($1 / 10 + 1))"
}

# budget CONFIG: the step-name suffix, so a changed budget (or pre-training) is rebuilt.
budget() {
    echo "${FT_STEPS:-$(config_steps "$1")} updates, pre-trained $PRE_STEPS"
}

# pretrain: pretrain.py with the demo config; with DEMO_PRETRAIN_STEPS, that many updates and
# hard negatives for the last fifth, as the config has them for its own budget.
pretrain() {
    local budget=()
    if [ -n "${DEMO_PRETRAIN_STEPS:-}" ]; then
        read -r -a budget <<<"$(steps_args "$PRE_STEPS")"
        budget+=(--hard_negtiave_start_step "$((PRE_STEPS * 4 / 5))")
    fi
    fresh "$OUT/pretrain" "$PY" pretrain.py --config "$(demo_config pretrain-demo.json)" \
        --output_dir "$OUT/pretrain" "${budget[@]}"
}

# finetune TASK SCRIPT CONFIG INIT: one fine-tuning run (+ its final evaluation).
finetune() {
    local task=$1 script=$2 config=$3 init=$4 ckpt="" dir budget=()
    dir="$OUT/finetune/${task}_${init}"
    [ "$init" = pretrained ] && ckpt="$OUT/pretrain/ckpt/model_step_${PRE_STEPS}.pt"
    [ -n "$FT_STEPS" ] && read -r -a budget <<<"$(steps_args "$FT_STEPS")"
    fresh "$dir" "$PY" "$script" --config "$(demo_config "$config")" --output_dir "$dir" \
        --checkpoint "$ckpt" "${budget[@]}"
}

# finetune_pair TASK SCRIPT CONFIG: the scratch run in the background (its output in
# $OUT/finetune/TASK_scratch.log), the pre-trained run in the foreground; both must succeed.
finetune_pair() {
    local log="$OUT/finetune/$1_scratch.log" pid rc=0
    mkdir -p "$OUT/finetune"
    echo "    from scratch: in the background, output in $log"
    OMP_NUM_THREADS=1 finetune "$1" "$2" "$3" scratch >"$log" 2>&1 &
    pid=$!
    OMP_NUM_THREADS=1 finetune "$1" "$2" "$3" pretrained || rc=$?
    if ! wait "$pid"; then
        echo "demo: the from-scratch run of $1 failed; the end of $log:" >&2
        tail -n 20 "$log" >&2
        return 1
    fi
    return "$rc"
}

# search_index: a moment-search index (issue 19) over the toy TV val videos with the
# fine-tuned (pre-trained init) TVR model, its last checkpoint.
search_index() {
    local run="$OUT/finetune/tvr_pretrained" ckpt
    ckpt=$(ls "$run"/ckpt/model_step_*.pt | sort -V | tail -n 1)
    fresh "$OUT/search_index" "$PY" scripts/build_index.py --video_db "$OUT/dbs/video_db/tv" \
        --sub_txt_db "$OUT/dbs/txt_db/tv_subtitles.db" --model_dir "$run" --ckpt "$ckpt" \
        --video_ids "$OUT/dbs/txt_db/pretrain_splits/tv_val.json" \
        --out "$OUT/search_index" --device cpu
}

# search_queries: two queries against that index (printed on every run; a second each).
SEARCH_QUERIES=("Alice is looking for her camera in the kitchen."
                "Felix is running on the beach and talks about the key.")
search_queries() {
    local query
    for query in "${SEARCH_QUERIES[@]}"; do
        echo "    query: $query"
        "$PY" search_moments.py --index "$OUT/search_index" "$query" --top_k 5 --subtitles |
            sed 's/^/    /'
    done
}

# task, script, config
FINETUNES=(
    "tvr train_vcmr.py train-tvr-demo.json"
    "tvqa train_videoQA.py train-tvqa-demo.json"
    "violin train_violin.py train-violin-demo.json"
    "tvc train_tvc.py train-tvc-demo.json"
    "didemo_video_only train_vcmr.py train-didemo_video_only-demo.json"
    "msrvtt_video_only train_vr.py train-msrvtt_video_only-demo.json"
)

main() {
    cd "$(dirname "$0")/.."
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    mkdir -p "$OUT"
    : >"$OUT/timings.tsv"
    N_STEPS=$((7 + ${#FINETUNES[@]}))
    PRE_STEPS=${PRE_STEPS:-$(config_steps pretrain-demo.json)}
    local t0 spec task script config ft="${FT_STEPS:-config}"
    t0=$(date +%s)
    echo "hero demo -> $OUT (pre-training $PRE_STEPS updates, fine-tuning updates: $ft)"
    local data_key pre_key key tvr_key=""
    data_key=$(inputs_key "seed $SEED")
    STEP_KEY=$data_key step "generate toy corpus" fresh "$OUT/raw" \
        "$PY" scripts/make_toy_corpus.py --out "$OUT/raw" --seed "$SEED" --size demo
    STEP_KEY=$data_key step "tokenizer" check_tokenizer
    STEP_KEY=$data_key step "preprocess into text and video LMDBs" fresh "$OUT/dbs" \
        bash scripts/build_toy_dbs.sh "$OUT/raw" "$OUT/dbs"
    pre_key=$(inputs_key "$data_key" $(config_files pretrain-demo.json))
    STEP_KEY=$pre_key step "pre-train mlm, mfm-nce, fom, vsm ($PRE_STEPS updates)" pretrain
    for spec in "${FINETUNES[@]}"; do
        read -r task script config <<<"$spec"
        key=$(inputs_key "$pre_key" $(config_files "$config"))
        if [ "$task" = tvr ]; then tvr_key=$key; fi
        STEP_KEY=$key \
            step "fine-tune + evaluate $task, pre-trained and from scratch ($(budget "$config"))" \
            finetune_pair "$task" "$script" "$config"
    done
    STEP_KEY=$(inputs_key "$tvr_key" search-index) \
        step "moment-search index of the TV videos (fine-tuned TVR model)" search_index
    STEP_NO=$((STEP_NO + 1))
    echo "==> [$STEP_NO/$N_STEPS] search the index: two queries"
    search_queries ||
        { echo "demo: step 'search the index' failed; see its output above." >&2; exit 1; }
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
