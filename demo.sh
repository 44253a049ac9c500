#!/usr/bin/env bash
# The whole pipeline, offline, on the bundled SmolLM2-135M-Instruct (generator and student),
# with small counts so it runs on a laptop CPU in minutes. Drop the overrides for the real recipe.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python3}
start=$SECONDS
G="--generator=smollm2 --batch-size=64 --overwrite"

# 01: grow the seed riddles into new ones (raw replies -> cleaned, deduplicated riddles)
$PY 01_generate_riddles.py $G --num-prompts=24 --k=5 --max-new-tokens=160
# 02: answer each riddle step by step
$PY 02_answer_riddles.py $G --max-new-tokens=128
# 03: riddles that reword a seed or an earlier one are dropped (pipeline/dedup.py, the bundled MiniLM embedder),
#     then a curious child's follow-up question (a 135M model often answers instead: rejected)
$PY 03_followup_questions.py $G --max-new-tokens=32 --temperature=0.6
# 04: answer the follow-up -> data/04_conversations.jsonl, and the data card data/report.md
$PY 04_followup_answers.py $G --max-new-tokens=128
# 05: QLoRA on the bundled model, a few steps of 1k tokens (a higher LR so a few steps show)
$PY 05_finetune_phi2.py --student=smollm2 --max-steps=4 --tokens-per-batch=1024 --max-length=512 \
    --lr=2e-4 --gradient-checkpointing=0 --evals-per-epoch=0 --overwrite
# 06: merge, then one reply instead of the interactive chat
$PY 06_merge_and_chat.py --prompt="What has keys but can't open locks?" --temperature=0 --max-new-tokens=96 --overwrite
# 07: evaluation report, base vs fine-tuned (the benchmarks' data needs the hub: one line each offline)
$PY 07_evaluate.py --limit=20 --samples=2 --max-new-tokens=48 --win-rate=false  # the bundled 135M cannot judge

echo "demo: 01 -> 07 in $(( SECONDS - start )) s; data card: data/report.md; report: out/07_eval/report.md"
