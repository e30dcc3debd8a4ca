#!/usr/bin/env bash
# The GPU measurement, one script for the day a GPU machine is lent (budget: under 10 minutes on one H100/H200).
#   bash tools/bench/bench_gpu.sh            # -> tools/results/bench_gpu.json (Qwen2.5-7B shape, bf16/int8/int4/gptq)
# Installs what is missing (the project itself, bitsandbytes; gptqmodel only if a wheel installs quickly), then
# runs tools/bench/bench_gpu.py on a randomly initialised Qwen2.5-7B-shaped model (speed does not depend on weights).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python -c "import essa_mpi" 2>/dev/null || pip install -q -e ".[quant]"
python -c "import bitsandbytes" 2>/dev/null || pip install -q "bitsandbytes>=0.45"
# GPTQ kernels: transformers' GPTQ integration calls gptqmodel; without it the plain-torch layer is measured.
timeout 180 pip install -q --only-binary=:all: gptqmodel 2>/dev/null || echo "gptqmodel: no wheel here; gptq = plain torch"
WORK=${BENCH_GPU_WORKDIR:-$(mktemp -d)}
timeout 480 python tools/bench/bench_gpu.py --arch "${BENCH_GPU_ARCH:-qwen2.5-7b}" --workdir "$WORK" "$@"
rm -rf "$WORK"
