"""Hand-worked numbers for the cosine length reward and its on/off schedule; DAPO's overlong filtering, by hand
and in the trainer."""

import math
import os

import pytest
import torch
from omegaconf import OmegaConf

from megaprorl.algo.length_penalty import (LengthPenaltyConfig, LengthPenaltySchedule, apply_length_penalty,
                                           cosine_fn, filter_overlong)

C45 = math.cos(math.pi / 4)  # 0.707107


def test_cosine_fn_by_hand():
    # r0 = 2, rL = 1, L_max = 1000: value = 1 + 0.5 * (2 - 1) * (1 + cos(pi L / 1000))
    assert cosine_fn(0, 1000, 2.0, 1.0) == pytest.approx(2.0)           # cos 0 = 1
    assert cosine_fn(500, 1000, 2.0, 1.0) == pytest.approx(1.5)         # cos(pi/2) = 0
    assert cosine_fn(1000 / 3, 1000, 2.0, 1.0) == pytest.approx(1.75)   # cos(pi/3) = 0.5
    assert cosine_fn(1000, 1000, 2.0, 1.0) == pytest.approx(1.0)        # cos pi = -1
    # lengths outside [0, L_max] are clamped
    assert cosine_fn(2000, 1000, 2.0, 1.0) == pytest.approx(1.0)
    assert cosine_fn(-5, 1000, 2.0, 1.0) == pytest.approx(2.0)
    # wrong answers: -10 at L = 0 rising toward 0: at L = 250: 0.5 * -10 * (1 + 0.707107) = -8.535534
    assert cosine_fn(250, 1000, -10.0, 0.0) == pytest.approx(-5.0 * (1 + C45))
    # tensor form agrees with the scalar form
    t = cosine_fn(torch.tensor([0.0, 250.0, 500.0, 1000.0]), 1000, -10.0, 0.0)
    torch.testing.assert_close(t, torch.tensor([-10.0, -5.0 * (1 + C45), -5.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        cosine_fn(1, 0, 1.0, 0.0)


def test_cosine_is_monotone_between_endpoints():
    xs = torch.arange(0, 1001, 50).double()
    good = cosine_fn(xs, 1000, 2.0, 1.0)
    bad = cosine_fn(xs, 1000, -10.0, 0.0)
    assert torch.all(good[1:] <= good[:-1])  # shorter correct is better
    assert torch.all(bad[1:] >= bad[:-1])    # longer wrong is penalised less


def test_apply_length_penalty_by_hand():
    cfg = LengthPenaltyConfig(enabled=True, max_length=1000)  # defaults of arXiv 2502.03373
    defaults = (cfg.correct_r0, cfg.correct_rL, cfg.wrong_r0, cfg.wrong_rL, cfg.exceed_reward)
    assert defaults == (2.0, 1.0, -10.0, 0.0, -10.0)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0])
    lengths = torch.tensor([250, 250, 1000, 500, 100])
    truncated = torch.tensor([False, False, False, False, True])
    # correct, L=250:  1 + 0.5 * (1 + 0.707107) = 1.853553
    # wrong,   L=250:  -5 * (1 + 0.707107)       = -8.535534
    # correct, L=1000: 1
    # partial credit 0.5 < threshold 1 -> wrong, L=500: -5
    # truncated (even if correct): -10
    want = torch.tensor([1 + 0.5 * (1 + C45), -5 * (1 + C45), 1.0, -5.0, -10.0])
    out = apply_length_penalty(rewards, lengths, truncated, cfg)
    torch.testing.assert_close(out, want)
    assert out.dtype == torch.float32
    # a lower threshold makes the partial-credit response correct: 1 + 0.5 * (1 + 0) = 1.5
    cfg2 = LengthPenaltyConfig(enabled=True, max_length=1000, correct_threshold=0.5)
    assert float(apply_length_penalty(rewards, lengths, truncated, cfg2)[3]) == pytest.approx(1.5)


def test_max_length_from_caller():
    cfg = LengthPenaltyConfig(enabled=True)  # max_length = 0: the caller must pass the generation limit
    with pytest.raises(ValueError, match="max_length"):
        apply_length_penalty(torch.tensor([1.0]), torch.tensor([10]), torch.tensor([False]), cfg)
    out = apply_length_penalty(torch.tensor([1.0]), torch.tensor([10]), torch.tensor([False]), cfg, max_length=20)
    torch.testing.assert_close(out, torch.tensor([1.5]))  # L = L_max / 2 -> midpoint of 2 and 1
    # a configured max_length wins over the caller's
    cfg = LengthPenaltyConfig(enabled=True, max_length=10)
    out = apply_length_penalty(torch.tensor([1.0]), torch.tensor([10]), torch.tensor([False]), cfg, max_length=20)
    torch.testing.assert_close(out, torch.tensor([1.0]))


def test_schedule_switches_at_configured_steps():
    on = LengthPenaltySchedule(LengthPenaltyConfig(enabled=True, on_steps=3, off_steps=2))
    # start_on: steps 0,1,2 on; 3,4 off; 5,6,7 on; 8,9 off
    assert [on.is_on(s) for s in range(10)] == [True] * 3 + [False] * 2 + [True] * 3 + [False] * 2
    off_first = LengthPenaltySchedule(LengthPenaltyConfig(enabled=True, on_steps=3, off_steps=2, start_on=False))
    # off first: 0,1 off; 2,3,4 on; 5,6 off; 7,8,9 on
    assert [off_first.is_on(s) for s in range(10)] == [False] * 2 + [True] * 3 + [False] * 2 + [True] * 3
    # the recipe's example (100 on, 500 off)
    ex = LengthPenaltySchedule(LengthPenaltyConfig(enabled=True))
    assert ex.is_on(0) and ex.is_on(99) and not ex.is_on(100) and not ex.is_on(599) and ex.is_on(600)
    assert ex.is_on(699) and not ex.is_on(700)


def test_schedule_edge_cases():
    assert not any(LengthPenaltySchedule(LengthPenaltyConfig(enabled=False)).is_on(s) for s in range(700))
    assert all(LengthPenaltySchedule(LengthPenaltyConfig(enabled=True, off_steps=0)).is_on(s) for s in range(50))
    assert not any(LengthPenaltySchedule(LengthPenaltyConfig(enabled=True, on_steps=0)).is_on(s) for s in range(50))
    with pytest.raises(ValueError):
        LengthPenaltySchedule(LengthPenaltyConfig(on_steps=-1))


def test_schedule_state_dict_round_trip():
    s = LengthPenaltySchedule(LengthPenaltyConfig(enabled=True, on_steps=3, off_steps=2))
    st = s.state_dict()
    t = LengthPenaltySchedule(LengthPenaltyConfig(enabled=True, on_steps=3, off_steps=2))
    t.load_state_dict(st)
    assert [t.is_on(i) for i in range(20)] == [s.is_on(i) for i in range(20)]


def test_config_is_an_omegaconf_structured_config():
    base = OmegaConf.structured(LengthPenaltyConfig)
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(["on_steps=7", "enabled=true", "wrong_r0=-5"]))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, LengthPenaltyConfig) and cfg.on_steps == 7 and cfg.enabled and cfg.wrong_r0 == -5.0


