"""Faults a weeks-long run meets, injected one at a time (docs/reliability.md is the table):
a process killed while it writes a checkpoint, corrupt checkpoints, a non-finite loss or gradient,
a rank that dies or hangs inside a collective.  Resume after SIGKILL / SIGTERM: test_resume_exact.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from megaprorl import checkpoint as ckpt
from megaprorl.runlog import read_metrics
from megaprorl.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo.yaml")


def _state(value: float):
    return {"w": torch.full((4096,), float(value))}


def _loaded_value(path: str) -> float:
    rank_state, trainer_state = ckpt.load(path)
    assert trainer_state["value"] == float(rank_state["w"][0])
    return float(rank_state["w"][0])


def _save(root, step, value, keep_last=5):
    return ckpt.save(str(root), step, _state(value), {"step": step, "value": float(value)}, keep_last)


# ------------------------------------------------------------------------ killed while saving
# A child process saves steps 1 and 2, then dies by SIGKILL at one point of a third save: of
# step 3, or of step 2 again (a re-save, as at the end of a run right after an interval save).
KILL_DURING_SAVE = textwrap.dedent("""
    import json, os, shutil, signal, sys
    import torch
    from megaprorl import checkpoint as ckpt

    root, point = sys.argv[1], sys.argv[2]
    def save(step, value):
        ckpt.save(root, step, {"w": torch.full((4096,), float(value))}, {"step": step, "value": float(value)}, 5)
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    save(1, 1.0)
    save(2, 2.0)
    if point == "rank_file":  # half of the rank file is on disk
        real_save = torch.save
        def torch_save(obj, path, *a, **k):
            real_save(obj, path, *a, **k)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            die()
        torch.save = torch_save
        save(3, 3.0)
    elif point == "trainer_json":  # rank files done, trainer.json half written, no COMPLETE
        def dump(obj, f, **k):
            f.write(json.dumps(obj)[:5])
            f.flush()
            die()
        ckpt.json.dump = dump
        save(3, 3.0)
    elif point in ("rename", "resave_rename"):  # everything written, killed at the rename into place
        real_replace = os.replace
        def replace(src, dst):
            if src.endswith(".tmp"):
                die()
            real_replace(src, dst)
        os.replace = replace
        save(3, 3.0) if point == "rename" else save(2, 22.0)
    elif point == "resave_delete_old":  # the new step 2 is in place, killed deleting the old one
        real_rmtree = shutil.rmtree
        def rmtree(path, *a, **k):
            if path.endswith(".old"):
                os.remove(os.path.join(path, "rank_00000.pt"))  # partway through the deletion
                die()
            real_rmtree(path, *a, **k)
        shutil.rmtree = rmtree
        save(2, 22.0)
    print("not killed")
