#!/usr/bin/env bash
# The GPU measurement, one script for the day a GPU machine is lent (budget: under 10 minutes on one H100/H200).
#   bash tools/bench/bench_gpu.sh            # -> tools/results/bench_gpu.json (Qwen2.5-7B shape, bf16/int8/int4/gptq)
#                                            #    and bench_eval_gpu.json (HF vs vLLM engine; BENCH_GPU_VLLM=0 skips it)
# Installs what is missing (the project itself, bitsandbytes; gptqmodel only if a wheel installs quickly), then
# runs tools/bench/bench_gpu.py on a randomly initialised Qwen2.5-7B-shaped model (speed does not depend on weights).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python -c "import essa_mpi" 2>/dev/null || pip install -q -e ".[quant]"
python -c "import bitsandbytes" 2>/dev/null || pip install -q "bitsandbytes>=0.45"
# GPTQ kernels: transformers' GPTQ integration calls gptqmodel; without it the plain-torch layer is measured.
timeout 180 pip install -q --only-binary=:all: gptqmodel 2>/dev/null || echo "gptqmodel: no wheel here; gptq = plain torch"
WORK=${BENCH_GPU_WORKDIR:-$(mktemp -d)}
timeout 480 python tools/bench/bench_gpu.py --arch "${BENCH_GPU_ARCH:-qwen2.5-7b}" --workdir "$WORK" "$@"
# The two engines on the same random model (issue 24): bench_eval's grid of candidates, tokens and precisions.
if [ "${BENCH_GPU_VLLM:-1}" != 0 ]; then
  if python -c "import vllm" 2>/dev/null || timeout 240 pip install -q vllm; then
    python -c "import sys; sys.path.insert(0, 'tests'); from tiny import make_tokenizer; make_tokenizer().save_pretrained('$WORK/dense')"
    timeout 300 python tools/bench/bench_eval.py --model "$WORK/dense" --device cuda \
      --out tools/results/bench_eval_gpu.json || echo "bench_eval on the GPU failed"
  else
    echo "vllm: not installable here within 240 s; engine comparison skipped"
  fi
fi
rm -rf "$WORK"
