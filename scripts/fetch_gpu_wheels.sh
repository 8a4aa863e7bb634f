#!/usr/bin/env bash
# Download, on the development machine, the wheels the GPU machine lacks (Python 3.12 there) into the
# git-ignored .whl/ (about 5 MB), which scripts/gpu_env.sh installs there:
#   megatron-core 0.16.1 (bench step, the gpu-marked policy tests), liger-kernel 0.8.5 (bench kernels'
#   Liger rows), verl 0.9.1 (the verl-linear-entropy row; its kernel files are loaded without ray).
# Then:  run(command="bash scripts/gpu_session.sh $OUT", carry=[".whl"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
mkdir -p .whl
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  megatron-core==0.16.1 liger-kernel==0.8.5 verl==0.9.1
ls -la .whl