""")


@pytest.mark.parametrize("point,expect_step,expect_value", [
    ("rank_file", 2, 2.0),
    ("trainer_json", 2, 2.0),
    ("rename", 2, 2.0),
    ("resave_rename", 2, 2.0),  # the previous version of step 2, moved aside as step_2.old
    ("resave_delete_old", 2, 22.0),
])
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, capsys, point, expect_step, expect_value):
    root = tmp_path / "checkpoints"
    script = tmp_path / "save_and_die.py"
    script.write_text(KILL_DURING_SAVE)
    r = subprocess.run([sys.executable, str(script), str(root), point], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)
    leftovers = sorted(os.listdir(root))
    assert len(leftovers) == 3, leftovers  # steps 1 and 2 plus what the killed save left
    path = ckpt.find_latest(str(root), world_size=1)
    assert path is not None and int(os.path.basename(path)[5:13]) == expect_step, (path, leftovers)
    assert _loaded_value(path) == expect_value
    out = capsys.readouterr().out
    if point in ("rank_file", "rename"):
        assert "step_00000003.tmp: an interrupted save" in out
    if point == "trainer_json":
        assert "step_00000003.tmp: an interrupted save" in out
    if point == "resave_rename":
        assert path.endswith("step_00000002.old") and "its re-save was interrupted" in out
    # the next save cleans up after the killed one
    _save(root, 4, 4.0)
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000002", "step_00000004"]
    assert _loaded_value(ckpt.find_latest(str(root), 1)) == 4.0


def test_resave_of_a_step_replaces_it(tmp_path):
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 1, 11.0)
    assert os.listdir(tmp_path) == ["step_00000001"]
    assert _loaded_value(ckpt.find_latest(str(tmp_path), 1)) == 11.0


# ------------------------------------------------------------------------ corrupt checkpoints
def test_corrupt_checkpoints_are_reported_and_skipped(tmp_path, capsys):
    for s in range(1, 6):
        _save(tmp_path, s, float(s))
    d = {s: tmp_path / f"step_{s:08d}" for s in range(1, 6)}
    # step 5: rank file truncated (what a full disk or a killed copy leaves)
    rank5 = d[5] / "rank_00000.pt"
    with open(rank5, "r+b") as f:
        f.truncate(os.path.getsize(rank5) - 100)
    path = ckpt.find_latest(str(tmp_path), 1)
    assert path == str(d[4]) and _loaded_value(path) == 4.0
    out = capsys.readouterr().out
    assert f"skipping {d[5]}" in out and "bytes" in out and "truncated" in out
    # step 4: no COMPLETE marker
    os.remove(d[4] / "COMPLETE")
    # step 3: rank file overwritten with garbage of the same size (the size check passes, the archive does not)
    rank3 = d[3] / "rank_00000.pt"
    rank3.write_bytes(b"\0" * os.path.getsize(rank3))
    # step 2: trainer.json cut short
    (d[2] / "trainer.json").write_text('{"step": 2, "val')
    path = ckpt.find_latest(str(tmp_path), 1)
    assert path == str(d[1]) and _loaded_value(path) == 1.0
    out = capsys.readouterr().out
    assert f"skipping {d[4]}: incomplete (no COMPLETE marker)" in out
    assert f"skipping {d[3]}: unreadable" in out
    assert f"skipping {d[2]}: unreadable" in out
    # another world size: not loadable by this run
    assert ckpt.find_latest(str(tmp_path), 2) is None
    assert "saved with world size 1, this run has 2" in capsys.readouterr().out
    # an explicit path is validated too; a missing rank file is named
    os.remove(d[1] / "rank_00000.pt")
    assert "missing or empty" in ckpt.validate(str(d[1]), 1)
    assert ckpt.find_latest(str(tmp_path), 1) is None


def test_checkpoint_without_file_sizes_still_validates(tmp_path):
    """Checkpoints written before COMPLETE recorded the rank files' sizes stay loadable."""
    path = _save(tmp_path, 7, 7.0)
    with open(os.path.join(path, "COMPLETE"), "w") as f:
        json.dump({"step": 7, "world_size": 1}, f)
    assert ckpt.validate(path, 1) is None
    with open(os.path.join(path, "rank_00000.pt"), "r+b") as f:
        f.truncate(1000)
    assert "unreadable" in ckpt.validate(path, 1)


# ------------------------------------------------------------------------ metrics.jsonl on resume
def test_metrics_after_resume_hold_each_step_once(tmp_path):
    from megaprorl.runlog import RunLogger, read_metrics

    log = RunLogger(str(tmp_path), tensorboard=False, progress=False)
    for s in range(0, 6):
        log.log(s, {"reward": float(s)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "eval/accuracy": 0.5, "final_eval": 1}) + "\n")
        f.write('{"step": 6, "rew')  # torn by the kill
    # resumed from the checkpoint of step 3: rows 4, 5, the final evaluation and the torn line go
    log = RunLogger(str(tmp_path), tensorboard=False, progress=False, initial_step=3, resume=True)
    for s in range(4, 6):
        log.log(s, {"reward": 10.0 + s})
    log.close()
    rows = read_metrics(str(tmp_path))
    assert [(r["step"], r["reward"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    # killed after the final evaluation of step 5 was logged, resumed from the checkpoint of step 5:
    # the resumed run evaluates again, so the old final-evaluation record goes
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "eval/accuracy": 0.5, "final_eval": 1}) + "\n")
    RunLogger(str(tmp_path), tensorboard=False, progress=False, initial_step=5, resume=True).close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4, 5]
    assert not any(r.get("final_eval") for r in read_metrics(str(tmp_path)))
    # a run started afresh (no resume) starts a new file
    RunLogger(str(tmp_path), tensorboard=False, progress=False).close()
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_metrics_survive_a_spell_of_failed_writes(tmp_path, capsys):
    """metrics.jsonl that cannot be written for two steps (a directory in its place, as a full or vanished
    file system would refuse it): the run goes on, one line says so and one says it recovered, the held
    records are written in order with the failures counted, and a torn tail is cut back before appending."""
    from megaprorl.runlog import RunLogger, read_metrics

    log = RunLogger(str(tmp_path), tensorboard=False, progress=False)
    path = tmp_path / "metrics.jsonl"
    log.log(0, {"reward": 0.0})
    log.log(1, {"reward": 1.0})
    os.rename(path, tmp_path / "aside")
    os.mkdir(path)
    log.log(2, {"reward": 2.0})
    log.log(3, {"reward": 3.0})
    os.rmdir(path)
    os.rename(tmp_path / "aside", path)
    log.log(4, {"reward": 4.0})
    with open(path, "a") as f:
        f.write('{"step": 5, "rew')  # what a write cut short by a full disk leaves
    log.log(5, {"reward": 5.0})
    log.close()
    rows = read_metrics(str(tmp_path))
    assert [(r["step"], r["reward"]) for r in rows] == [(s, float(s)) for s in range(6)]
    assert [r.get("log/write_errors", 0) for r in rows] == [0, 0, 0, 1, 2, 2]
    out = capsys.readouterr().out
    assert out.count("metrics: cannot write") == 1 and "2 record(s) kept in memory" not in out
    assert "1 record(s) kept in memory" in out and "with the 3 record(s) held since the failure" in out


