"""``megaprorl status``: a run's state from its directory (tests/test_spine.py runs real ones; these are built)."""

import json
import os
import time

from megaprorl import checkpoint as ckpt
from megaprorl.cli import main
from megaprorl.status import WINDOW, status


def _run_dir(tmp_path, steps, total=100, **last):
    """A run directory with ``steps`` metrics rows; the last WINDOW rows take the values in ``last``."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.yaml").write_text(f"name: run\ntrain:\n  steps: {total}\n")
    rows = [{"step": 0, "eval/accuracy": 0.25}]
    for s in range(1, steps + 1):
        row = {"step": s, "reward": 0.5, "entropy": 1.0, "truncated_frac": 0.0, "dynamic_sampling/discarded_frac": 0.3,
               "time/step_s": 60.0, "samples/math": 100, "reward_errors": 0}
        if s > steps - WINDOW:
            row.update(last)
        if s == 25:
            row.update(reference_reset=1.0, reference_reset_trigger="interval")
        rows.append(row)
    rows.append({"step": 20, "eval/accuracy": 0.5})
    with open(d / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(d)


def test_a_healthy_run_in_progress(tmp_path, capsys):
    d = _run_dir(tmp_path, 30)
    ckpt.save(os.path.join(d, "checkpoints"), 20, {}, {"step": 20})
    st = status(d)
    assert st["state"] == "running" and st["step"] == 30 and st["total_steps"] == 100
    assert st["step_s"] == 60.0 and st["eta_s"] == 70 * 60.0
    assert st["checkpoints"] == [20] and st["evaluations"] == [(0, 0.25), (20, 0.5)]
    assert st["resets"] == [(25, "interval")] and st["samples"] == 3000 and st["warnings"] == []
    assert main(["status", d]) == 0
    out = capsys.readouterr().out
    assert f"{d}: running" in out and "step         30 / 100 (30%), 60 s a step" in out and "1h10m to go" in out
    assert "step 20 (newest complete; 1 kept)" in out and "best 0.500 at step 20" in out
    # no row for 20 minutes and no summary: stopped (preempted, killed or failed)
    assert status(d, now=time.time() + 1200)["state"] == "stopped"
    os.makedirs(os.path.join(d, "slurm"))
    for job, age in (("41", 100), ("57", 10)):  # the requeued job's log is the newest
        path = os.path.join(d, "slurm", f"{job}.out")
        open(path, "w").close()
        os.utime(path, (time.time() - age, time.time() - age))
    assert status(d)["slurm_log"] == os.path.join(d, "slurm", "57.out")
    open(os.path.join(d, "summary.json"), "w").close()
    assert status(d, now=time.time() + 1200)["state"] == "finished"


def test_the_ways_a_long_run_goes_wrong_are_flagged(tmp_path):
    d = _run_dir(tmp_path, 40, entropy=0.1, truncated_frac=0.35, **{"dynamic_sampling/discarded_frac": 0.9,
                                                                   "reward_errors": 20, "log/write_errors": 2,
                                                                   "checkpoint/save_errors": 1})
    warnings = status(d)["warnings"]
    assert len(warnings) == 6
    assert warnings[0].startswith("entropy collapsing: 0.1 over the last 10 steps, 10% of the first 10 steps' 1")
    assert warnings[1].startswith("90% of the groups had no signal")
    assert warnings[2].startswith("35% of the responses were cut at rollout.max_new_tokens")
    assert warnings[3].startswith("200 reward errors in 4000 scored samples")
    assert warnings[4].startswith("1 checkpoint(s) could not be written")
    assert warnings[5].startswith("2 failed writes")


def test_a_row_being_written_is_left_out(tmp_path):
    d = _run_dir(tmp_path, 30)
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:
        f.write('{"step": 31, "rew')
    assert status(d)["step"] == 30


def test_no_metrics_is_an_error(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_the_trainer_hears_of_a_trend_once_when_it_starts():
    from megaprorl.status import HealthWatch

    watch, said = HealthWatch(), []
    entropies = [1.0] * 10 + [0.1] * 12 + [1.0] * 10 + [0.1] * 10
    for step, e in enumerate(entropies, 1):
        said += [(step, msg.split(":")[0]) for msg in watch.observe({"entropy": e, "truncated_frac": 0.0})]
        if step == 25:  # a resume restores the watch
            state = json.loads(json.dumps(watch.state_dict()))
            watch = HealthWatch()
            watch.load_state_dict(state)
    # the last-10 mean is first known at step 20 (below 20% of the first 10's), clears at step 24 (two steps of
    # 1.0 in it), falls again at step 41 (one left)
    assert said == [(20, "entropy collapsing"), (41, "entropy collapsing")]
