"""``megaprorl launch slurm CONFIG [key=value ...] --nodes N --gpus-per-node G [--dry-run]``.

Writes an sbatch script to ``RUN_DIR/slurm/job.sbatch`` and the resolved config (YAML + overrides,
as the trainer will read it) to ``RUN_DIR/slurm/config.yaml``, then submits the script with
``sbatch`` and prints the job id and log paths.  ``--dry-run`` only prints the script.

One SLURM task per node runs ``torchrun`` (``python -m torch.distributed.run``), which starts the
per-GPU trainer processes and joins the other nodes through a c10d rendezvous at the first node of
the allocation.  The trainer is always started with ``checkpoint.resume=auto``, so every restart of
the job continues from the newest complete checkpoint in ``RUN_DIR/checkpoints``.

Preemption and requeue (see docs/slurm.md):

(a) time limit: ``#SBATCH --signal=B:USR1@120`` makes SLURM send SIGUSR1 to the batch shell 120 s
    before the limit.  The shell forwards it to ``srun`` (which passes it to every process of the
    step); torchrun forwards it to the ranks too.  The trainer finishes its step, checkpoints and
    exits with ``EXIT_REQUEUE`` (3); torchrun itself reports a failure (1) then, so the shell
    requeues when it forwarded the signal or the exit status is 3: ``scontrol requeue $SLURM_JOB_ID``.
(b) ``scontrol requeue JOBID`` from outside, or preemption with PreemptMode=REQUEUE: SLURM sends
    SIGTERM to every process of the job, waits KillWait seconds, kills what is left and starts the
    job again under the same id.  The trainer checkpoints on SIGTERM if it can within KillWait; the
    restarted job resumes from the newest complete checkpoint either way.  The batch shell only
    waits (it must not requeue a second time, nor requeue a job that is being cancelled).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

EXIT_REQUEUE = 3  # = megaprorl.trainer.EXIT_REQUEUE (not imported: it would import torch)

_SIGNAL_RE = re.compile(r"^(?:B:)?(?:SIG)?(USR1)@(\d+)$")


class LaunchError(ValueError):
    pass


@dataclass
class Plan:
    """Everything the sbatch script is made of (paths are absolute)."""

    run_dir: str
    config_path: str  # RUN_DIR/slurm/config.yaml
    script_path: str  # RUN_DIR/slurm/job.sbatch
    job_name: str
    nodes: int
    gpus_per_node: int
    nproc_per_node: int
    cpus_per_task: Optional[int]
    partition: str
    account: str
    time: str
    signal_seconds: int
    python: str
    workdir: str
    pythonpath: str
    env: List[Tuple[str, str]]
    extra_sbatch: List[str]
    container_image: str
    container_mounts: str
    exclusive: bool

    @property
    def slurm_dir(self) -> str:
        return os.path.join(self.run_dir, "slurm")

    @property
    def out_pattern(self) -> str:
        return os.path.join(self.slurm_dir, "%j.out")

    @property
    def err_pattern(self) -> str:
        return os.path.join(self.slurm_dir, "%j.err")


# ------------------------------------------------------------------------------------ arguments
def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="megaprorl launch slurm",
        description="Write an sbatch script for a (multi-node) ProRL run and submit it. The job requeues "
                    "itself before its time limit and resumes from the newest checkpoint; see docs/slurm.md.")
    p.add_argument("config", help="YAML config (see examples/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides, baked into the saved config")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; 0 runs on CPUs (default 8)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="trainer processes per node (default: --gpus-per-node, or 1 when it is 0)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs for the one task per node (torchrun and all its ranks)")
    p.add_argument("--partition", default="", help="SLURM partition")
    p.add_argument("--account", default="", help="SLURM account")
    p.add_argument("--time", default="", help="time limit, e.g. 04:00:00 (the job requeues itself before it)")
    p.add_argument("--job-name", default="", help="job name (default: the config's name)")
    p.add_argument("--output-dir", default="",
                   help="run directory (default: the config's output_dir/name); the trainer's output_dir and "
                        "name are set to match it")
    p.add_argument("--signal", default="USR1@120", metavar="USR1@SECONDS",
                   help="send SIGUSR1 this many seconds before the time limit so that the trainer checkpoints "
                        "and the job requeues itself (default USR1@120; make it longer than a step + checkpoint)")
    p.add_argument("--container-image", default="", help="run inside this image with pyxis (srun --container-image)")
    p.add_argument("--container-mounts", default="", help="pyxis --container-mounts (default: the run directory "
                   "and the working directory when --container-image is given)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="export KEY=VAL in the job (repeatable)")
    p.add_argument("--python", default="", help="python interpreter on the compute nodes (default: this one, "
                   "or 'python' inside a container)")
    p.add_argument("--extra-sbatch", action="append", default=[], metavar="'#SBATCH ...'",
                   help="extra sbatch directive, e.g. '#SBATCH --qos=high' (repeatable)")
    p.add_argument("--exclusive", action="store_true", help="#SBATCH --exclusive (whole nodes)")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    return p.parse_intermixed_args(argv)  # overrides before or after the options


def _check_args(a: argparse.Namespace) -> int:
    if a.nodes < 1:
        raise LaunchError("--nodes must be >= 1")
    if a.gpus_per_node < 0:
        raise LaunchError("--gpus-per-node must be >= 0")
    nproc = a.nproc_per_node if a.nproc_per_node is not None else (a.gpus_per_node or 1)
    if nproc < 1:
        raise LaunchError("--nproc-per-node must be >= 1")
    if a.gpus_per_node and nproc > a.gpus_per_node:
        raise LaunchError(f"--nproc-per-node {nproc} is more than --gpus-per-node {a.gpus_per_node}")
    if a.cpus_per_task is not None and a.cpus_per_task < 1:
        raise LaunchError("--cpus-per-task must be >= 1")
    for kv in a.env:
        if "=" not in kv or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", kv.split("=", 1)[0]):
            raise LaunchError(f"--env {kv!r} is not of the form KEY=VALUE")
    for line in a.extra_sbatch:
        if "\n" in line:
            raise LaunchError(f"--extra-sbatch {line!r}: one directive per option")
    return nproc


def signal_seconds(spec: str) -> int:
    m = _SIGNAL_RE.match(spec.strip())
    if not m:
        raise LaunchError(f"--signal {spec!r}: expected USR1@SECONDS, e.g. USR1@120 (the trainer checkpoints "
                          f"on SIGUSR1; SIGTERM is what SLURM sends when it cancels or requeues a job itself)")
    return int(m.group(2))


# ------------------------------------------------------------------------------------ config
def resolve_config(config: str, overrides: List[str], output_dir: str):
    """Load CONFIG + overrides; point output_dir/name at the run directory. Returns (cfg, run_dir, yaml)."""
    from ..config import ConfigError, load_config, to_yaml

    for ov in overrides:
        if ov.split("=", 1)[0].strip() == "checkpoint.resume" and ov.split("=", 1)[1].strip() not in ("", "auto"):
            print(f"warning: {ov!r} is replaced by checkpoint.resume=auto: a SLURM job always resumes from the "
                  f"newest checkpoint of its run directory", file=sys.stderr)
    try:
        cfg = load_config(config, list(overrides))
        run_dir = os.path.abspath(output_dir or os.path.join(cfg.output_dir, cfg.name))
        cfg = load_config(config, list(overrides) + [f"output_dir={os.path.dirname(run_dir)}",
                                                     f"name={os.path.basename(run_dir)}"])
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    return cfg, run_dir, to_yaml(cfg)


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _source_checkout() -> str:
    """The repository root when megaprorl is imported from a source tree (not an installed wheel), else ''."""
    root = _package_root()
    return root if os.path.exists(os.path.join(root, "setup.py")) else ""


def make_plan(a: argparse.Namespace, run_dir: str, cfg_name: str) -> Plan:
    nproc = _check_args(a)
    slurm_dir = os.path.join(run_dir, "slurm")
    workdir = os.getcwd()
    mounts = a.container_mounts
    if a.container_image and not mounts:
        mounts = ",".join(sorted({run_dir, workdir} | ({_source_checkout()} - {""})))
    return Plan(
        run_dir=run_dir, config_path=os.path.join(slurm_dir, "config.yaml"),
        script_path=os.path.join(slurm_dir, "job.sbatch"), job_name=a.job_name or cfg_name or "megaprorl",
        nodes=a.nodes, gpus_per_node=a.gpus_per_node, nproc_per_node=nproc, cpus_per_task=a.cpus_per_task,
        partition=a.partition, account=a.account, time=a.time, signal_seconds=signal_seconds(a.signal),
        python=a.python or ("python" if a.container_image else sys.executable), workdir=workdir,
        pythonpath=_source_checkout(), env=[tuple(kv.split("=", 1)) for kv in a.env],
        extra_sbatch=[ln.strip() if ln.strip().startswith("#SBATCH") else f"#SBATCH {ln.strip()}"
                      for ln in a.extra_sbatch],
        container_image=a.container_image, container_mounts=mounts, exclusive=a.exclusive)


# ------------------------------------------------------------------------------------ the script
def build_script(plan: Plan) -> str:
    q = shlex.quote
    sb = [f"#SBATCH --job-name={q(plan.job_name)}",
          f"#SBATCH --nodes={plan.nodes}",
          "#SBATCH --ntasks-per-node=1"]
    if plan.gpus_per_node:
        sb.append(f"#SBATCH --gpus-per-node={plan.gpus_per_node}")
    if plan.cpus_per_task:
        sb.append(f"#SBATCH --cpus-per-task={plan.cpus_per_task}")
    if plan.partition:
        sb.append(f"#SBATCH --partition={q(plan.partition)}")
    if plan.account:
        sb.append(f"#SBATCH --account={q(plan.account)}")
    if plan.time:
        sb.append(f"#SBATCH --time={q(plan.time)}")
    if plan.exclusive:
        sb.append("#SBATCH --exclusive")
    sb += [f"#SBATCH --signal=B:USR1@{plan.signal_seconds}",
           "#SBATCH --requeue",
           "#SBATCH --open-mode=append",
           f"#SBATCH --output={plan.out_pattern}",
           f"#SBATCH --error={plan.err_pattern}",
           f"#SBATCH --chdir={plan.workdir}"]
    sb += plan.extra_sbatch

    srun = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    if plan.cpus_per_task:  # since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch
        srun.append(f"--cpus-per-task={plan.cpus_per_task}")
    if plan.container_image:
        srun += [f"--container-image={q(plan.container_image)}", f"--container-workdir={q(plan.workdir)}"]
        if plan.container_mounts:
            srun.append(f"--container-mounts={q(plan.container_mounts)}")
    exports = [f"export MEGAPRORL_RUN_DIR={q(plan.run_dir)}",
               f"export MEGAPRORL_CONFIG={q(plan.config_path)}",
               f"export MEGAPRORL_PYTHON={q(plan.python)}"]
    if plan.pythonpath:  # running from a source checkout: the job imports this very tree
        exports.append(f"export PYTHONPATH={q(plan.pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}}")
    exports.append("export PYTHONUNBUFFERED=1")
    exports += [f"export {k}={q(v)}" for k, v in plan.env]
    # bash -c so that $SLURM_NODEID is expanded on each node.  `trap "" USR1`: a torchrun too old to
    # handle SIGUSR1 (torch < 2.9) ignores it instead of dying; the ranks install their own handler and
    # get the signal from SLURM directly.  A newer torchrun handles it (PET_SIGNALS_TO_HANDLE) and
    # forwards it to the ranks as well.
    torchrun = (
        'trap "" USR1; exec "$MEGAPRORL_PYTHON" -m torch.distributed.run \\\n'
        f'    --nnodes="$SLURM_NNODES" --nproc-per-node={plan.nproc_per_node} --node-rank="$SLURM_NODEID" \\\n'
        '    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \\\n'
        '    -m megaprorl.cli train "$MEGAPRORL_CONFIG" checkpoint.resume=auto')
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return f"""#!/bin/bash
# Generated by `megaprorl launch slurm` on {now}.
# Run directory: {plan.run_dir}
# Resubmit (it resumes from the newest checkpoint): sbatch {plan.script_path}
{chr(10).join(sb)}

