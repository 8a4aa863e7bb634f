"""Adaptive entropy control (algo/entropy_control.py): the rule by hand, its config errors, and the trainer
using the coefficient it sets."""

import math
import os

import pytest

from megaprorl.algo.entropy_control import EntropyControlConfig, EntropyController

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_rule_by_hand():
    c = EntropyController(EntropyControlConfig(target=0.5, delta=0.01, init_coef=0.02))
    got = [c.coef()]  # before any observation: alpha_0
    for h in (0.4, 0.3, 0.5, 0.7, 0.8, float("nan"), 0.9, 0.9, 0.45):
        c.observe(h)
        got.append(c.coef())
    # below: +delta and on; at the target: unchanged and on; above: -delta and off; NaN: ignored; clipped at 0
    want = [0.02, 0.03, 0.04, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.01]
    assert got == pytest.approx(want)
    assert c.alpha == pytest.approx(0.01) and c.last_entropy == 0.45
    d = EntropyController(EntropyControlConfig(target=0.5, delta=0.01))
    d.load_state_dict(c.state_dict())
    assert (d.alpha, d.last_entropy, d.coef()) == (c.alpha, c.last_entropy, c.coef())


def test_cap_and_off():
    c = EntropyController(EntropyControlConfig(target=1.0, delta=0.3, max_coef=0.5))
    for _ in range(4):
        c.observe(0.1)
    assert c.coef() == 0.5
    off = EntropyController(EntropyControlConfig())
    off.observe(0.0)
    assert not off.enabled and off.coef() == 0.0 and off.alpha == 0.0
    with pytest.raises(ValueError, match="delta must be > 0"):
        EntropyController(EntropyControlConfig(target=1.0, delta=0.0))
    with pytest.raises(ValueError, match="init_coef must be <= max_coef"):
        EntropyController(EntropyControlConfig(target=1.0, init_coef=0.2, max_coef=0.1))


@pytest.mark.parametrize("overrides,match", [
    (["algo.entropy_control.target=0.3", "algo.loss.entropy_coef=0.01"], "'algo.loss.entropy_coef': a fixed"),
    (["algo.entropy_control.target=0.3", "algo.entropy_control.delta=0"], "'algo.entropy_control.delta'"),
    (["algo.entropy_control.target=-1"], "'algo.entropy_control.target': must be >= 0"),
])
def test_config_errors_name_the_key(overrides, match):
    from megaprorl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(os.path.join(ROOT, "examples", "demo.yaml"), overrides)


def _trainer(tmp_path, *extra):
    from megaprorl.config import load_config
    from megaprorl.trainer import Trainer

    return Trainer(load_config(os.path.join(ROOT, "examples", "demo.yaml"), [
        f"output_dir={tmp_path}", "warmstart.steps=5", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
        "rollout.n_samples=4", "rollout.max_new_tokens=4", "eval.n_prompts=4", "logging.progress=false",
        "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "rewards.num_workers=0",
        "algo.dynamic_sampling.enabled=false", *extra]))


@pytest.mark.parametrize("target,init", [(50.0, 0.0), (1e-3, 0.02)])
def test_the_trainer_trains_with_the_coefficient_it_sets(tmp_path, target, init):
    """Each RL step's loss gets the coefficient set from the previous step's entropy: with a target far above
    the policy's entropy the bonus starts at 0 and grows by delta a step; far below, it is off and alpha decays
    to 0.  Every mini-batch update of a step gets that step's coefficient; the controller's state is part of
    the checkpoint."""
    t = _trainer(tmp_path, f"algo.entropy_control.target={target}", "algo.entropy_control.delta=0.01",
                 f"algo.entropy_control.init_coef={init}")
    seen = []
    real = t.policy.train_step

    def spy(mb, spec, *a, **k):
        seen.append((t.step, spec.entropy_coef))
        return real(mb, spec, *a, **k)

    t.policy.train_step = spy
    try:
        logged, entropies = [], []
        for _ in range(3):
            stats = t.rl_step()
            t.step += 1
            logged.append(stats["entropy_coef"])
            entropies.append(stats["entropy"])
        path = t.save_checkpoint()
        state = (t.entropy_control.alpha, t.entropy_control.last_entropy)
    finally:
        t.close()
    assert all(math.isfinite(h) and 0 < h < 10 for h in entropies)
    want = [0.0, 0.01, 0.02] if target > 1 else [init, 0.0, 0.0]
    assert logged == pytest.approx(want)
    assert seen == [(s, pytest.approx(w)) for s, w in zip(range(3), want) for _ in range(2)]  # 2 mini-batches
    assert state[0] == pytest.approx(0.03 if target > 1 else 0.0) and state[1] == pytest.approx(entropies[-1])
    t2 = _trainer(tmp_path / "b", f"algo.entropy_control.target={target}", "algo.entropy_control.delta=0.01",
                  f"algo.entropy_control.init_coef={init}")
    try:
        t2.load_checkpoint(path)
        assert (t2.entropy_control.alpha, t2.entropy_control.last_entropy) == state
    finally:
        t2.close()


def _dp_job(rank, world, tmp):
    from pathlib import Path

    t = _trainer(Path(tmp) / f"r{rank}", "algo.entropy_control.target=0.5", "algo.entropy_control.delta=0.01",
                 "algo.entropy_control.init_coef=0.05")
    try:
        out = []
        for _ in range(2):
            stats = t.rl_step()
            t.step += 1
            out.append((stats["entropy"], stats["tokens"], stats["entropy_coef"], t.entropy_control.alpha,
                        t.entropy_control.last_entropy))
        return out
    finally:
        t.close()


def test_data_parallel_ranks_set_the_same_coefficient(tmp_path):
    """At DP=2 the ranks train on different prompts, so their own entropies differ; the controller sees the
    batch's (the token-weighted mean of the two), and both ranks hold the same alpha and coefficient."""
    from dist_utils import run_distributed

    out = run_distributed(_dp_job, 2, (str(tmp_path),))
    for step in range(2):
        (h0, n0, c0, a0, l0), (h1, n1, c1, a1, l1) = out[0][step], out[1][step]
        assert h0 != h1  # each rank's share
        assert (c0, a0, l0) == (c1, a1, l1)
        assert l0 == pytest.approx((h0 * n0 + h1 * n1) / (n0 + n1))
    assert out[0][0][2] == 0.05  # the first step: init_coef
