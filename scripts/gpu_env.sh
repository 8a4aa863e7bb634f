# Sourced by the scripts/gpu_*.sh device scripts: install carried wheels (.whl/) and set the paths.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 MEGAPRORL_CUDA_BUILD_DIR=/tmp/mpr_build MAX_JOBS=16
# verl's fused linear-entropy kernel for `bench kernels` (the verl package itself needs ray; see load_verl_linear_entropy)
if [ -d /tmp/site/verl/utils/kernel ]; then export MEGAPRORL_VERL_SRC=/tmp/site; fi
