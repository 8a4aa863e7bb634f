#!/usr/bin/env bash
# A throw-away one-node SLURM on localhost (munged + slurmctld + slurmd, all state in DIR), for trying
# `megaprorl launch slurm` without a cluster.  Needs root; installs slurm-wlm and munge with apt-get if
# they are missing.  Details: tests/slurm_cluster.py and docs/slurm.md.
#
#   eval "$(scripts/start_local_slurm.sh start /tmp/megaprorl-slurm)"   # sets SLURM_CONF
#   sinfo; megaprorl launch slurm examples/demo.yaml --nodes 1 --gpus-per-node 0 --nproc-per-node 2 --cpus-per-task 2
#   scripts/start_local_slurm.sh stop /tmp/megaprorl-slurm
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || { [ "$1" != start ] && [ "$1" != stop ]; }; then
  echo "usage: $0 start|stop [DIR]   (DIR defaults to /tmp/megaprorl-slurm)" >&2
  exit 2
fi
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" tests/slurm_cluster.py "$1" "${2:-/tmp/megaprorl-slurm}"
