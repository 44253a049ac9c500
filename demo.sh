#!/usr/bin/env bash
# The whole pipeline, offline, on the bundled SmolLM2-135M-Instruct (generator and student),
# with small counts so it runs on a laptop CPU. Drop the overrides for the real recipe.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python3}
start=$SECONDS
G="--generator=smollm2"

# 01: grow the seed riddles into new ones (raw lines -> cleaned, deduplicated riddles)
$PY 01_generate_riddles.py $G --num-prompts=12
# 02: answer each riddle step by step
$PY 02_answer_riddles.py $G
# 03: a curious child's follow-up question
$PY 03_followup_questions.py $G
# 04: answer the follow-up -> data/04_conversations.jsonl
$PY 04_followup_answers.py $G

echo "demo: done in $(( SECONDS - start )) s"