def test_metrics_still_unwritten_at_close_go_to_the_log(tmp_path, capsys):
    from megaprorl.runlog import RunLogger

    log = RunLogger(str(tmp_path), tensorboard=False, progress=False)
    os.mkdir(tmp_path / "metrics.jsonl")
    log.log(1, {"reward": 0.5})
    log.close()
    log.log_final(1, {"eval/accuracy": 0.25})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("metrics (unwritten): ")]
    recs = [json.loads(ln.split(": ", 1)[1]) for ln in lines]
    assert recs == [{"step": 1, "reward": 0.5}, {"step": 1, "eval/accuracy": 0.25, "final_eval": 1}]


def test_a_diagnostic_file_that_cannot_be_written_is_counted_and_skipped(tmp_path, capsys):
    """Per-prompt evaluation rows and rollout dumps (Trainer._write_aside): said each time, counted with the
    logger's failures, the run goes on."""
    from types import SimpleNamespace

    from megaprorl import evaluation
    from megaprorl.runlog import RunLogger
    from megaprorl.trainer import Trainer

    log = RunLogger(str(tmp_path), tensorboard=False, progress=False)
    fake = SimpleNamespace(logger=log, _warn=print)
    (tmp_path / "rollouts").write_text("a file where the directory should be")
    for step in (1, 2):
        Trainer._write_aside(fake, evaluation.write_jsonl, str(tmp_path / "rollouts" / f"step_{step}.jsonl"), [{}])
    assert log.write_errors == 2 and capsys.readouterr().out.count("the run goes on without it") == 2
    Trainer._write_aside(fake, evaluation.write_jsonl, str(tmp_path / "ok.jsonl"), [{"a": 1}])
    assert log.write_errors == 2 and (tmp_path / "ok.jsonl").read_text() == '{"a": 1}\n'
    log.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer thread's death
