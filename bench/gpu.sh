#!/usr/bin/env bash
# The GPU check: one command, under 8 minutes on one H200, using only what that machine has (torch,
# transformers, numpy; no Kafka, no tokenizer, no model download). Random weights of real shapes
# (bench/configs/*.json). Results: $OUT/gpu.log (everything printed) and one JSON file per benchmark.
#
#   OUT=/tmp/gpu-out bash bench/gpu.sh
#
# The compression benchmark needs torchao, which that machine lacks: `bash bench/gpu_wheels.sh` here
# fetches its wheel into bench/.wheels (git-ignored; name it in the device run's `carry`), and this
# script installs whatever wheels it finds there into a temporary folder on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if compgen -G "bench/.wheels/*.whl" >/dev/null; then
  SITE=$(mktemp -d)
  $PY -m pip install --quiet --no-deps --no-index --target "$SITE" bench/.wheels/*.whl && export PYTHONPATH=$PWD:$SITE
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  # Engine vs static batches vs one-by-one generate: the issue's workload (512 requests, prompts 16-512,
  # answers 8-256) at a rate that saturates static batches.
  timeout 150 $PY -m bench.engine --config bench/configs/smollm2-135m.json --device cuda --dtype bfloat16 \
    --requests 512 --rate 40 --one-by-one 8 --kv-blocks 16384 --max-running 64 --max-step-tokens 2048 \
    --json "$OUT/engine-smollm2-135m.json" || echo "engine bench (smollm2-135m) failed or timed out"
  timeout 180 $PY -m bench.engine --config bench/configs/llama-3.2-1b.json --device cuda --dtype bfloat16 \
    --requests 512 --rate 40 --one-by-one 8 --kv-blocks 16384 --max-running 64 --max-step-tokens 2048 \
    --json "$OUT/engine-llama-3.2-1b.json" || echo "engine bench (llama-3.2-1b) failed or timed out"
  # Decode at batch 1 on the 8B shape against the measured memory bandwidth.
  timeout 60 $PY -m bench.decode_bandwidth --config bench/configs/llama-3-8b.json --device cuda \
    --json "$OUT/decode-llama-3-8b.json" || echo "decode bandwidth (llama-3-8b) failed or timed out"
  # Compression on the 8B shape (int4/int8/fp8 weight-only decode, 2:4 sparse prefill); needs torchao
  # (bench/.wheels, above), skipped otherwise.
  OUT="$OUT" timeout 60 $PY -m bench.compress_gpu --layers 8 || echo "bench.compress_gpu skipped or failed"
} 2>&1 | tee "$OUT/gpu.log"
