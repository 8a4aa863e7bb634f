"""The run logger's Weights & Biases output (logging.wandb_project), with the real wandb in offline mode."""

import glob
import os

import pytest

from megaprorl.runlog import RunLogger


def _offline_records(run_dir, run_id):
    """The bytes of every offline W&B run of ``run_id`` under ``run_dir``, oldest first (one directory per
    process: ``offline-run-<second>-<id>``, with a ``-1``, ``-2`` ... suffix when two start in the same second)."""
    paths = glob.glob(os.path.join(run_dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
    paths += glob.glob(os.path.join(run_dir, "wandb", f"offline-run-*-{run_id}-*", f"run-{run_id}.wandb"))
    paths.sort(key=os.path.getmtime)
    return [open(p, "rb").read() for p in paths]


def test_wandb_logs_the_scalars_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    """Offline (no network here): the scalars of each step reach the run's record file (history items keep
    their keys and JSON values as text), non-numeric values are left out as for TensorBoard, and a resumed
    logger reuses the run id kept in the run directory, so `wandb sync` continues one W&B run."""
    pytest.importorskip("wandb", reason="pip install wandb (in the dev extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = str(tmp_path / "run")
    log = RunLogger(run_dir, tensorboard=False, progress=False, wandb_project="megaprorl-test", run_name="t",
                    config={"algo": {"kl": {"coef": 1e-4}}})
    log.log(1, {"reward": 0.3125, "rollout/own_key_share": 0.71875, "note": "not a scalar"})
    log.close()
    run_id = open(os.path.join(run_dir, "wandb_run_id")).read().strip()
    (first,) = _offline_records(run_dir, run_id)
    assert b"rollout/own_key_share" in first and b"0.71875" in first and b"0.3125" in first
    assert b"not a scalar" not in first
    assert b"coef" in first  # the config

    log = RunLogger(run_dir, tensorboard=False, progress=False, initial_step=1, resume=True,
                    wandb_project="megaprorl-test", run_name="t")
    log.log(2, {"reward": 0.5625})
    log.close()
    assert open(os.path.join(run_dir, "wandb_run_id")).read().strip() == run_id
    runs = _offline_records(run_dir, run_id)  # one directory per process, named by the second it started
    assert len(runs) == 2 and b"0.5625" in runs[-1] and b"0.5625" not in runs[0]


def test_wandb_project_without_wandb_is_a_config_error(monkeypatch, tmp_path):
    import importlib.util

    from megaprorl.config import ConfigError, load_config

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.yaml")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="logging.wandb_project.*wandb is not installed"):
        load_config(demo, ["logging.wandb_project=p"])
    assert load_config(demo, []).logging.wandb_project == ""
    with pytest.raises(ConfigError, match="logging.wandb_project.*wandb is not installed"):  # built directly
        RunLogger(str(tmp_path / "run"), tensorboard=False, progress=False, wandb_project="p")
