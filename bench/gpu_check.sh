#!/usr/bin/env bash
# One GPU session's checks for the training step, in one call. Each stage writes $OUT/<name>.log and prints
# its summary, and the bench prints each variant as it finishes, so a run cut short still leaves what ran.
# All of it ends within $BUDGET seconds (default 540): the bench gets all but the last $TRAIN_CAP (150).
#   1. bench/train_speed.py at B=64, T=1024, what is still unmeasured: the lecture's step, ours (the
#      trainer's defaults: the chunked loss), the full logits, the flash attention kernels (torch 2.11 picks
#      cuDNN's), CUDA graphs (mode reduce-overhead), and the lecture's step again (the spread from run to
#      run: last, as the first to give up if time runs short; about a minute a variant on an H200). Each
#      variant then profiles one step: what share of the step the kernels fill, their time by kind and the 25
#      longest, with each fused kernel's GB/s (--profile). Measured on an H200 before and not run again
#      (bench/RESULTS.md): FP8, cuDNN attention, pageable batches, chunk sizes, coordinate-descent tuning,
#      max-autotune (its Triton matmuls lost to cuBLAS at every shape, after minutes of tuning)
#   2. train_gpt2.py, 124M, compiled, bf16, its defaults, with val loss, HellaSwag, sampling and a
#      checkpoint every 10 steps: it runs, and compiles a bounded number of times (TORCH_LOGS=recompiles).
#      The Python inductor generates for it (its graphs' code and their Triton kernels) goes to
#      $OUT/inductor_code.tgz: what each fused kernel reads and writes, for sizing hand-written ones
# Stage 2 needs the GPT-2 BPE files in $TIKTOKEN_CACHE_DIR when offline (default: .tok here, made by
# tools/offline_tokenizer.py; the device tool's call carries it with carry [".tok"]); stage 1 needs none.
# SMOKE=1 runs the same stages on the CPU at toy sizes, to check this script before spending GPU time: the
# bench uncompiled (so its compile levers change nothing there), the training run compiled, HellaSwag included.
# Exit status: 0 when every stage exited 0, else 1.
set -uo pipefail
export PYTHONUNBUFFERED=1
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.tok}
OUT=${OUT:-/tmp/gpu_check}
SMOKE=${SMOKE:-0}
BUDGET=${BUDGET:-540}
TRAIN_CAP=${TRAIN_CAP:-150}
END=$((SECONDS + BUDGET))
if [ "$BUDGET" -lt $((TRAIN_CAP + 60)) ]; then
    echo "error: BUDGET ($BUDGET s) must leave the bench a minute beyond TRAIN_CAP ($TRAIN_CAP s)" >&2; exit 1
fi
mkdir -p "$OUT" || { echo "error: cannot create OUT=$OUT" >&2; exit 1; }
DATA=$(mktemp -d)
LOGDIR=$(mktemp -d)
trap 'rm -rf "$DATA" "$LOGDIR"' EXIT  # the data and the checkpoints (1.5 GB each on a GPU) go, however it ends
failed=0
VARIANTS=(ours plain ours+flash ours+cudagraphs baseline)
if [ "$SMOKE" = 1 ]; then
    SIZE=(--batch_size 2 --seq_len 64 --device cpu)
    BENCH=(--total_batch_size 256 --steps 2 --warmup 1 --profile 3 --no_compile --n_layer 2 --n_head 2 --n_embd 64)
    TRAIN=(--total_batch_size 256 --n_layer 2 --n_head 2 --n_embd 64 --compile on --hellaswag_every 10)
else
    SIZE=()
    BENCH=(--steps 6 --warmup 2 --profile 25)
    TRAIN=(--total_batch_size 131072 --hellaswag_every 10)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# the Python with torch: $PYTHON, else python3, else (the CPU smoke run, a virtual environment not activated) .venv's
PYTHON_BIN=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && ! python3 -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then
    PYTHON_BIN=.venv/bin/python
fi
"$PYTHON_BIN" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null || {
    echo "error: $PYTHON_BIN cannot import torch: set PYTHON to the interpreter of the environment that has it" >&2
    exit 1
}

"$PYTHON_BIN" - "$DATA" <<'PY' || { echo "error: writing the random token shards failed (see above)" >&2; exit 1; }
import sys
import numpy as np
rng = np.random.default_rng(0)
np.save(f"{sys.argv[1]}/random_val_000000.npy", rng.integers(0, 50257, 4_000_000, dtype=np.uint16))
np.save(f"{sys.argv[1]}/random_train_000001.npy", rng.integers(0, 50257, 20_000_000, dtype=np.uint16))
PY
# HellaSwag-like examples, tokenized: without the tokenizer stage 2 cannot run, but stage 1 still does
"$PYTHON_BIN" - "$DATA" "$([ "$SMOKE" = 1 ] && echo 64 || echo 2000)" <<'PY' \
    || { echo "error: making the HellaSwag examples failed (see above): stage 2 is skipped" >&2; failed=1; }
import json, sys
sys.path.insert(0, "bench")
from hellaswag_speed import synthetic_examples
with open(f"{sys.argv[1]}/hellaswag.jsonl", "w") as f:
    for ex in synthetic_examples(int(sys.argv[2])):
        f.write(json.dumps(ex) + "\n")
PY

echo "== 1. the training step against the lecture's"
timeout -k 20 $((END - TRAIN_CAP - SECONDS)) "$PYTHON_BIN" bench/train_speed.py --baseline --variants "${VARIANTS[@]}" \
    "${SIZE[@]}" "${BENCH[@]}" > "$OUT/train_speed.log" 2>&1
status=$?; [ $status = 0 ] || failed=1
echo "exit $status (124: cut at the time limit)"
grep -v "^ *losses\|^USDT\|^STAGE:\|^Compiled module path" "$OUT/train_speed.log"

[ -s "$DATA/hellaswag.jsonl" ] || exit 1
echo "== 2. compiled training with the trainer's defaults and evaluations in the loop"
left=$((END - SECONDS - 20))  # SIGTERM makes the trainer finish its step and write a checkpoint: 20 s for that
TORCHINDUCTOR_CACHE_DIR="$LOGDIR/inductor" TORCH_LOGS=recompiles timeout -k 20 $((left > 10 ? left : 10)) \
    "$PYTHON_BIN" train_gpt2.py --data "$DATA" --max_steps 20 --eval_every 10 --val_steps 5 \
    --hellaswag_data "$DATA/hellaswag.jsonl" --sample_every 10 --checkpoint_every 10 \
    --log_dir "$LOGDIR" "${SIZE[@]}" "${TRAIN[@]}" > "$OUT/train.log" 2>&1
status=$?; [ $status = 0 ] || failed=1
echo "exit $status"; grep -v "^step" "$OUT/train.log" | grep -v "^rank" | tail -20; grep "^step" "$OUT/train.log" | tail -3
echo "recompiles: $(grep -c 'Recompiling function' "$OUT/train.log")"  # one line each (TORCH_LOGS prints more)
cp "$LOGDIR/log.txt" "$OUT/train_records.txt"
(cd "$LOGDIR/inductor" && find . -name "*.py" -print0 | tar czf "$OUT/inductor_code.tgz" --null -T -) \
    || echo "no inductor code saved"
ls -la "$LOGDIR" | grep model_
exit $failed