set -uo pipefail  # no -e: the exit status of srun decides below

{chr(10).join(exports)}

# Rendezvous: the first node of the allocation hosts the c10d store; the port depends on the job id
# (a requeued job keeps its id and its port).
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
# torchrun forwards SIGUSR1 and SIGTERM to the ranks and waits for them to checkpoint.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export PET_SHUTDOWN_TIMEOUT={max(30, plan.signal_seconds)}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$PET_SHUTDOWN_TIMEOUT

log() {{ echo "[megaprorl-slurm $(date +%H:%M:%S)] $*"; }}
log "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST: $SLURM_NNODES node(s) x {plan.nproc_per_node} rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT"

REQUEUE_ASKED=0
TERMINATING=0
SRUN_PID=""
on_usr1() {{  # time limit near (--signal=B:USR1@{plan.signal_seconds}): checkpoint, then requeue
  REQUEUE_ASKED=1
  log "SIGUSR1: time limit near; asking the trainer to checkpoint and stop"
  if [ -n "$SRUN_PID" ]; then kill -USR1 "$SRUN_PID" 2>/dev/null; fi
}}
on_term() {{  # SLURM is cancelling, preempting or requeueing the job itself: let the trainer checkpoint
  TERMINATING=1
  log "SIGTERM: the job is being cancelled, preempted or requeued by SLURM"
}}
trap on_usr1 USR1
trap on_term TERM

