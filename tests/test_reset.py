"""Reference resets inside the trainer: the reference becomes the policy; the optimizer state is kept
(ProRL v2) or cleared (v1) as configured; the length-penalty schedule switches at configured steps."""

import os

import pytest
import torch

from megaprorl.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["warmstart.steps=5", "train.prompts_per_step=4", "train.mini_batch_prompts=4", "rollout.n_samples=4",
        "eval.n_prompts=8", "logging.progress=false", "model.num_layers=1", "model.hidden_size=32",
        "model.ffn_hidden_size=64", "rewards.num_workers=0", "algo.kl.coef=0.01",
        "algo.dynamic_sampling.enabled=false", "algo.reference_reset.interval=2",
        # the 5-step warm-started policy earns reward 0 on every sample; the length penalty makes the
        # shaped rewards differ within a group, so advantages and the update are non-zero
        "algo.length_penalty.enabled=true", "algo.length_penalty.off_steps=0"]


def _trainer(tmp_path, *extra):
    from megaprorl.trainer import Trainer

    cfg = load_config(os.path.join(ROOT, "examples", "demo.yaml"), [f"output_dir={tmp_path}", *TINY, *extra])
    return Trainer(cfg)


@pytest.mark.parametrize("reset_optimizer", [False, True])
def test_reset_copies_policy_and_keeps_or_clears_optimizer(tmp_path, reset_optimizer):
    from megaprorl.policy import build_seq_batch

    t = _trainer(tmp_path, f"algo.reference_reset.reset_optimizer={str(reset_optimizer).lower()}")
    try:
        for _ in range(2):
            stats = t.rl_step()
            t.step += 1
            trigger = t.maybe_reset_reference(stats) if t.step < 2 else None
        assert trigger is None
        batch = build_seq_batch([[3, 4, 5, 6], [7, 8]], [[9, 10, 1], [11, 1]], 0)
        ref_before = t.reference.logprobs(batch, 2)
        pol = t.policy.logprobs(batch, 2)
        assert not torch.allclose(ref_before, pol, atol=1e-6)  # two RL steps moved the policy
        assert len(t.policy.adam_states()) > 0
        exp_avg = [s["exp_avg"].clone() for s in t.policy.adam_states()]
        trigger = t.maybe_reset_reference(stats)  # step 2: the interval trigger fires
        assert trigger == "interval" and t.resets.history[-1][1] == "interval"
        torch.testing.assert_close(t.reference.logprobs(batch, 2), pol, rtol=0, atol=0)
        if reset_optimizer:
            assert len(t.policy.adam_states()) == 0
        else:
            after = [s["exp_avg"] for s in t.policy.adam_states()]
            assert all(torch.equal(a, b) for a, b in zip(exp_avg, after))
    finally:
        t.close()


def test_length_penalty_schedule_in_trainer(tmp_path):
    t = _trainer(tmp_path, "algo.length_penalty.enabled=true", "algo.length_penalty.on_steps=1",
                 "algo.length_penalty.off_steps=1", "algo.reference_reset.interval=0")
    try:
        seen = []
        for _ in range(3):
            seen.append(t.rl_step()["length_penalty/on"])
            t.step += 1
        assert seen == [1.0, 0.0, 1.0]
    finally:
        t.close()


def _kl_spike_job(rank, world, tmp):
    from pathlib import Path

    t = _trainer(Path(tmp) / f"r{rank}", "algo.reference_reset.interval=0", "algo.reference_reset.kl_spike_factor=3",
                 "algo.reference_reset.kl_warmup_steps=2")
    try:
        triggers = []
        for step, kl in enumerate([1.0, 1.0, 1.0, 10.0 if rank == 0 else 1.0]):  # rank 0's share spikes alone
            t.step = step + 1
            triggers.append(t.maybe_reset_reference({"kl_ref": kl, "tokens": 100.0}))
        return triggers, t.resets.kl_mean
    finally:
        t.close()


def test_the_kl_spike_trigger_decides_on_the_whole_batch_at_dp2(tmp_path):
    """At DP=2 each rank holds the KL of its own share of the batch.  The spike trigger sees the batch's (the
    token-weighted mean over the ranks), so both ranks reset together: here rank 0's share spikes to 10 over a
    mean of 1, the batch's KL is 5.5 > 3 x 1, and both reset at the last step.  Before, each rank judged its own
    share, and only rank 0 reset its reference (v1's reset_optimizer: only its optimizer too)."""
    from dist_utils import run_distributed

    out = run_distributed(_kl_spike_job, 2, (str(tmp_path),))
    assert out[0] == out[1]
    assert out[0][0] == [None, None, None, "kl_spike"]
