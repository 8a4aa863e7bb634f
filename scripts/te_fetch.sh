#!/usr/bin/env bash
# Run here (PyPI reachable), not on the GPU machine: downloads TransformerEngine 2.12.0 for the GPU image
# (Python 3.12, CUDA 13) and its missing pure-Python needs into the git-ignored .te/, the 190 MB core
# wheel split into four parts that each fit one device call.  scripts/gpu_te.sh says how to carry them.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .te && mkdir -p .te/1 .te/2 .te/3 .te/4
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_17_x86_64 --platform any -d .te/1"
python3 -m pip download -q $P transformer_engine_cu13==2.12.0 transformer_engine==2.12.0 pydantic==2.14.3 \
  pydantic-core==2.50.4 annotated-types typing-inspection typing_extensions nvdlfw-inspect
# TE's torch extension is an sdist built against the machine's torch (pip download would try to build it here)
url=$(curl -fsS https://pypi.org/simple/transformer-engine-torch/ \
      | grep -o 'https://[^"#]*transformer_engine_torch-2\.12\.0\.tar\.gz' | head -1)
curl -fsSL -o .te/1/transformer_engine_torch-2.12.0.tar.gz "$url"
core=transformer_engine_cu13-2.12.0-py3-none-manylinux_2_28_x86_64.whl
(cd .te/1 && sha256sum $core > core.sha256 && split -b 48000000 -d -a 1 $core te_core.part && rm $core)
for i in 1 2 3; do mv .te/1/te_core.part$i .te/$((i + 1))/; done
du -sh .te/*
