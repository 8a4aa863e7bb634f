#!/usr/bin/env bash
# One device call: GPU tests (Triton compiled, CUDA extension JIT-built), then the kernel benchmark.
# Usage on the GPU machine from the repo root:  bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:-gpu_out}; mkdir -p "$OUT"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rs --durations=8 -p no:cacheprovider \
  tests/test_kernels_gpu.py tests/test_kernels_cuda_gpu.py tests/test_kernels_triton.py \
  tests/test_packing.py::test_packed_equals_padded_bf16_on_gpu tests/test_optimizer_gpu.py ${EXTRA_TESTS:-} 2>&1 | tee "$OUT/gpu_tests.log"
timeout ${BENCH_TIMEOUT:-280} python3 -m megaprorl.bench.kernels --out "$OUT/bench_kernels.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_kernels.log"
