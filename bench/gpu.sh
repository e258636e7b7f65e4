#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see bench/gpu.py): d20 through the DeepSpeed backend at
# world size 1 (bf16, compile, batch 32 x 2048): peak memory, tokens/s, MFU; compile scope; a save and
# resume on the GPU; engine decode tokens/s at 1 and 8 rows. Prints one JSON line.
#
#   bash bench/gpu.sh [--out FILE]     # from any directory, with a Python that has torch (CUDA) + deepspeed
#   bash bench/gpu.sh --dry-run        # the same paths on CPU at depth 2 (run by tests/test_gpu_script.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
if [ "${1:-}" = "--dry-run" ]; then export DS_ACCELERATOR=cpu; fi
exec "${PYTHON:-python3}" bench/gpu.py "$@"
