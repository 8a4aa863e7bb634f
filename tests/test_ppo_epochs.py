"""``train.ppo_epochs``: each RL step's batch is trained on that many times, each pass in its own mini-batch order,
every optimizer step against the rollouts' old log-probs."""

import os

import pytest
import torch

from megaprorl.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo.yaml")
TINY = ["warmstart.steps=0", "train.prompts_per_step=4", "train.mini_batch_prompts=2", "rollout.n_samples=2",
        "logging.progress=false", "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "rewards.num_workers=0", "algo.dynamic_sampling.enabled=false", "algo.kl.coef=0"]


@pytest.mark.parametrize("epochs", [1, 3])
def test_each_epoch_covers_the_batch_once_in_its_own_order(tmp_path, monkeypatch, capsys, epochs):
    from megaprorl.trainer import Trainer

    t = Trainer(load_config(DEMO, [f"output_dir={tmp_path}", *TINY, f"train.ppo_epochs={epochs}"]))
    # (the demo's reference resets, with no reference here: said once, not silently skipped)
    assert "algo.reference_reset: no reference policy to reset (algo.kl.coef is 0)" in capsys.readouterr().out
    seen = []
    real = t.policy.train_step

    def train_step(mb, spec, micro, temperature=1.0):
        seen.append((mb.tokens.clone(), mb.old_logp.clone()))
        return real(mb, spec, micro, temperature=temperature)

    try:
        monkeypatch.setattr(t.policy, "train_step", train_step)
        stats = t.rl_step()
    finally:
        t.close()
    assert len(seen) == 2 * epochs and stats["optimizer_steps"] == 2.0 * epochs
    rows = lambda k: {tuple(r.tolist()) for r in seen[k][0]}  # noqa: E731 - a mini-batch's sequences
    passes = [rows(2 * e) | rows(2 * e + 1) for e in range(epochs)]
    assert all(p == passes[0] for p in passes) and len(passes[0]) == 8  # every sequence once per pass
    assert all(not (rows(2 * e) & rows(2 * e + 1)) for e in range(epochs))
    if epochs > 1:  # a pass's own order (a permutation of the groups per pass): not always the first pass's
        order = lambda e: [tuple(r.tolist()) for k in (2 * e, 2 * e + 1) for r in seen[k][0]]  # noqa: E731
        assert any(order(e) != order(0) for e in range(1, epochs))
        # the old log-probs of a sequence are the rollouts' in every pass, whatever the updates before
        first = {tuple(tok.tolist()): lp for tok, lp in zip(*seen[0])} | {tuple(tok.tolist()): lp
                                                                            for tok, lp in zip(*seen[1])}
        for tokens, old in seen[2:]:
            for tok, lp in zip(tokens, old):
                assert torch.equal(lp, first[tuple(tok.tolist())])


def test_ppo_epochs_must_be_positive():
    with pytest.raises(ConfigError, match="'train.ppo_epochs': must be >= 1"):
        load_config(DEMO, ["train.ppo_epochs=0"])
