#!/usr/bin/env bash
# MEMIT on KGFact-small (issue 13 §4): edit the 100 training facts, then the grid's evaluation and retention.
set -euo pipefail
export OMP_NUM_THREADS=1
M=.venv/bin/mixsd
out=runs/kgfact-memit
mkdir -p $out
[ -f $out/corpus/manifest.json ] || $M corpus kgfact --size small --seed 0 --out $out/corpus
[ -f $out/memit/summary.json ] || $M edit --model smollm2-135m --input $out/corpus/train.jsonl --out $out/memit --overwrite
$M eval --model $out/memit/model --suite kgfact --data $out/corpus --splits train,paraphrase --out $out/memit-eval/eval.json --bf16 --max_new_tokens 48
$M eval --model $out/memit/model --suite retention --base smollm2-135m --out $out/memit-eval/retention.json --limit 40 --bf16
echo done