def test_tensorboard_writer_is_remade_after_its_thread_dies(tmp_path, capsys):
    """Its event directory removed under it, TensorBoard's writer thread dies and re-raises on every later call;
    the logger reports it, remakes the writer at the next step and gives it the step the dead one lost."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megaprorl.runlog import RunLogger, read_metrics

    log = RunLogger(str(tmp_path), progress=False)
    log.log(1, {"reward": 1.0})
    shutil.rmtree(tmp_path / "tb")
    log.log(2, {"reward": 2.0})
    log.log(3, {"reward": 3.0})
    log.close()
    out = capsys.readouterr().out
    assert out.count("TensorBoard: cannot write") == 1 and "TensorBoard: writing to" in out
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(2, 2.0), (3, 3.0)]
    assert [r.get("log/write_errors", 0) for r in read_metrics(str(tmp_path))] == [0, 0, 1]


# ------------------------------------------------------------------------ trainer-level faults
TINY = ["warmstart.steps=5", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
        "rollout.n_samples=4", "eval.n_prompts=8", "logging.progress=false", "logging.tensorboard=false",
        "logging.plot=false", "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "rewards.num_workers=0", "algo.dynamic_sampling.enabled=false", "train.optim.max_nonfinite_in_a_row=3"]


def _overrides(tmp_path, *extra):
    return [f"output_dir={tmp_path}", *TINY, *extra]


def _trainer(tmp_path, *extra):
    from megaprorl.trainer import Trainer

    return Trainer(load_config(DEMO, _overrides(tmp_path, *extra)))


def _snapshot(t):
    weights = {k: v.detach().clone() for k, v in t.policy.model.state_dict().items() if isinstance(v, torch.Tensor)}
    opt = {i: {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
           for i, st in enumerate(t.policy.adam_states())}
    return weights, opt


def _same(a, b) -> bool:
    (wa, oa), (wb, ob) = a, b
    return (wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and oa.keys() == ob.keys()
            and all(oa[i].keys() == ob[i].keys() and all(torch.equal(oa[i][k], ob[i][k]) for k in oa[i]) for i in oa))


@pytest.fixture
def poison(monkeypatch):
    """While ``poison["on"]``, the advantages the trainer computes are NaN: the real loss, backward and
    gradient norm then see the NaN (nothing in the policy's update path is replaced)."""
    import megaprorl.trainer as tr

    state = {"on": False}
    real = tr.token_advantages

    def token_advantages(*a, **k):
        adv = real(*a, **k)
        return torch.full_like(adv, float("nan")) if state["on"] else adv

    monkeypatch.setattr(tr, "token_advantages", token_advantages)
    return state


def test_nonfinite_update_is_skipped_and_k_in_a_row_stop_the_run(tmp_path, capsys, poison):
    from megaprorl.trainer import NonFiniteError

    t = _trainer(tmp_path)
    try:
        def step():
            stats = t.rl_step()
            t.step += 1
            return stats

        before = _snapshot(t)
        poison["on"] = True
        stats = step()  # 2 optimizer steps, both skipped: 2 in a row
        assert stats["skipped_updates"] == 2.0 and stats["optimizer_steps"] == 2.0
        assert not torch.isfinite(torch.tensor(stats["grad_norm"]))
        assert _same(before, _snapshot(t)), "a skipped update changed the weights or the optimizer state"
        out = capsys.readouterr().out
        assert "[non-finite] RL step 1, optimizer step 1/2" in out and "update skipped (2 in a row" in out

        poison["on"] = False
        stats = step()  # a finite step updates and restarts the count
        assert stats["skipped_updates"] == 0.0 and t.nonfinite_in_a_row == 0
        after_update = _snapshot(t)
        assert not _same(before, after_update), "the finite step did not update (the checks above prove nothing)"
        before = after_update

        poison["on"] = True
        step()
        assert t.nonfinite_in_a_row == 2
        with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row had a non-finite loss or gradient "
                                                 r"\(RL step 4\); stopping"):
            step()
        assert _same(before, _snapshot(t))
    finally:
        t.close()


