"""Rollout correction (TIS / MIS): the importance weights against hand-worked numbers, the homogeneity that lets
them ride on the advantage, the config checks, and the trainer applying them to the advantages it trains on."""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megaprorl.algo import LossSpec, mismatch_stats, per_token_loss, rollout_correction_weights
from megaprorl.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo.yaml")
L3, L04, L25 = math.log(3.0), math.log(0.4), math.log(2.5)


def _rows():
    """Two sequences; the second's last entry is padding with a log-prob that must be ignored.  No ratio sits on
    a bound (where float rounding would decide)."""
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    eng = torch.tensor([[-L3, 0.0, -L04], [-L25, 0.0, -7.0]])  # old - engine: [ln 3, 0, ln 0.4], [ln 2.5, 0, pad]
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return old, eng, mask


def test_token_level_truncation_by_hand():
    old, eng, mask = _rows()
    w, s = rollout_correction_weights(old, eng, mask, "token", "truncate", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.4], [2.0, 1.0, 0.0]]))
    # units: the five response tokens, rho = 3, 1, 0.4, 2.5, 1 -> w = 2, 1, 0.4, 2, 1
    assert s["rollout_correction/weight_mean"] == pytest.approx(6.4 / 5)
    assert s["rollout_correction/truncated_frac"] == pytest.approx(2 / 5)
    assert s["rollout_correction/ess"] == pytest.approx(6.4 ** 2 / (5 * (4 + 1 + 0.16 + 4 + 1)))


def test_sequence_and_geometric_levels_by_hand():
    old, eng, mask = _rows()
    # sequence: rho_0 = 3 * 0.4 = 1.2, rho_1 = 2.5; geometric: 1.2 ** (1 / 3), 2.5 ** (1 / 2)
    w, s = rollout_correction_weights(old, eng, mask, "sequence", "truncate", cap=1.8)
    torch.testing.assert_close(w, torch.tensor([[1.2, 1.2, 1.2], [1.8, 1.8, 0.0]]))
    assert s["rollout_correction/weight_mean"] == pytest.approx((1.2 + 1.8) / 2)
    assert s["rollout_correction/truncated_frac"] == pytest.approx(0.5)
    g0, g1 = 1.2 ** (1 / 3), 2.5 ** 0.5
    w, s = rollout_correction_weights(old, eng, mask, "geometric", "truncate", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[g0, g0, g0], [g1, g1, 0.0]]))
    assert s["rollout_correction/truncated_frac"] == 0.0
    assert s["rollout_correction/ess"] == pytest.approx((g0 + g1) ** 2 / (2 * (g0 ** 2 + g1 ** 2)))


def test_mask_mode_keeps_the_band_and_zeroes_the_rest():
    old, eng, mask = _rows()
    # band [1/2, 2] (cap_low 0): rho = 3, 0.4 and 2.5 are dropped
    w, s = rollout_correction_weights(old, eng, mask, "token", "mask", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert s["rollout_correction/masked_frac"] == pytest.approx(3 / 5) and "rollout_correction/truncated_frac" not in s
    w, s = rollout_correction_weights(old, eng, mask, "token", "mask", cap=2.6, cap_low=0.3)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 0.4], [2.5, 1.0, 0.0]]))
    assert s["rollout_correction/masked_frac"] == pytest.approx(1 / 5)
    w, _ = rollout_correction_weights(old, eng, mask, "sequence", "mask", cap=1.9, cap_low=1.1)
    torch.testing.assert_close(w, torch.tensor([[1.2, 1.2, 1.2], [0.0, 0.0, 0.0]]))


def test_equal_logprobs_give_the_mask_and_huge_gaps_stay_finite():
    torch.manual_seed(0)
    old = torch.randn(4, 9)
    mask = (torch.rand(4, 9) > 0.3).float()
    mask[2] = 0.0  # a row without response tokens
    for level in ("token", "sequence", "geometric"):
        w, s = rollout_correction_weights(old, old.clone(), mask, level)
        assert torch.equal(w, mask)
        assert s["rollout_correction/weight_mean"] == 1.0 and s["rollout_correction/ess"] == 1.0
        w, s = rollout_correction_weights(old, old - 1e4 * mask, mask, level)  # log rho = 1e4: clamped, capped
        assert torch.equal(w, 2.0 * mask) and s["rollout_correction/truncated_frac"] == 1.0
    empty = torch.zeros(3, 4)
    w, s = rollout_correction_weights(empty, empty, empty, "sequence")
    assert torch.equal(w, empty) and s["rollout_correction/weight_mean"] == 1.0


def test_mismatch_stats_by_hand():
    old, eng, mask = _rows()
    s = mismatch_stats(old, eng, mask)
    d = [L3, 0.0, L04, L25, 0.0]
    assert s["rollout/logprob_mismatch"] == pytest.approx(sum(abs(x) for x in d) / 5)
    assert s["rollout/mismatch_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 5)
    assert mismatch_stats(old, old, mask) == {"rollout/logprob_mismatch": 0.0, "rollout/mismatch_k3": 0.0}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 16), dual=st.sampled_from([None, 3.0]), spread=st.sampled_from([0.1, 1.0, 4.0]))
