# Sourced by the scripts/gpu_*.sh device scripts: install carried wheels (.whl/) and set the paths.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 MEGAPRORL_CUDA_BUILD_DIR=/tmp/mpr_build MAX_JOBS=16
