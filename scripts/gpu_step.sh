#!/usr/bin/env bash
# Second device call: policy-side throughput (bench step) at 8K for the 1.5B shape, a full step with
# rollout, and a short end-to-end ProRL run of the demo config on the GPU; first, which attention path
# packed sequences should take (scripts/attn_probe.py: per-sequence SDPA per backend, varlen, padded).
set -uo pipefail
OUT=${1:-gpu_out}; mkdir -p "$OUT"
source scripts/gpu_env.sh
timeout 90 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_gpu.py::test_fused_lm_head_realistic \
  tests/test_kernels_cuda_gpu.py::test_gpu_huge_logits_against_fp64 "tests/test_kernels_triton.py::test_tensor_parallel_tp2_equals_tp1" 2>&1 | tail -5 | tee "$OUT/retest.log"
timeout 120 python3 scripts/attn_probe.py --out "$OUT/attn_probe.json" 2>&1 | grep -v -i warn | tee "$OUT/attn_probe.log"
timeout 200 python3 -m megaprorl.bench.step --preset qwen2-1.5b --prompts 4 --n-samples 2 --prompt-len 1024 \
  --response-len 7168 --micro-batch-size 1 --skip-rollout --repeats 2 --out "$OUT/bench_step_8k.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_step_8k.log"
timeout 200 python3 -m megaprorl.bench.step --preset qwen2-1.5b --prompts 4 --n-samples 2 --prompt-len 1024 \
  --response-len 7168 --micro-batch-size 1 --skip-rollout --repeats 2 --distributed-optimizer \
  --out "$OUT/bench_step_8k_do.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_step_8k_do.log"
timeout 150 python3 -m megaprorl.bench.step --preset qwen2-1.5b --prompts 16 --n-samples 4 --prompt-len 256 \
  --response-len 256 --micro-batch-size 4 --repeats 1 --out "$OUT/bench_step_rollout.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_step_rollout.log"
# host offload (train.offload_optimizer / offload_reference, 2026-12-07): the rollout's memory peak and the copies' time
timeout 150 python3 -m megaprorl.bench.step --preset qwen2-1.5b --prompts 16 --n-samples 4 --prompt-len 256 \
  --response-len 256 --micro-batch-size 4 --repeats 1 --offload --out "$OUT/bench_step_rollout_offload.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_step_rollout_offload.log"
timeout 120 python3 -m megaprorl.cli train examples/demo.yaml output_dir=/tmp/runs train.steps=20 logging.progress=false 2>&1 | grep -v -i warn | tail -15 | tee "$OUT/demo_gpu.log"
# padded micro-batches cut to their own length (2026-12-07) against packs, on ragged 8K rows (docs/benchmarks.md)
for layout in padded packed; do
  extra=(); [ "$layout" = packed ] && extra=(--pack-tokens 8192)
  timeout 150 python3 -m megaprorl.bench.step --preset qwen2-1.5b --prompts 4 --n-samples 4 --prompt-len 1024 \
    --response-len 7168 --micro-batch-size 1 --skip-rollout --ragged --recompute selective --repeats 2 "${extra[@]}" \
    --out "$OUT/bench_step_8k_ragged_$layout.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_step_8k_ragged_$layout.log"
done
