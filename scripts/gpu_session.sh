#!/usr/bin/env bash
# The whole GPU check in one device call that fits the 15-minute device budget of a session (machine
# start included).  First `bash scripts/fetch_gpu_wheels.sh` here (fills .whl/), then
#   run(command="bash scripts/gpu_session.sh $OUT", carry=[".whl"], timeout_s=590)
# Steps in order of what only a GPU can show, each with its own time limit (total 725 s; steps 1-4 with 1b total 560 s, so
# the call's 590 s cuts steps 5-7 only when the earlier ones run to their limits):
#   1. the gpu-marked kernel, packing (bf16) and optimizer tests (JIT-builds the CUDA extension)
#   1b. `bench decode-attention`: the engine's masked SDPA decode attention against the Triton kernel
#   2. `bench kernels` at T = 16384 for the rows the issue-4 targets compare
#   3. `bench step` at 8K for the 1.5B shape with Megatron's distributed optimizer
#   4. `bench step` at 16K with train.fused_lm_head (no [T, V] logits) and full recomputation, one timed step
#      (selective recomputation saves ~nothing with SDPA: tests/test_recompute.py)
#   5. scripts/attn_probe.py (which attention path packed sequences should take)
#   6. `bench step` with rollouts, the shape of session 1's engine figure (64 rows x 256 tokens, 14.9 s then),
#      after the decode changes of 2026-12-02; near the end, so a call cut off at its timeout loses only these
#   7. the same with the Triton decode attention and rollout.cuda_graphs (step graphs captured per KV cache)
# .whl/ brings megatron-core (bench step, policy tests), liger-kernel and verl (their bench rows).
# TransformerEngine / FP8 does not fit in this budget: scripts/gpu_te.sh.
set -uo pipefail
OUT=${1:-gpu_out}; mkdir -p "$OUT"
source scripts/gpu_env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/device.txt"
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -i "warn" | tee "$OUT/$name.log"
  echo "[$name] rc=${PIPESTATUS[0]} ${limit}s limit, took $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"; }
step gpu_tests 180 python3 -m pytest -q -rs --durations=6 -p no:cacheprovider tests/test_kernels_gpu.py \
  tests/test_kernels_cuda_gpu.py tests/test_kernels_triton.py tests/test_packing.py::test_packed_equals_padded_bf16_on_gpu \
  tests/test_optimizer_gpu.py tests/test_fused_lm_head_policy.py::test_fused_lm_head_equals_logits_bf16_on_gpu \
  tests/test_decode_attention.py::test_equals_masked_sdpa_fp32 tests/test_decode_attention.py::test_bf16_within_rounding \
  tests/test_decode_attention.py::test_engine_with_triton_attention_and_step_graphs_draw_sdpas_tokens \
  tests/test_decode_attention.py::test_gpu_long_extents_bf16 tests/test_trtllm_refit_gpu.py
step bench_decode_attention 40 python3 -m megaprorl.bench.decode_attention --rows 64 --max-len 2048 17408 \
  --out "$OUT/bench_decode_attention.json"
step bench_kernels 110 python3 -m megaprorl.bench.kernels --tokens 16384 --out "$OUT/bench_kernels.json" \
  --only triton triton-inplace triton-inplace-defer cuda liger-grpo lmhead-triton liger-flce verl-linear-entropy
step bench_step_8k_do 130 python3 -m megaprorl.bench.step --preset qwen2-1.5b --prompts 4 --n-samples 2 \
  --prompt-len 1024 --response-len 7168 --micro-batch-size 1 --skip-rollout --repeats 2 --distributed-optimizer \
  --out "$OUT/bench_step_8k_do.json"
step bench_step_16k_fused 100 python3 -m megaprorl.bench.step --preset qwen2-1.5b --prompts 2 --n-samples 2 \
  --prompt-len 1024 --response-len 15360 --micro-batch-size 1 --skip-rollout --repeats 1 --distributed-optimizer \
  --recompute full --fused-lm-head --out "$OUT/bench_step_16k_fused.json"
step attn_probe 45 python3 scripts/attn_probe.py --iters 2 --out "$OUT/attn_probe.json"
step bench_step_rollout 60 python3 -m megaprorl.bench.step --preset qwen2-1.5b --prompts 16 --n-samples 4 \
  --prompt-len 256 --response-len 256 --repeats 1 --out "$OUT/bench_step_rollout.json"
step bench_step_rollout_graphs 60 python3 -m megaprorl.bench.step --preset qwen2-1.5b --prompts 16 --n-samples 4 \
  --prompt-len 256 --response-len 256 --repeats 1 --decode-attention triton --cuda-graphs \
  --out "$OUT/bench_step_rollout_graphs.json"