def test_filter_overlong_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = filter_overlong(mask, torch.tensor([False, True, False]))
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(filter_overlong(mask, torch.zeros(3, dtype=torch.bool)), mask)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["warmstart.steps=5", "train.prompts_per_step=4", "train.mini_batch_prompts=4", "rollout.n_samples=4",
        "eval.n_prompts=8", "logging.progress=false", "model.num_layers=1", "model.hidden_size=32",
        "model.ffn_hidden_size=64", "rewards.num_workers=0", "algo.dynamic_sampling.enabled=false",
        "algo.length_penalty.enabled=true", "algo.length_penalty.off_steps=0", "algo.overlong_filter=true",
        "algo.loss.aggregation=sequence-mean"]


@pytest.mark.parametrize("aggregation", ["sequence-mean", "token-sum-norm"])
def test_trainer_leaves_truncated_responses_out_of_the_loss(tmp_path, monkeypatch, aggregation):
    """Every third rollout reported truncated, the others finished: its row of the loss mask, its advantages and its
    loss weights are zero; the other rows keep their mask, and the sequence-mean (or Dr. GRPO's token sum over the
    response budget) counts only them."""
    from megaprorl.config import load_config
    from megaprorl.policy import build_seq_batch
    from megaprorl.trainer import Trainer

    t = Trainer(load_config(os.path.join(ROOT, "examples", "demo.yaml"), [f"output_dir={tmp_path}", *TINY,
                                                                          f"algo.loss.aggregation={aggregation}"]))
    seen = {}
    generate = t.engine.generate

    def generate_some_truncated(prompts, params, on_finish=None):
        out = generate(prompts, params, on_finish=on_finish)
        for i, r in enumerate(out):  # (the briefly warm-started policy reaches no end token: all would be cut)
            r.finished = i % 3 != 0
        seen["rollouts"] = out
        return out

    def train_step(mb, spec, micro, temperature=1.0):
        seen.setdefault("weights", []).append((mb.weights.clone(), mb.loss_mask.clone()))
        return {"skipped_update": 0.0, "loss": 0.0, "grad_norm": 0.0}

    try:
        monkeypatch.setattr(t.engine, "generate", generate_some_truncated)
        real_steps = t._optimizer_steps

        def optimizer_steps(batch, *a, **k):
            seen["batch"] = batch
            return real_steps(batch, *a, **k)

        monkeypatch.setattr(t, "_optimizer_steps", optimizer_steps)
        monkeypatch.setattr(t.policy, "train_step", train_step)
        stats = t.rl_step()
    finally:
        t.close()
    rollouts, batch = seen["rollouts"], seen["batch"]
    truncated = torch.tensor([not r.finished for r in rollouts])
    full = build_seq_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], t.tokenizer.pad_id)
    assert truncated.any() and (~truncated).any()
    assert stats["overlong_filtered_frac"] == pytest.approx(float(truncated.float().mean()))
    assert torch.equal(batch.loss_mask[truncated], torch.zeros_like(batch.loss_mask[truncated]))
    assert torch.equal(batch.loss_mask[~truncated], full.loss_mask[~truncated])
    assert torch.equal(batch.advantages[truncated], torch.zeros_like(batch.advantages[truncated]))
    assert batch.advantages[~truncated].abs().sum() > 0
    (w, m), = seen["weights"]  # one mini-batch (its groups shuffled): sequence-mean over the rows that kept tokens
    emptied = m.sum(-1) == 0
    assert int(emptied.sum()) == int(truncated.sum())
    assert torch.equal(w[emptied], torch.zeros_like(w[emptied]))
    kept = int((~emptied).sum())
    if aggregation == "sequence-mean":
        torch.testing.assert_close(w[~emptied].sum(-1), torch.full((kept,), 1.0 / kept))
    else:  # every kept token weighs 1 / (rollout.max_new_tokens x the kept responses), whatever its length
        torch.testing.assert_close(w, m / t.cfg.rollout.max_new_tokens / kept)


