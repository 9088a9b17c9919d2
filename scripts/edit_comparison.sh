#!/usr/bin/env bash
# MEMIT vs SFT vs MixSD (lam 0.3) vs the base model on a corpus of facts with subjects (issue 13 §4).
#
#     bash scripts/edit_comparison.sh CORPUS_DIR OUT_DIR [TRAIN_SPLIT] [CAPABILITY_DIR]
#
# CORPUS_DIR  a `mixsd corpus counterfact` folder (train split edits.jsonl) or a `mixsd corpus kgfact`
#             folder (train split train.jsonl: pass it as TRAIN_SPLIT)
# CAPABILITY_DIR  a `mixsd probes build-capability` folder for generative retention (optional)
# Every step skips work already done (each command resumes or reuses its finished output), so rerunning
# the same line continues an interrupted comparison. Single-threaded: run beside other jobs.
set -euo pipefail
corpus=${1:?corpus folder}
out=${2:?output folder}
split=${3:-edits.jsonl}
capability=${4:-}
model=${MIXSD_MODEL:-smollm2-135m}
mixsd=${MIXSD:-.venv/bin/mixsd}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # single-threaded torch: run beside other jobs
train_opts=(--bf16 --epochs 6 --lr 2e-4 --batch_size 8 --save_strategy no --progress false)
mkdir -p "$out"
log() { echo "[$(date +%H:%M:%S)] $*"; }

evaluate() {  # evaluate MODEL NAME: the corpus splits, then retention on the capability probes
    local model_path=$1 name=$2
    log "eval $name"
    "$mixsd" eval --model "$model_path" --suite qa --data "$corpus" --out "$out/$name/eval.json" \
        --bf16 --max_new_tokens 48
    if [ -n "$capability" ]; then
        "$mixsd" eval --model "$model_path" --suite retention --data "$capability" --base "$model" \
            --out "$out/$name/retention.json" --limit 20 --bf16
    fi
}

evaluate "$model" base

if [ ! -f "$out/memit/summary.json" ]; then
    log "memit"
    "$mixsd" edit --model "$model" --input "$corpus/$split" --out "$out/memit" --overwrite
fi
evaluate "$out/memit/model" memit

log "sft"
[ -f "$out/sft-targets.jsonl" ] || "$mixsd" sft-targets --model "$model" --input "$corpus/$split" \
    --output "$out/sft-targets.jsonl"
"$mixsd" train --model "$model" --targets "$out/sft-targets.jsonl" --out "$out/sft" "${train_opts[@]}"
evaluate "$out/sft/model" sft

log "mixsd lam 0.3"
"$mixsd" mix --model "$model" --input "$corpus/$split" --output "$out/mix-targets.jsonl" --lam 0.3 \
    --retries 10 --max_new_tokens 48 --on_failure answer
"$mixsd" train --model "$model" --targets "$out/mix-targets.jsonl" --out "$out/mixsd" "${train_opts[@]}"
evaluate "$out/mixsd/model" mixsd
log "done"
