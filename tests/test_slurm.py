"""``megaprorl launch slurm``: the generated sbatch script, and preemption/requeue on a real SLURM.

The SLURM tests start a one-node SLURM on localhost (tests/slurm_cluster.py; apt-get installs
slurm-wlm and munge when they are missing and we are root) and drive a 2-rank CPU job through both
requeue paths:

(a) SIGUSR1 to the batch shell, as ``--signal=B:USR1@120`` sends it before the time limit
    (``scancel --signal=USR1 --batch``): the trainer checkpoints and exits, the script requeues;
(b) ``scontrol requeue JOBID`` from outside: SLURM sends SIGTERM, kills the job and restarts it.

Each restart must resume from the newest checkpoint.  SLURM makes a requeued job wait 120 s before
it is eligible again; the tests shorten that wait with ``scontrol update JobId=.. StartTime=now+3``.

``test_requeue_real_trainer`` runs the real ``megaprorl train`` on the tiny demo config (2 gloo ranks
under torchrun), then the same run uninterrupted: every per-step value of the requeued run must equal
the uninterrupted run's.  (A stand-in trainer that checked the launcher alone ran the same two paths with the
same assertions; it was dropped for time, 83 s on the 2-core machine.)
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest

from megaprorl.launch.slurm import main as launch_main
from megaprorl.launch.slurm import parse_job_id
from slurm_cluster import LocalSlurm, SlurmNotInstallable
from test_resume_exact import _comparable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo.yaml")
PY = sys.executable

pytestmark = pytest.mark.slurm


# ------------------------------------------------------------------------------------ dry run
def test_dry_run_script(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "multi"
    rc = launch_main([DEMO, "train.steps=7", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                      "--account", "proj", "--time", "04:00:00", "--output-dir", str(run_dir),
                      "--env", "NCCL_DEBUG=WARN", "--extra-sbatch", "#SBATCH --qos=high", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    for line in ["#!/bin/bash",
                 "#SBATCH --nodes=4",
                 "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj",
                 "#SBATCH --time=04:00:00",
                 "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue",
                 "#SBATCH --open-mode=append",
                 f"#SBATCH --output={run_dir}/slurm/%j.out",
                 f"#SBATCH --error={run_dir}/slurm/%j.err",
                 "#SBATCH --qos=high",
                 f"export MEGAPRORL_CONFIG={run_dir}/slurm/config.yaml",
                 "export NCCL_DEBUG=WARN",
                 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))",
                 "trap on_usr1 USR1",
                 'scontrol requeue "$SLURM_JOB_ID"']:
        assert line in [ln.strip() for ln in out.splitlines()], f"missing line {line!r} in:\n{out}"
    for frag in ["srun --kill-on-bad-exit=1", "-m torch.distributed.run", '--nnodes="$SLURM_NNODES"',
                 "--nproc-per-node=8", '--node-rank="$SLURM_NODEID"', "--rdzv-backend=c10d",
                 '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
                 '-m megaprorl.cli train "$MEGAPRORL_CONFIG" checkpoint.resume=auto',
                 f"export MEGAPRORL_PYTHON={PY}", '[ "$RC" -eq 3 ]']:
        assert frag in out, f"missing {frag!r} in:\n{out}"
    assert not run_dir.exists(), "--dry-run must not write anything"
    r = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_dry_run_cpu_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = launch_main([DEMO, "name=cpu", "output_dir=out", "--gpus-per-node", "0", "--signal", "USR1@300",
                      "--python", "/opt/env/bin/python3", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "export MEGAPRORL_PYTHON=/opt/env/bin/python3" in out.splitlines()
    assert "--gpus-per-node" not in out
    assert "--nproc-per-node=1" in out
    assert "#SBATCH --signal=B:USR1@300" in out
    assert "#SBATCH --job-name=cpu" in out
    assert f"#SBATCH --output={tmp_path}/out/cpu/slurm/%j.out" in out.splitlines()
    assert f"#SBATCH --chdir={tmp_path}" in out.splitlines()


def test_bad_arguments_name_the_problem(capsys):
    assert launch_main([DEMO, "train.stepz=3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "train.steps" in err
    assert launch_main([DEMO, "--signal", "TERM@60", "--dry-run"]) == 2
    assert "USR1@SECONDS" in capsys.readouterr().err
    assert launch_main([DEMO, "--gpus-per-node", "4", "--nproc-per-node", "8", "--dry-run"]) == 2
    assert "--nproc-per-node" in capsys.readouterr().err


def test_parse_job_id():
    assert parse_job_id("1234\n") == "1234"
    assert parse_job_id("1234;cluster\n") == "1234"
    assert parse_job_id("Submitted batch job 99\n") == "99"


# ------------------------------------------------------------------------------------ real SLURM
@pytest.fixture(scope="module")
def cluster():
    c = LocalSlurm()
    try:
        c.start()
    except SlurmNotInstallable as e:
        c.cleanup()
        pytest.skip(f"no local SLURM: {e}")
    try:
        yield c
    finally:
        c.cleanup()


class Job:
    def __init__(self, cluster: LocalSlurm, job_id: str, run_dir: str, deadline: float):
        self.c, self.id, self.run_dir, self.deadline = cluster, job_id, run_dir, deadline

    @property
    def out_path(self) -> str:
        return os.path.join(self.run_dir, "slurm", f"{self.id}.out")

    def text(self, which: str = "out") -> str:
        p = os.path.join(self.run_dir, "slurm", f"{self.id}.{which}")
        return open(p, errors="replace").read() if os.path.exists(p) else ""

    def info(self):
        return self.c.job_info(self.id)

    def report(self) -> str:
        return (f"job {self.id}: {self.info()}\n--- {self.id}.out\n{self.text('out')[-6000:]}\n"
                f"--- {self.id}.err\n{self.text('err')[-6000:]}\n{self.c.logs(tail=3000)}")

    def wait(self, cond, what: str, poll: float = 0.5):
        while time.time() < self.deadline:
            v = cond()
            if v:
                return v
            info = self.info()
            if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                pytest.fail(f"job ended ({info.get('JobState')}) while waiting for {what}\n{self.report()}")
            time.sleep(poll)
        pytest.fail(f"timed out waiting for {what}\n{self.report()}")

    def restarted(self, n: int):
        """Wait until SLURM restarted the job n times, then skip the 120 s requeue delay."""
        def running_again():
            if f"(restart {n})" in self.text():  # the batch script's first line in restart n
                return True
            info = self.info()
            if info.get("JobState") == "PENDING":
                try:
                    eligible = datetime.datetime.fromisoformat(info.get("EligibleTime", "")).timestamp()
                except ValueError:
                    eligible = 0.0
                if info.get("Reason") == "BeginTime" and eligible > time.time() + 10:
                    # not StartTime=now: slurmd rejects a credential issued in the second it revoked the last one
                    self.c.run("scontrol", "update", f"JobId={self.id}", "StartTime=now+3", check=False)
            return False
        self.wait(running_again, f"restart {n}")

    def checkpoints(self):
        return sorted(int(os.path.basename(os.path.dirname(p))[len("step_"):])
                      for p in glob.glob(os.path.join(self.run_dir, "checkpoints", "step_*", "COMPLETE")))


def _launch(cluster: LocalSlurm, run_dir: str, args, timeout_s: float) -> Job:
    env = cluster.env
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([PY, "-m", "megaprorl.cli", "launch", "slurm", *args, "--output-dir", run_dir],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"launch failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    m = re.search(r"submitted job (\d+)", r.stdout)
    assert m, r.stdout
    assert os.path.exists(os.path.join(run_dir, "slurm", "job.sbatch"))
    assert os.path.exists(os.path.join(run_dir, "slurm", "config.yaml"))
    assert os.path.join(run_dir, "slurm", f"{m.group(1)}.out") in r.stdout
    assert f"status:  megaprorl status {run_dir}" in r.stdout
    return Job(cluster, m.group(1), run_dir, time.time() + timeout_s)


def _exercise_both_requeue_paths(job: Job, steps: int):
    # (a) time limit near: SIGUSR1 to the batch shell -> checkpoint -> the script requeues the job
    job.wait(lambda: job.checkpoints(), "the first checkpoint")
    job.c.run("scancel", "--signal=USR1", "--batch", job.id)
    job.wait(lambda: "requeueing job" in job.text(), "the script to requeue the job after SIGUSR1")
    ckpt_a = job.checkpoints()[-1]
    assert ckpt_a < steps, f"the run finished before it could be requeued (checkpoint {ckpt_a})\n{job.report()}"
    job.restarted(1)
    job.wait(lambda: re.search(rf"resumed from \S*step_0*{ckpt_a}\b", job.text()), f"resume from step {ckpt_a}")

    # (b) an external `scontrol requeue`: SIGTERM, the job is killed and started again by SLURM
    job.wait(lambda: job.checkpoints() and job.checkpoints()[-1] > ckpt_a, "a checkpoint after the first resume")
    assert job.info().get("JobState") == "RUNNING", f"the run finished too early\n{job.report()}"
    job.c.run("scontrol", "requeue", job.id)
    job.restarted(2)
    job.wait(lambda: len(re.findall(r"resumed from ", job.text())) >= 2, "the second resume")
    job.wait(lambda: job.info().get("JobState") == "COMPLETED", "the job to complete")

    out = job.text()
    assert "(restart 1)" in out and "(restart 2)" in out, job.report()
    assert "SIGUSR1: time limit near" in out, job.report()
    assert "SIGTERM: the job is being cancelled, preempted or requeued by SLURM" in out, job.report()
    assert "run finished" in out, job.report()
    assert job.info().get("ExitCode") == "0:0", job.report()
    second = [int(s) for s in re.findall(r"resumed from \S*step_0*(\d+)", out)][1]
    assert second > ckpt_a, job.report()
    assert job.checkpoints()[-1] == steps, job.report()
    return out


def test_requeue_real_trainer(cluster, tmp_path):
    """The real trainer (2 gloo ranks, tiny demo config) under SLURM: USR1 and external requeue, resume."""
    steps = 60  # tiny steps take ~0.3 s each: enough that the run is still going at the second requeue
    overrides = [f"train.steps={steps}", "checkpoint.interval=1", "checkpoint.keep_last=3", "warmstart.steps=2",
                 "eval.n_prompts=8", "rollout.n_samples=2", "train.prompts_per_step=4",
                 "train.mini_batch_prompts=2", "logging.plot=false", "logging.progress=false",
                 "logging.tensorboard=false"]
    job = _launch(cluster, str(tmp_path / "run"),
                  [DEMO, *overrides, "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
                   "--cpus-per-task", "2", "--env", "OMP_NUM_THREADS=1"], timeout_s=230)
    _exercise_both_requeue_paths(job, steps)
    rows = [json.loads(ln) for ln in open(os.path.join(job.run_dir, "metrics.jsonl"))]
    rl = [r["step"] for r in rows if not r.get("final_eval")]
    assert rl == list(range(rl[0], steps + 1)) and rl[0] in (0, 1), f"steps are not contiguous: {rl}"
    assert os.path.exists(os.path.join(job.run_dir, "summary.json"))

    # the same run uninterrupted (torchrun, 2 ranks; no checkpoints, which change no value and cost 8 s): the
    # requeued run's every value equals its own, at each step, whichever of the three processes logged it
    # (per-rank random streams and sampler positions, the data-parallel exchange of groups, the optimizer
    # state, all restored on both ranks)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "megaprorl.cli", "train", DEMO, *overrides, "checkpoint.interval=0", f"output_dir={tmp_path}",
                        "name=uninterrupted"],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    want = [json.loads(ln) for ln in open(os.path.join(tmp_path, "uninterrupted", "metrics.jsonl"))]
    assert [(w["step"], bool(w.get("final_eval"))) for w in want] == [(g["step"], bool(g.get("final_eval")))
                                                                      for g in rows]
    for got, w in zip(rows, want):
        assert _comparable(got) == _comparable(w), (
            f"step {w['step']} differs: " + ", ".join(f"{k}: {got.get(k)!r} != {v!r}"
                                                      for k, v in _comparable(w).items() if got.get(k) != v))
