#!/usr/bin/env bash
# TransformerEngine on the GPU machine, then the TE-spec / FP8 checks.
#
# TE's core wheel (transformer_engine_cu13 2.12.0, 190 MB; 2.12 is the release megatron-core 0.16 was
# built against) is larger than one device call carries (64 MiB), so scripts/te_fetch.sh (run here)
# leaves it in four parts under the git-ignored .te/1 .. .te/4, with the small wheels and TE's torch
# sdist in .te/1.  Ignored files stay on a warm machine between calls, so (each call right after the
# previous one: the machine goes back after 30 s idle):
#   run(command="ls .te", carry=[".te/1"]); run(command="ls .te", carry=[".te/2"]);
#   run(command="ls .te", carry=[".te/3"]);
#   run(command="bash scripts/gpu_te.sh $OUT", carry=[".te/4", ".whl"], timeout_s=600)
# This script joins and checks the core wheel, builds TE's torch extension against the machine's torch
# (16 jobs, sm_90 only), installs all of it into /tmp/te_site, and runs the TE tests and bench step
# at 8K with and without FP8.  Set TE_ONLY_INSTALL=1 to stop after the install.
set -uo pipefail
OUT=${1:-gpu_out}; mkdir -p "$OUT"
REPO=$PWD
source scripts/gpu_env.sh
CORE=transformer_engine_cu13-2.12.0-py3-none-manylinux_2_28_x86_64.whl
if ! python3 -c "import transformer_engine.pytorch" 2>/dev/null; then
  for d in 1 2 3 4; do [ -d .te/$d ] || { echo "missing .te/$d: carry .te/1 .. .te/4 in consecutive calls"; exit 2; }; done
  rm -rf /tmp/tewhl && mkdir -p /tmp/tewhl
  cat .te/1/te_core.part0 .te/2/te_core.part1 .te/3/te_core.part2 .te/4/te_core.part3 > /tmp/tewhl/$CORE
  (cd /tmp/tewhl && sed "s#  .*#  $CORE#" $REPO/.te/1/core.sha256 | sha256sum -c -) || exit 3
  cp .te/1/*.whl /tmp/tewhl/
  rm -rf /tmp/te_src && mkdir -p /tmp/te_src && tar xzf .te/1/transformer_engine_torch-2.12.0.tar.gz -C /tmp/te_src
  # the extension links against the core library: install core + metapackage first, then build
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/te_site /tmp/tewhl/*.whl \
    || exit 4
  export PYTHONPATH=/tmp/te_site:$PYTHONPATH
  t0=$(date +%s)
  (cd /tmp/te_src/transformer_engine_torch-2.12.0 && NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=90 MAX_JOBS=16 \
     python3 -m pip wheel -q --no-index --no-deps --no-build-isolation -w /tmp/tewhl/torch . ) 2>&1 | tail -40 \
     | tee "$OUT/te_build.log"
  echo "TE torch extension built in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/te_build.log"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/te_site_torch \
    /tmp/tewhl/torch/*.whl || exit 5
  cp -r /tmp/te_site_torch/. /tmp/te_site/  # TE looks for its torch .so next to the transformer_engine package
fi
export PYTHONPATH=/tmp/te_site:$PYTHONPATH
python3 -c "import transformer_engine, transformer_engine.pytorch as te; print('transformer_engine', transformer_engine.__version__)" \
  2>&1 | tee "$OUT/te_version.txt" || exit 6
[ "${TE_ONLY_INSTALL:-0}" = 1 ] && exit 0
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -rs -p no:cacheprovider tests/test_te_gpu.py ${EXTRA_TESTS:-} \
  2>&1 | tee "$OUT/te_tests.log"
for fp8 in "" hybrid; do
  timeout ${BENCH_TIMEOUT:-150} python3 -m megaprorl.bench.step --preset qwen2-1.5b --skip-rollout --prompts 4 \
    --n-samples 2 --prompt-len 1024 --response-len 7168 --micro-batch-size 1 --recompute selective \
    --transformer-impl transformer_engine ${fp8:+--fp8 $fp8} --out "$OUT/bench_step_te${fp8:+_$fp8}.json" \
    2>&1 | tail -14 | tee -a "$OUT/te_bench.log"
done
