#!/usr/bin/env bash
# One GPU session's checks, in order of importance (each writes to $OUT/<name>.log):
#   1. train_gpt2.py, 124M, compiled (the CUDA default), bf16, with val loss, HellaSwag and sampling in the
#      loop every 10 steps: runs, and compiles a bounded number of times (TORCH_LOGS=recompiles)
#   2. HellaSwag: batched vs one example per forward, full 10,042-example pass (synthetic examples)
#   3. the training step against the lecture's compiled step: tok/s, MFU, peak memory
# Needs the GPT-2 BPE files in $TIKTOKEN_CACHE_DIR (tools/offline_tokenizer.py) when offline.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
DATA=/tmp/gpu_check_data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

python3 - "$DATA" <<'PY'
import json, os, sys
import numpy as np
sys.path.insert(0, "bench")
from hellaswag_speed import synthetic_examples
data = sys.argv[1]
os.makedirs(data, exist_ok=True)
rng = np.random.default_rng(0)
np.save(f"{data}/random_val_000000.npy", rng.integers(0, 50257, 4_000_000, dtype=np.uint16))
np.save(f"{data}/random_train_000001.npy", rng.integers(0, 50257, 20_000_000, dtype=np.uint16))
with open(f"{data}/hellaswag.jsonl", "w") as f:
    for ex in synthetic_examples(2000):
        f.write(json.dumps(ex) + "\n")
PY

echo "== 1. compiled training with evaluations in the loop"
TORCH_LOGS=recompiles timeout 300 python3 train_gpt2.py --data "$DATA" --max_steps 30 --eval_every 10 --val_steps 5 \
    --hellaswag_every 10 --hellaswag_data "$DATA/hellaswag.jsonl" --sample_every 10 --checkpoint_every 10 \
    --log_dir /tmp/gpu_check_log > "$OUT/train.log" 2>&1
echo "exit $?"; grep -v "^step" "$OUT/train.log" | grep -v "^rank" | tail -25; grep "^step" "$OUT/train.log" | tail -3
echo "recompiles: $(grep -c -i 'recompil' "$OUT/train.log")"; cp /tmp/gpu_check_log/log.txt "$OUT/train_records.txt"

echo "== 2. HellaSwag speed"
timeout 200 python3 bench/hellaswag_speed.py --device cuda --limit 10042 --single_limit 300 --compile > "$OUT/hellaswag.log" 2>&1
echo "exit $?"; tail -15 "$OUT/hellaswag.log"

echo "== 3. training step vs the lecture's"
timeout 300 python3 bench/train_speed.py --baseline --steps 8 --warmup 2 > "$OUT/train_speed.log" 2>&1
echo "exit $?"; tail -6 "$OUT/train_speed.log"