def test_overlong_penalty_by_hand():
    """DAPO's soft overlong punishment, budget 10, buffer 4: 0 up to 6 tokens, then -factor x (L - 6) / 4."""
    from megaprorl.algo.length_penalty import overlong_penalty

    got = overlong_penalty(torch.tensor([0, 6, 7, 8, 10, 12]), 10, 4, 0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))
    assert overlong_penalty(torch.tensor([3]), 3, 3, 1.0).item() == -1.0  # the whole budget as the buffer
    for bad in (0, 11):
        with pytest.raises(ValueError, match="overlong buffer must be in"):
            overlong_penalty(torch.tensor([1]), 10, bad, 1.0)


def test_trainer_adds_the_overlong_penalty_to_the_shaped_reward(tmp_path, monkeypatch):
    """Responses cut to lengths 1..4 of a 4-token budget with a 2-token buffer and factor 1.5: each one's shaped
    reward (what dynamic sampling and the advantages see) is its verifier reward plus 0, 0, -0.75 and -1.5."""
    import json

    from megaprorl.config import ConfigError, load_config
    from megaprorl.trainer import Trainer

    extra = [f"output_dir={tmp_path}", "warmstart.steps=0", "train.prompts_per_step=4", "train.mini_batch_prompts=4",
             "rollout.n_samples=4", "rollout.max_new_tokens=4", "logging.progress=false", "model.num_layers=1",
             "model.hidden_size=32", "model.ffn_hidden_size=64", "rewards.num_workers=0", "logging.rollouts=-1",
             "algo.dynamic_sampling.enabled=false", "algo.overlong_penalty.buffer=2", "algo.overlong_penalty.factor=1.5"]
    t = Trainer(load_config(os.path.join(ROOT, "examples", "demo.yaml"), extra))
    generate = t.engine.generate

    def cut(prompts, params, on_finish=None):
        out = generate(prompts, params)
        for i, r in enumerate(out):  # lengths 1, 2, 3, 4 in every group
            n = 1 + i % 4
            r.response_ids, r.logprobs, r.finished = r.response_ids[:n], r.logprobs[:n], n < 4
        return out

    try:
        monkeypatch.setattr(t.engine, "generate", cut)
        t.rl_step()
    finally:
        t.close()
    rows = [json.loads(x) for x in open(os.path.join(t.run_dir, "rollouts", "step_00000001.jsonl"))]
    assert len(rows) == 16
    want = {1: 0.0, 2: 0.0, 3: -0.75, 4: -1.5}
    for r in rows:
        assert r["shaped_reward"] == pytest.approx(r["reward"] + want[r["response_tokens"]])
    with pytest.raises(ConfigError, match="'algo.overlong_penalty.buffer': must be in \\[0, rollout.max_new_tokens=4\\]"):
        load_config(os.path.join(ROOT, "examples", "demo.yaml"), extra[:-2] + ["algo.overlong_penalty.buffer=5"])
