#!/usr/bin/env bash
# One GPU session's checks for the training step, most important first; each writes $OUT/<name>.log and
# prints its summary, so a run cut short still leaves what finished. All of it ends within $BUDGET seconds
# (default 500; each stage gets its own cap or what is left, whichever is less).
#   1. the step against the lecture's compiled step: baseline, ours (trainer defaults), chunked loss
#   2. train_gpt2.py, 124M, compiled, bf16, --loss_chunk_rows 8192, with val loss, HellaSwag and sampling
#      in the loop every 10 steps: runs, and compiles a bounded number of times (TORCH_LOGS=recompiles)
#   3. the other levers against chunked, while time is left: FP8, pageable batches, cuDNN attention,
#      max-autotune
# Needs the GPT-2 BPE files in $TIKTOKEN_CACHE_DIR (tools/offline_tokenizer.py) when offline.
# SMOKE=1 runs the same stages on the CPU at toy sizes, to check this script before spending GPU time.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
SMOKE=${SMOKE:-0}
END=$((SECONDS + ${BUDGET:-500}))
left() { local n=$((END - SECONDS)); echo $((n < $1 ? (n > 0 ? n : 1) : $1)); }  # min(cap, time left)
mkdir -p "$OUT"
DATA=$(mktemp -d)
LOGDIR=$(mktemp -d)
if [ "$SMOKE" = 1 ]; then
    SIZE=(--batch_size 2 --seq_len 64 --total_batch_size 256 --device cpu)
    BENCH=(--steps 2 --warmup 1 --no_compile)
    TRAIN=(--n_layer 2 --n_head 2 --n_embd 64 --compile off --hellaswag_every 0)
else
    SIZE=()
    BENCH=(--steps 8 --warmup 3)
    TRAIN=(--hellaswag_every 10)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

python3 - "$DATA" <<'PY'
import json, os, sys
import numpy as np
sys.path.insert(0, "bench")
from hellaswag_speed import synthetic_examples
data = sys.argv[1]
rng = np.random.default_rng(0)
np.save(f"{data}/random_val_000000.npy", rng.integers(0, 50257, 4_000_000, dtype=np.uint16))
np.save(f"{data}/random_train_000001.npy", rng.integers(0, 50257, 20_000_000, dtype=np.uint16))
with open(f"{data}/hellaswag.jsonl", "w") as f:
    for ex in synthetic_examples(2000):
        f.write(json.dumps(ex) + "\n")
PY

echo "== 1. the training step against the lecture's"
timeout "$(left 240)" python3 bench/train_speed.py --baseline --variants ours chunked "${SIZE[@]}" "${BENCH[@]}" \
    > "$OUT/train_speed.log" 2>&1
echo "exit $?"; grep -v "^ *losses" "$OUT/train_speed.log" | tail -6; grep "^ *losses" "$OUT/train_speed.log"

echo "== 2. compiled training with the chunked loss and evaluations in the loop"
TORCH_LOGS=recompiles timeout "$(left 150)" python3 train_gpt2.py --data "$DATA" --max_steps 30 --eval_every 10 \
    --val_steps 5 --hellaswag_data "$DATA/hellaswag.jsonl" --sample_every 10 --checkpoint_every 10 \
    --loss_chunk_rows 8192 --log_dir "$LOGDIR" "${SIZE[@]}" "${TRAIN[@]}" > "$OUT/train.log" 2>&1
echo "exit $?"; grep -v "^step" "$OUT/train.log" | grep -v "^rank" | tail -25; grep "^step" "$OUT/train.log" | tail -3
echo "recompiles: $(grep -c -i 'recompil' "$OUT/train.log")"; cp "$LOGDIR/log.txt" "$OUT/train_records.txt"

echo "== 3. the other levers"
timeout "$(left 600)" python3 bench/train_speed.py --variants chunked fp8 unpinned cudnn autotune "${SIZE[@]}" "${BENCH[@]}" \
    > "$OUT/levers.log" 2>&1
echo "exit $?"; grep -v "^ *losses" "$OUT/levers.log" | tail -6
rm -rf "$DATA" "$LOGDIR"
