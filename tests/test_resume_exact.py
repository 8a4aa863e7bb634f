"""Resume exactness: a run killed (SIGKILL mid-step) or preempted (SIGTERM) and resumed with
``checkpoint.resume=auto`` continues exactly as the uninterrupted run with the same seed.

Every run is a ``python -m megaprorl.cli train`` subprocess on the tiny demo config (single-digit
addition, so the warm-started policy earns some reward) with everything that carries state across
steps switched on: warm-start, dynamic sampling (extra draws move the prompt stream; the first draw
sized by the running signal rate of the steps before), the length-penalty on/off schedule, in-loop
evaluation, reference resets with the interval, KL-spike and validation-stall triggers armed (the
controller's EMA, counters and pending list), two optimizer steps per RL step (AdamW moments), a reward
worker process.

Compared from the resume point on: every per-step metric in ``metrics.jsonl`` except wall-clock
timings must be *equal* (not close), each step must appear exactly once, and the final checkpoint's
policy, optimizer and reference tensors must be bit-identical to the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo.yaml")
STEPS = 8
CONFIG = [f"train.steps={STEPS}", "checkpoint.interval=2", "checkpoint.keep_last=2", "seed=77",
          "warmstart.steps=40", "data.builtin_max_digits=1",
          "model.num_layers=1", "model.hidden_size=64", "model.ffn_hidden_size=128",
          "rollout.n_samples=4", "train.prompts_per_step=8", "train.mini_batch_prompts=4",
          "eval.n_prompts=8", "eval.interval=3",
          "algo.reference_reset.interval=3", "algo.reference_reset.kl_spike_factor=3",
          "algo.reference_reset.kl_warmup_steps=2", "algo.reference_reset.stall_evals=1",
          "algo.length_penalty.enabled=true", "algo.length_penalty.on_steps=2", "algo.length_penalty.off_steps=3",
          "algo.dynamic_sampling.first_draw_oversample=true",
          "rewards.num_workers=1", "logging.plot=false", "logging.progress=false", "logging.tensorboard=false"]
# wall-clock measurements and what the process holds (memory/, host/: a resumed process has not run the steps
# before): the only metrics allowed to differ between two runs of the same seed
TIMING_KEYS = ("step_time_s", "tokens_per_s")
MEASURED = ("time/", "perf/", "memory/", "host/")

pytestmark = pytest.mark.slow  # five training processes: ~60 s on a 2-core CPU


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return env


def _cmd(out_dir, name, *extra):
    return [sys.executable, "-m", "megaprorl.cli", "train", DEMO, f"output_dir={out_dir}", f"name={name}",
            *CONFIG, *extra]


def _run(out_dir, name, *extra):
    return subprocess.run(_cmd(out_dir, name, *extra), cwd=out_dir, env=_env(), capture_output=True, text=True,
                          timeout=300)


def _start(out_dir, name, *extra):
    """The trainer in its own session (its process group holds its reward worker and forkserver too);
    its output goes to ``out_dir/NAME.log``."""
    log = open(os.path.join(out_dir, f"{name}.log"), "w")
    try:
        return subprocess.Popen(_cmd(out_dir, name, *extra), cwd=out_dir, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def _log(out_dir, name):
    with open(os.path.join(out_dir, f"{name}.log")) as f:
        return f.read()


def _group_alive(pgid) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _rows(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):  # a line being written is not a row yet
                out.append(json.loads(line))
    return out


def _complete_steps(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n[5:]) for n in os.listdir(d)
                  if n.startswith("step_") and n[5:].isdigit() and os.path.exists(os.path.join(d, n, "COMPLETE")))


def _wait_for_row(proc, run_dir, step, timeout=240):
    """Poll (10 ms) until the metrics row of RL step ``step`` is written; the trainer is then in step+1."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] == step and "reward" in r for r in _rows(run_dir)):
            return
        if proc.poll() is not None:
            log = _log(os.path.dirname(run_dir), os.path.basename(run_dir))
            pytest.fail(f"the run ended (rc {proc.returncode}) before step {step}:\n{log[-4000:]}")
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for step {step}")


def _cleanup(proc):
    """Whatever an assertion left running in the trainer's process group (started by this test)."""
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(MEASURED) and k not in TIMING_KEYS}


def _assert_same_rows(resumed_dir, reference_rows, from_step):
    rows = _rows(resumed_dir)
    steps = [r["step"] for r in rows if not r.get("final_eval")]
    assert steps == list(range(STEPS + 1)), f"each step exactly once, in order: {steps}"
    assert sum(1 for r in rows if r.get("final_eval")) == 1
    assert len(rows) == len(reference_rows)
    for got, want in zip(rows, reference_rows):
        assert _comparable(got) == _comparable(want), (
            f"step {want['step']} (resumed from {from_step}) differs:\n"
            + "\n".join(f"  {k}: {got.get(k)!r} != {v!r}" for k, v in _comparable(want).items()
                        if got.get(k) != v))