def test_weighting_the_advantage_weights_the_policy_gradient_term(seed, dual, spread):
    """pg(w A) = w pg(A) with the same gradient (w >= 0): clip branches, clip flags and the dual clip scale
    with w, so the trainer's kernels take the weight through the advantage.  Ratios far outside the clip range
    included; the KL term is left unweighted."""
    g = torch.Generator().manual_seed(seed)
    n = 64
    old = torch.randn(n, generator=g, dtype=torch.float64)
    logp = (old + spread * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_()
    ref = old + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) * 3.0
    w[::7] = 0.0  # masked tokens
    spec = LossSpec(eps_low=0.2, eps_high=0.28, dual_clip=dual, kl_coef=0.1)
    a = per_token_loss(logp, None, old, ref, adv * w, spec)
    b = per_token_loss(logp, None, old, ref, adv, spec)
    torch.testing.assert_close(a["pg"], w * b["pg"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a["kl"], b["kl"])
    keep = w > 0
    assert torch.equal(a["clipped_low"][keep], b["clipped_low"][keep])
    assert torch.equal(a["clipped_high"][keep], b["clipped_high"][keep])
    ga, = torch.autograd.grad(a["pg"].sum(), logp)
    gb, = torch.autograd.grad((w * b["pg"]).sum(), logp)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"'algo.rollout_correction.level': needs algo.old_logprobs=recompute"):
        load_config(DEMO, ["algo.rollout_correction.level=token", "algo.old_logprobs=engine"])
    with pytest.raises(ConfigError, match=r"'algo.rollout_correction.level': must be '' \(off\) or one of token"):
        load_config(DEMO, ["algo.rollout_correction.level=tokens"])
    with pytest.raises(ConfigError, match=r"'algo.rollout_correction.mode': must be one of truncate, mask"):
        load_config(DEMO, ["algo.rollout_correction.level=token", "algo.rollout_correction.mode=clip"])
    with pytest.raises(ConfigError, match=r"'algo.rollout_correction.cap_low': the band kept, \[3, 2\], is empty"):
        load_config(DEMO, ["algo.rollout_correction.level=sequence", "algo.rollout_correction.mode=mask",
                           "algo.rollout_correction.cap_low=3"])
    with pytest.raises(ConfigError, match=r"'algo.rollout_correction.cap': must be > 0"):
        load_config(DEMO, ["algo.rollout_correction.level=token", "algo.rollout_correction.cap=0"])
    cfg = load_config(DEMO, ["algo.rollout_correction.level=geometric", "algo.rollout_correction.mode=mask",
                             "algo.rollout_correction.cap=1.001", "algo.rollout_correction.cap_low=0.999"])
    assert cfg.algo.rollout_correction.cap_low == 0.999


TINY = ["warmstart.steps=5", "train.prompts_per_step=4", "train.mini_batch_prompts=4", "rollout.n_samples=4",
        "eval.n_prompts=8", "logging.progress=false", "model.num_layers=1", "model.hidden_size=32",
        "model.ffn_hidden_size=64", "rewards.num_workers=0", "algo.dynamic_sampling.enabled=false",
        # the length penalty makes the shaped rewards of a group differ, so the advantages are non-zero
        "algo.length_penalty.enabled=true", "algo.length_penalty.off_steps=0"]


def test_trainer_trains_on_the_weighted_advantages(tmp_path, monkeypatch):
    """An RL step whose engine log-probs are 1 below the trainer's on each response's first token (rho = e > the
    cap of 2, truncated) and 0.3 above elsewhere: the advantages the optimizer steps get are the estimator's
    times the token weights, and the step logs the weights' and the mismatch's statistics."""
    import megaprorl.trainer as trainer_mod

    seen = {}
    real_engine_logprobs, real_advantages = trainer_mod.engine_logprobs, trainer_mod.token_advantages

    def shifted(rollouts, batch):
        out = real_engine_logprobs(rollouts, batch)
        first = torch.zeros_like(out)
        for i, r in enumerate(rollouts):
            if r.response_ids:
                first[i, len(r.prompt_ids) - 1] = 1.0
        out = out + (0.3 * (1 - first) - 1.0 * first) * batch.loss_mask
        seen["engine"] = out.clone()
        return out

    def advantages(*a, **k):
        seen["adv"] = real_advantages(*a, **k).clone()
        return seen["adv"]

    def optimizer_steps(batch, *a, **k):
        seen["trained"], seen["old"], seen["mask"] = batch.advantages.clone(), batch.old_logp.clone(), batch.loss_mask
        return {}

    monkeypatch.setattr(trainer_mod, "engine_logprobs", shifted)
    monkeypatch.setattr(trainer_mod, "token_advantages", advantages)
    t = trainer_mod.Trainer(load_config(DEMO, [f"output_dir={tmp_path}", *TINY, "algo.rollout_correction.level=token"]))
    try:
        monkeypatch.setattr(t, "_optimizer_steps", optimizer_steps)
        stats = t.rl_step()
    finally:
        t.close()
    assert seen["adv"].abs().sum() > 0
    d = (seen["old"] - seen["engine"]).double()
    expected = torch.exp(d).clamp(max=2.0) * seen["mask"]
    torch.testing.assert_close(seen["trained"].double(), seen["adv"].double() * expected, rtol=1e-6, atol=1e-7)
    first = (d > 0.5) & (seen["mask"] > 0)  # old - engine = 1 (+ the tiny real mismatch)
    assert first.any() and torch.allclose(expected[first], torch.tensor(2.0, dtype=torch.float64))
    n_tok = float(seen["mask"].sum())
    assert stats["rollout_correction/truncated_frac"] == pytest.approx(float(first.sum()) / n_tok)
    assert stats["rollout/logprob_mismatch"] > 0.29 and stats["rollout/mismatch_k3"] > 0.03
    assert 0 < stats["rollout_correction/ess"] < 1