def test_nonfinite_stops_the_cli_with_a_clear_message(tmp_path, capsys, poison):
    from megaprorl.cli import main

    poison["on"] = True
    rc = main(["train", DEMO, *_overrides(tmp_path, "train.steps=5")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "error: 3 optimizer steps in a row had a non-finite loss or gradient (RL step 2)" in captured.err
    assert "Lower train.optim.lr or check the data." in captured.err
    assert captured.out.count("[non-finite]") == 3


def test_preemption_right_after_an_interval_checkpoint_saves_once(tmp_path, capsys, monkeypatch):
    """SIGTERM/SIGUSR1 at a step the interval already checkpointed: no second save of the same state."""
    import megaprorl.trainer as tr

    saves = []
    real_save = tr.ckpt.save

    def save(root, step, *a, **k):
        saves.append(step)
        return real_save(root, step, *a, **k)

    monkeypatch.setattr(tr.ckpt, "save", save)
    t = _trainer(tmp_path, "train.steps=3", "checkpoint.interval=1")
    try:
        t.preempt.requested, t.preempt.signal = True, "SIGTERM"  # as the handler does
        summary = t.run()
    finally:
        t.close()
    assert summary["exit_code"] == tr.EXIT_REQUEUE and t.step == 1
    assert saves == [1]
    assert "SIGTERM received: checkpointed step 1, exiting with 3" in capsys.readouterr().out
    assert ckpt.find_latest(t.ckpt_dir, 1).endswith("step_00000001")


def test_resume_auto_refuses_to_start_over_when_every_checkpoint_is_broken(tmp_path, capsys):
    t = _trainer(tmp_path, "checkpoint.resume=auto")
    try:
        assert t._resume_path() is None  # no checkpoint yet: a fresh start
        path = t.save_checkpoint()
        assert t._resume_path() == path
        rank = os.path.join(path, "rank_00000.pt")
        with open(rank, "r+b") as f:
            f.truncate(os.path.getsize(rank) // 2)
        with pytest.raises(ValueError, match="has checkpoints but none is usable"):
            t._resume_path()
        assert "truncated" in capsys.readouterr().out
    finally:
        t.close()


# ------------------------------------------------------------------------ a save that fails on one rank
def _two_ranks(worker, root):
    """``worker(rank, port, root, queue)`` in two spawned processes (a gloo group of two); {rank: what it put}."""
    import multiprocessing as mp

    from dist_utils import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, port, root, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        return dict(queue.get(timeout=120) for _ in range(2))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _failing_save_worker(rank, port, root, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = []
    ckpt.save(root, 1, {"x": 1}, {"step": 1})
    real_save = torch.save

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    def model_on_rank_0(d):
        if rank == 0:
            raise OSError(122, "Disk quota exceeded")
        os.makedirs(d, exist_ok=True)

    for label, patch, write_model in (("rank file", rank == 1, None), ("model", False, model_on_rank_0)):
        torch.save = full_disk if patch else real_save
        try:
            ckpt.save(root, 2, {"x": 2}, {"step": 2}, write_model=write_model)
            out.append((label, "saved"))
        except ckpt.CheckpointWriteError as e:
            out.append((label, str(e)))
        torch.save = real_save
        dist.barrier()
        out.append((label, sorted(os.listdir(root))))
        dist.barrier()  # both have looked before rank 0 starts the next save (its step_2.tmp)
    ckpt.save(root, 2, {"x": 2}, {"step": 2})  # the disk has room again
    out.append(("after", sorted(os.listdir(root))))
    queue.put((rank, out))
    dist.destroy_process_group()


def test_a_save_that_fails_on_one_rank_fails_on_every_rank_and_leaves_the_last_checkpoint(tmp_path):
    """Before, the rank whose write failed raised while the others waited at the save's next barrier (until the
    collective timeout, or the launcher killed them)."""
    results = _two_ranks(_failing_save_worker, str(tmp_path))
    assert results[0] == results[1]
    (_, rank_file), (_, left), (_, model), (_, left2), (_, after) = results[0]
    assert rank_file == "writing the rank files failed on rank 1: OSError: [Errno 28] No space left on device"
    assert model == "writing the model state failed on rank 0: OSError: [Errno 122] Disk quota exceeded"
    assert left == left2 == ["step_00000001"]  # no step_2.tmp left behind
    assert after == ["step_00000001", "step_00000002"]
    assert ckpt.find_latest(str(tmp_path), 2).endswith("step_00000002")


def test_the_run_goes_on_past_a_checkpoint_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    """A failed interval save is reported and counted; the run trains on and the next interval saves."""
    import megaprorl.trainer as tr

    real_save, calls = tr.ckpt.save, []

    def save(root, step, *a, **k):
        calls.append(step)
        if step == 1:
            raise ckpt.CheckpointWriteError("writing the rank files failed on rank 0: OSError: [Errno 28] No space")
        return real_save(root, step, *a, **k)

    monkeypatch.setattr(tr.ckpt, "save", save)
    t = _trainer(tmp_path, "train.steps=2", "checkpoint.interval=1", "eval.at_start=false")
    try:
        summary = t.run()
    finally:
        t.close()
    assert summary["exit_code"] == 0 and calls == [1, 2, 2]  # step 2 by the interval, then the final save
    assert "[checkpoint] step 1 was not saved (writing the rank files failed on rank 0" in capsys.readouterr().out
    rows = [r for r in read_metrics(t.run_dir) if not r.get("final_eval")]
    assert [r.get("checkpoint/save_errors") for r in rows] == [None, 1]
    assert ckpt.find_latest(t.ckpt_dir, 1).endswith("step_00000002")


# ------------------------------------------------------------------------ ranks agree on the checkpoint
def _agree_worker(rank, port, root, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = []

    def attempt(choose):
        try:
            out.append(("ok", ckpt.agree(choose, 1)))
        except ValueError as e:
            out.append(("error", str(e)))

    # rank 1's own choice would be another step: rank 0's is the one taken
    attempt(lambda: ckpt.find_latest(root, 1) if rank == 0 else ckpt.step_dir(root, 1))

    def refuse():
        raise ValueError("checkpoint.resume=auto: none is usable")

    attempt(refuse if rank == 0 else None)  # rank 0's error reaches rank 1 (which would hang waiting otherwise)
    if rank == 1:  # a client whose view of the directory lags (the stand-in for a stale file-system cache)
        ckpt.validate = lambda path, world_size: "no COMPLETE marker"
    attempt(lambda: ckpt.find_latest(root, 1))
    queue.put((rank, out))
    dist.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path):
    for step in (1, 2):
        ckpt.save(str(tmp_path), step, {"x": step}, {"step": step})
    results = _two_ranks(_agree_worker, str(tmp_path))
    latest = ckpt.step_dir(str(tmp_path), 2)
    for rank in (0, 1):
        chosen, refused, stale = results[rank]
        assert chosen == ("ok", latest)
        assert refused == ("error", "checkpoint.resume=auto: none is usable")
        assert stale == ("error", f"checkpoint {latest}, chosen by rank 0, is not usable on rank 1: no COMPLETE "
                                  "marker; do all ranks see the same checkpoint directory?")


# ------------------------------------------------------------------------ dead or hung rank
def _collectives_with_a_dead_peer(rank, port, mode, timeout_s, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from megaprorl.parallel import dp_group, init_distributed

    init_distributed(timeout_s=timeout_s)
    dist.barrier()
    if rank == 1:
        if mode == "exit":
            os._exit(0)  # dies without a word
        time.sleep(120)  # alive but never joins a collective again (a hang on that rank)
        os._exit(0)
    # Megatron's DP group (it carries the gradient all-reduce), then the world group
    for name, group in (("dp", dp_group()), ("world", None)):
        t0 = time.time()
        try:
            dist.all_reduce(torch.ones(4), group=group)
            queue.put((name, "returned", time.time() - t0))
        except Exception as e:  # noqa: BLE001 - report what the surviving rank sees
            queue.put((name, f"{type(e).__name__}: {e}", time.time() - t0))
    queue.close()
    queue.join_thread()  # flushed before the hard exit (no process-group teardown with a dead peer)
    os._exit(0)


@pytest.mark.parametrize("mode", ["hang", "exit"])
def test_collective_with_a_dead_or_hung_rank_raises_within_the_timeout(mode):
    """parallel.timeout_s bounds the world group and Megatron's groups: before it was passed to
    Megatron, its groups kept their 30-minute default and this test hung on the DP group."""
    import multiprocessing as mp

    from dist_utils import _free_port

    timeout_s = 4.0
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_collectives_with_a_dead_peer, args=(r, port, mode, timeout_s, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=90) for _ in range(2)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=30)
    assert [name for name, _, _ in results] == ["dp", "world"]
    for name, what, waited in results:
        assert what != "returned", f"the {name} all-reduce completed without the other rank"
        assert waited < timeout_s + 10, f"rank 0 waited {waited:.1f} s on the {name} group ({what})"
        if mode == "hang":
            assert waited >= timeout_s - 0.5 and "Timed out" in what, (name, waited, what)


def test_every_generate_samples_the_policys_latest_weights(tmp_path):
    """The contract an engine with its own copy of the weights (``rollout.engine=trtllm``) relies on: the trainer
    calls ``update_weights`` after every change to the policy (the warm-start's SFT steps, each RL update) and
    before the next ``generate`` (training draws and evaluations alike)."""
    t = _trainer(tmp_path, "train.steps=2", "eval.interval=1")
    eng = t.engine
    seen = {"synced": None, "generates": 0}

    def checksum():
        return sum(float(p.detach().double().sum()) for p in t.policy.model.parameters())

    real_update, real_generate = eng.update_weights, eng.generate

    def update_weights(step=None):
        seen["synced"] = checksum()
        return real_update(step)

    def generate(*a, **k):
        assert seen["synced"] == checksum(), "generate() after a policy change that update_weights() did not follow"
        seen["generates"] += 1
        return real_generate(*a, **k)

    eng.update_weights, eng.generate = update_weights, generate
    update_weights(0)  # what building the engine does (the TensorRT-LLM engine refits once there)
    t.run()
    assert seen["generates"] >= 4  # the evaluation before RL, two steps' draws, the evaluations after them


def test_overlong_prompts_are_skipped_counted_and_replaced(tmp_path):
    """``data.max_prompt_tokens``: no rollout has a longer prompt, the skipped ones are counted in the step's
    metrics, the batch still has all its groups; a limit no prompt meets is a config error, not a hang."""
    t = _trainer(tmp_path, "train.steps=1", "data.max_prompt_tokens=5")  # the built-in prompts: 4 to 6 tokens
    groups, stats = t._draw_groups()
    assert len(groups) == t.cfg.train.prompts_per_step
    assert all(len(r.prompt_ids) <= 5 for g in groups for r in g["rollouts"])
    assert stats["data/skipped_long_prompts"] > 0
    t.close()
    t = _trainer(tmp_path / "b", "train.steps=1", "data.max_prompt_tokens=2")
    with pytest.raises(ConfigError, match="'data.max_prompt_tokens': .* longer than 2 tokens"):
        t._draw_groups()
    t.close()


def test_prompts_whose_budget_runs_past_the_models_positions_are_skipped(tmp_path):
    """A training prompt whose response budget would run past ``model.max_position_embeddings`` is skipped and
    counted as data.max_prompt_tokens skips (10 positions, a 5-token budget: prompts of at most 5 tokens), and a
    budget that leaves no prompt room is an error naming the key."""
    fit = ["model.max_position_embeddings=10", "eval.max_new_tokens=4", "train.steps=1"]
    t = _trainer(tmp_path, *fit, "rollout.max_new_tokens=5")
    groups, stats = t._draw_groups()
    assert len(groups) == t.cfg.train.prompts_per_step and stats["data/skipped_long_prompts"] > 0
    assert all(len(r.prompt_ids) + 5 <= 10 for g in groups for r in g["rollouts"])
    t.close()
    t = _trainer(tmp_path / "b", *fit, "rollout.max_new_tokens=8")
    with pytest.raises(ConfigError, match="'model.max_position_embeddings': .* longer than 2 tokens"):
        t._draw_groups()
    t.close()


def _tp2_with_a_rank_dependent_verifier(rank, world, out_dir):
    """One RL step and one evaluation at TP=2, with a verifier whose answer depends on the rank it runs on (what a
    time limit hit on one rank and not on the other does to a reward)."""
    from megatron.core import parallel_state as mps

    from megaprorl.data.builtin import DOMAIN
    from megaprorl.rewards.base import register_verifier
    from megaprorl.trainer import Trainer

    calls = []

    def flaky(record, response):
        calls.append(response)
        return float((len(response) + rank) % 2)

    register_verifier(DOMAIN, flaky)
    t = Trainer(load_config(DEMO, _overrides(os.path.join(out_dir, str(rank)), "parallel.tensor_parallel=2",
                                             "model.num_query_groups=2")))
    try:
        groups, stats = t._draw_groups()
        ev = t.evaluate(greedy=True)
        return dict(calls=len(calls), pool=t.rewards is not None, reward=stats["reward"],
                    rewards=[g["reward"].tolist() for g in groups], accuracy=ev["eval/accuracy"])
    finally:
        t.close()
        mps.destroy_model_parallel()


def test_a_model_parallel_group_scores_once_and_its_ranks_share_the_rewards(tmp_path):
    """The verifiers run on the group's first rank only (no reward pool on the others), and every rank of the
    group trains and evaluates on those results, even when a verifier would answer differently elsewhere."""
    from dist_utils import run_distributed

    r0, r1 = run_distributed(_tp2_with_a_rank_dependent_verifier, world_size=2, args=(str(tmp_path),), timeout=600)
    assert r0["pool"] and not r1["pool"]
    assert r0["calls"] > 0 and r1["calls"] == 0
    assert r0["rewards"] == r1["rewards"] and r0["reward"] == r1["reward"]
    assert r0["accuracy"] == r1["accuracy"]