def _dist_tensors(ckpt_dir, tmp):
    """Every tensor of a checkpoint's dist_checkpointing directory (policy, AdamW moments, reference),
    read without a process group through torch's DCP -> torch.save converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(tmp, "flat.pt")
    dcp_to_torch_save(os.path.join(ckpt_dir, "model"), out)
    return torch.load(out, weights_only=False)


def _assert_same_final_checkpoint(a_dir, b_dir, tmp_path):
    name = f"step_{STEPS:08d}"
    ta_, tb_ = (_dist_tensors(os.path.join(d, "checkpoints", name), tmp_path) for d in (a_dir, b_dir))
    assert ta_.keys() == tb_.keys()
    for part in ("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq.", "reference."):
        assert any(k.startswith(part) for k in ta_), f"no {part}* tensors in the checkpoint"
    for k in ta_:
        if isinstance(ta_[k], torch.Tensor):
            assert torch.equal(ta_[k], tb_[k]), f"{k} differs"
    common_a, common_b = (torch.load(os.path.join(d, "checkpoints", name, "model", "common.pt"), weights_only=False)
                          for d in (a_dir, b_dir))
    assert common_a.get("optimizer_updates") == common_b.get("optimizer_updates") and common_a.get("optimizer_updates", 0) > 0
    a = torch.load(os.path.join(a_dir, "checkpoints", name, "rank_00000.pt"), weights_only=False)
    b = torch.load(os.path.join(b_dir, "checkpoints", name, "rank_00000.pt"), weights_only=False)
    assert a["source"] == b["source"]
    assert a["rng"]["python"] == b["rng"]["python"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    na, nb = a["rng"]["numpy"], b["rng"]["numpy"]
    assert na[0] == nb[0] and (na[1] == nb[1]).all() and na[2:] == nb[2:]
    ta = json.load(open(os.path.join(a_dir, "checkpoints", name, "trainer.json")))
    tb = json.load(open(os.path.join(b_dir, "checkpoints", name, "trainer.json")))
    ta.pop("config"), tb.pop("config")
    assert ta == tb


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    r = _run(out, "ref")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = os.path.join(out, "ref")
    rows = _rows(run_dir)
    resets = json.load(open(os.path.join(run_dir, "summary.json")))["resets"]
    # the config must exercise the state it claims to: verifier reward, several reset triggers, the
    # penalty on and off, extra draws
    assert sum(1 for r in rows if r.get("reward", 0) > 0) >= 3, [r.get("reward") for r in rows]
    assert len(resets) >= 2 and len({t for _, t in resets}) >= 2, resets
    assert {r.get("length_penalty/on") for r in rows if "reward" in r} == {0.0, 1.0}
    assert any(r.get("dynamic_sampling/draws", 1) > 1 for r in rows)
    # and a run of evaluations, checkpoints and resets leaks no descriptor and no process: from step 3 on (one of
    # each done) every step ends with the same open files and the same processes below the trainer
    steady = [r for r in rows if "host/open_fds" in r and r["step"] >= 3]
    assert len(steady) == STEPS - 2
    assert len({r["host/open_fds"] for r in steady}) == 1, [r["host/open_fds"] for r in steady]
    # (the reward worker, the forkserver it comes from, and multiprocessing's resource tracker)
    assert {r["host/descendants"] for r in steady} == {3.0}
    return run_dir, rows


def test_sigkill_mid_step_then_resume_is_exact(reference, tmp_path):
    ref_dir, ref_rows = reference
    run_dir = os.path.join(tmp_path, "run")
    proc = _start(tmp_path, "run")
    try:
        _wait_for_row(proc, run_dir, 3)  # step 2 is checkpointed, step 3 logged; the trainer is in step 4
        os.kill(proc.pid, signal.SIGKILL)  # the trainer only, not its process group
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        deadline = time.time() + 20  # its reward worker and the forkserver notice and exit
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _group_alive(proc.pid), "processes of the killed trainer were left running"
    finally:
        _cleanup(proc)
    assert _complete_steps(run_dir) == [2], "not killed mid-step 4 (step 4 got checkpointed first)"
    assert max(r["step"] for r in _rows(run_dir)) == 3  # step 3 ran but is not in any checkpoint

    r = _run(tmp_path, "run", "checkpoint.resume=auto")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_00000002 at step 2" in r.stdout, r.stdout[-2000:]
    _assert_same_rows(run_dir, ref_rows, 2)
    _assert_same_final_checkpoint(ref_dir, run_dir, tmp_path)


def test_sigterm_checkpoints_exits_3_then_resume_is_exact(reference, tmp_path):
    ref_dir, ref_rows = reference
    run_dir = os.path.join(tmp_path, "run")
    proc = _start(tmp_path, "run")
    try:
        _wait_for_row(proc, run_dir, 5)  # between checkpoints 4 and 6
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        _cleanup(proc)
    out = _log(tmp_path, "run")
    assert proc.returncode == 3, out[-3000:]
    stopped = max(r["step"] for r in _rows(run_dir))
    assert stopped in (5, 6), stopped  # the step in progress was finished, nothing after it was started
    assert _complete_steps(run_dir)[-1] == stopped
    assert f"SIGTERM received: checkpointed step {stopped}, exiting with 3" in out
    assert not any(r.get("final_eval") for r in _rows(run_dir))

    r = _run(tmp_path, "run", "checkpoint.resume=auto")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"at step {stopped}" in r.stdout, r.stdout[-2000:]
    _assert_same_rows(run_dir, ref_rows, stopped)
    _assert_same_final_checkpoint(ref_dir, run_dir, tmp_path)
