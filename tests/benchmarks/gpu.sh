#!/usr/bin/env bash
# The GPU run, ready to fire on an H100/H200 with torch and transformers installed, no network:
# the full-size EXAONE-3.5-2.4B shape with random bf16 weights, built in memory (no download).
# Prints the benchmark's lines, then one JSON line: single-stream tokens/s and its roofline
# fraction, the same for static-cache torch.compile'd generate (the single-stream reference), time to first token for a ~512-token prompt, aggregate tokens/s at 1, 32 and 64
# concurrent (engine, seed pipeline, static generate), the attention path and whether CUDA
# graphs were on. Bounded to 8 minutes.
#
#   bash tests/benchmarks/gpu.sh            # on the GPU host
#   bash tests/benchmarks/gpu.sh --smoke    # the same path on CPU with the tiny shape (tests)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
if [[ "${1:-}" == "--smoke" ]]; then
  exec timeout 300 python -m tests.benchmarks.engine_bench --size tiny --device cpu \
    --concurrency 1,4 --words 16 --new-tokens 4 --repeat 1 --long-words 40 --pipeline-max 1 \
    --static-reference --json
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
exec timeout 480 python -m tests.benchmarks.engine_bench --size full --device cuda \
  --concurrency 1,32,64 --words 16 --new-tokens 128 --repeat 3 --long-words 500 \
  --pipeline-max 2 --static-reference --json