{" ".join(srun)} \\
  bash -c '{torchrun}' &
SRUN_PID=$!
while :; do  # a trapped signal interrupts `wait`; keep waiting until srun has really exited
  wait "$SRUN_PID"
  RC=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done
log "trainer exited with status $RC"

if [ "$RC" -eq 0 ]; then
  log "run finished"
  exit 0
fi
if [ "$TERMINATING" -eq 1 ]; then
  log "not requeueing here: SLURM requeues (scontrol requeue / preemption) or cancels the job itself"
  exit "$RC"
fi
if [ "$RC" -eq {EXIT_REQUEUE} ] || [ "$REQUEUE_ASKED" -eq 1 ]; then
  log "requeueing job $SLURM_JOB_ID; it will resume from the newest checkpoint in $MEGAPRORL_RUN_DIR/checkpoints"
  scontrol requeue "$SLURM_JOB_ID"
  exit {EXIT_REQUEUE}
fi
log "the trainer failed; not requeueing"
exit "$RC"
"""


# ------------------------------------------------------------------------------------ submission
def parse_job_id(sbatch_stdout: str) -> str:
    """Job id from ``sbatch --parsable`` ("123" or "123;cluster") or plain "Submitted batch job 123"."""
    text = sbatch_stdout.strip()
    m = re.search(r"(?:^|\s)(\d+)(?:;\S+)?\s*$", text)
    if not m:
        raise LaunchError(f"cannot find a job id in sbatch's output: {text!r}")
    return m.group(1)


def submit(script_path: str) -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("sbatch not found on PATH: run this on a SLURM login node (or use --dry-run)")
    r = subprocess.run([sbatch, "--parsable", script_path], capture_output=True, text=True)
    if r.returncode != 0:
        raise LaunchError(f"sbatch {script_path} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return parse_job_id(r.stdout)


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg, run_dir, cfg_yaml = resolve_config(a.config, a.overrides, a.output_dir)
        plan = make_plan(a, run_dir, cfg.name)
        script = build_script(plan)
        if a.dry_run:
            sys.stdout.write(script)
            print(f"# dry run: nothing written or submitted (would write {plan.script_path} and "
                  f"{plan.config_path})", file=sys.stderr)
            return 0
        os.makedirs(plan.slurm_dir, exist_ok=True)
        with open(plan.config_path, "w") as f:
            f.write(cfg_yaml)
        with open(plan.script_path, "w") as f:
            f.write(script)
        os.chmod(plan.script_path, 0o755)
        job_id = submit(plan.script_path)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if "sbatch" not in str(e) else 1
    out = plan.out_pattern.replace("%j", job_id)
    err = plan.err_pattern.replace("%j", job_id)
    print(f"submitted job {job_id}")
    print(f"  script   {plan.script_path}")
    print(f"  config   {plan.config_path}")
    print(f"  stdout   {out}")
    print(f"  stderr   {err}")
    print(f"  follow:  tail -f {out}    requeue: scontrol requeue {job_id}    cancel: scancel {job_id}")
    print(f"  status:  megaprorl status {plan.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
