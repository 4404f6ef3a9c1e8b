#!/usr/bin/env bash
# Transformers loop vs vLLM loop (bench/vllm_loop.py) in the vLLM environment, built or reused by
# scripts/vllm-env. Arguments go to bench/vllm_loop.py (e.g. --image-side 1344 --batches 1,8,32).
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(bash scripts/vllm-env "${VILAVT_VLLM_ENV:-.venv-vllm}" | tail -1)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$PWD/.venv-vllm/cache}"
exec "$python" bench/vllm_loop.py "$@"
