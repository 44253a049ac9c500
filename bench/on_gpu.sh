#!/usr/bin/env bash
# GPU runs of the bench and the rehearsal, one lent-machine call each (under 10 minutes), JSON under $OUT.
# Run from the repository root on the GPU machine:
#   bash bench/on_gpu.sh gen      # one H100: generation (the bench's mix: slot_generate against HF generate, and
#                                 # the fp32/bf16 checks) and 05's QLoRA configuration against the reference
#   bash bench/on_gpu.sh stages   # one H100: the rehearsal's 01-04 at their defaults (the README's stage times)
#   bash bench/on_gpu.sh gpus2    # two GPUs of one host: stage 02 with 1 and 2 processes, same call
#   bash bench/on_gpu.sh lean     # one GPU: 05's configuration against bitsandbytes' 4-bit matmul and against its
#                                 # paged AdamW, interleaved twice, and where a micro-batch's host time goes
#                                 # (bench/train.py host_profile)
#   bash bench/on_gpu.sh lean3    # one GPU: 05's configuration as it is, with bitsandbytes' 4-bit matmul, and with
#                                 # that and its paged AdamW, interleaved three times
#   bash bench/on_gpu.sh late     # one GPU: the rehearsal's 05 and 06 at their defaults (07 needs lm-eval's wheel,
#                                 # which does not fit in one upload beside bitsandbytes')
#   bash bench/on_gpu.sh fp8      # one GPU (compute capability 8.9+): stage 02 with --backend=hf-fp8, then
#                                 # hf, in the rehearsal; the bench's mix in bf16 and with float8 weights, interleaved
#   bash bench/on_gpu.sh kv8      # one GPU (compute capability 8.9+): stage 02 with --backend=hf-fp8 in the
#                                 # rehearsal; the bench's mix with float8 weights, with and without the float8 KV
#                                 # cache, interleaved, and bf16 weights both ways; the profile of both float8 paths
#   bash bench/on_gpu.sh startup  # one GPU: stage 02 at 1,700 riddles in the rehearsal, then bench/startup.py
# To compare with an earlier engine, run the same mode in a git worktree of that commit (git worktree add ../old
# COMMIT; carry what this tree carries), on a warm machine of the same kind, alternating with this tree's runs.
# The machine has torch, transformers, peft and accelerate, but no bitsandbytes, protobuf or network.
# Prepare here, then pass carry [".gpu-wheels", "out/models/assets"] (out/models/assets: made by `make test`):
#   pip download --no-deps -d .gpu-wheels bitsandbytes==0.50.2 protobuf==7.36.2
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:=out/on_gpu}" out/rehearsal
OUT=$(realpath "$OUT")  # the device sets an absolute $OUT; the runs below change folder
REH=$(realpath out/rehearsal)  # the rehearsal's random models (14.5 GB) stay out of $OUT, which travels back
ARGS=${ARGS:-}  # more rehearsal arguments; ARGS="--scale=0.02 --riddles=6" smoke-tests this script on a CPU
python3 -m pip install --no-deps -q .gpu-wheels/*.whl
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/cards.txt" || true

case "${1:-}" in
gen)
  # 256 slots with every step over all of them (EngineOptions(shrink=False)) against the defaults, side by side;
  # the first row also compiles the Triton kernels, so it is repeated last. An 80 GB card caps 512 slots at ~300
  # (the KV cache in 60% of free memory), at ~400 with 80%.
  python3 bench/bench.py --part=gen --out="$OUT" --slots=256:flat,256,512,512:kv0.8,256:flat --static-requests=0 \
    --cb-seconds=0 --ref-seconds=5 2>&1 | tee "$OUT/gen.log"
  python3 bench/bench.py --part=train --out="$OUT" --train-configs=varlen:8192:0.125:sum:fused:bf16lora \
    --ref-steps=2 2>&1 | tee "$OUT/train.log"
  ;;
lean)
  A=varlen:8192:0.125:sum:fused:bf16lora
  python3 bench/bench.py --part=train --out="$OUT" --train-configs=$A,$A:bnb4bit,$A:paged,$A,$A:bnb4bit,$A:paged \
    --train-profile=$A --train-tokens=160000 --ref-steps=1 2>&1 | tee "$OUT/train.log"
  ;;
lean3)
  # 05's configuration as it is, with bitsandbytes' 4-bit matmul, and with that and its paged AdamW, interleaved
  # three times, 320k tokens each
  A=varlen:8192:0.125:sum:fused:bf16lora
  python3 bench/bench.py --part=train --out="$OUT" --train-tokens=320000 --ref-steps=1 \
    --train-configs=$A,$A:bnb4bit,$A:bnb4bit:paged,$A,$A:bnb4bit,$A:bnb4bit:paged,$A,$A:bnb4bit,$A:bnb4bit:paged \
    2>&1 | tee "$OUT/train.log"
  ;;
late)
  python3 rehearsal.py --stages=05,06 --out="$REH" $ARGS 2>&1 | tee "$OUT/rehearsal.log"
  cp "$REH/rehearsal.json" "$OUT/rehearsal_05-06.json"
  ;;
stages)
  python3 rehearsal.py --stages=01,02,03,04 --out="$REH" $ARGS 2>&1 | tee "$OUT/rehearsal.log"
  cp "$REH/rehearsal.json" "$OUT/rehearsal_01-04.json"
  ;;
gpus2)
  # Stage 02 at the recipe's 1,700 riddles and at 7,400 (where generation outweighs the ~14 s a process
  # pays before its first reply), one process, then two; each rehearsal.json is copied before the next run.
  for riddles in 1700 7400; do
    for gpus in 1 2; do
      python3 rehearsal.py --stages=02 --gpus=$gpus --riddles=$riddles --out="$REH" $ARGS 2>&1 \
        | tee "$OUT/stage02_${riddles}_${gpus}gpu.log"
      cp "$REH/rehearsal.json" "$OUT/stage02_${riddles}_${gpus}gpu.json"
    done
  done
  ;;
fp8)
  for backend in hf-fp8 hf; do
    python3 rehearsal.py --stages=02 --backend=$backend --out="$REH" $ARGS 2>&1 | tee "$OUT/rehearsal_$backend.log"
    cp "$REH/rehearsal.json" "$OUT/rehearsal_02_$backend.json"
  done
  python3 bench/bench.py --part=gen --out="$OUT" --slots=437:kv0.9,437:kv0.9:fp8,437:kv0.9,437:kv0.9:fp8 \
    --static-requests=0 --cb-seconds=0 --ref-seconds=3 2>&1 | grep -v Warning > "$OUT/gen.log"
  grep "ours\|check" "$OUT/gen.log" | cut -c1-230
  ;;
kv8)
  # The bench's mix: float8 weights with the bf16 KV cache (437 slots in 90% of free memory)
  # against float8 weights and KV cache (512 slots: the bench's 512 requests at once), interleaved, and bf16 weights
  # both ways; then the profile of the float8 paths at 256 and 384 slots. First the rehearsal's stage 02 with hf-fp8.
  python3 rehearsal.py --stages=02 --backend=hf-fp8 --out="$REH" $ARGS 2>&1 | tee "$OUT/rehearsal_hf-fp8.log" | tail -3
  cp "$REH/rehearsal.json" "$OUT/rehearsal_02_hf-fp8.json"
  python3 bench/bench.py --part=gen --out="$OUT" --static-requests=0 --cb-seconds=0 --ref-seconds=3 \
    --slots=437:kv0.9:fp8,512:kv0.9:fp8:fp8kv,437:kv0.9:fp8,512:kv0.9:fp8:fp8kv,437:kv0.9,512:kv0.9:fp8kv \
    2>&1 | grep -v Warning > "$OUT/gen.log"
  grep "ours\|check\|kernels" "$OUT/gen.log" | cut -c1-260
  python3 bench/bench.py --part=profile --out="$OUT" --profile-paths=auto:fp8,auto:fp8kv 2>&1 | grep -v Warning \
    > "$OUT/profile.log"
  grep "slots\|prefill" "$OUT/profile.log" | cut -c1-230
  ;;
startup)
  python3 rehearsal.py --stages=02 --riddles=1700 --out="$REH" $ARGS 2>&1 | tee "$OUT/stage02.log"
  cp "$REH/rehearsal.json" "$OUT/stage02.json"
  # A stage process's fixed cost, and CUDA started in a thread beside the imports (bench/startup.py)
  python3 bench/startup.py --model="$(ls -d "$REH"/models/mistralai--* | head -1)" --runs=3 --out="$OUT" 2>&1 \
    | tee "$OUT/startup.log"
  ;;
*)
  echo "usage: bash bench/on_gpu.sh gen|lean|lean3|late|stages|gpus2|fp8|kv8|startup" >&2
  exit 2
  ;;
esac
