"""Hand-worked numbers and properties of megaprorl/algo/advantages.py."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from megaprorl.algo.advantages import (compute_advantages, fold_kl_into_rewards, group_baseline_advantages,
                                       returns_to_go, whiten)
from tests.dist_utils import run_distributed

R = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5])
G = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])  # two groups of 4 and a group of size one


def test_reinforce_pp_baseline_by_hand():
    # group means: g0 = 2/4 = 0.5, g1 = 3/4 = 0.75, g2 = 0.5 (size one -> R - R = 0)
    adv = group_baseline_advantages(R, G, "reinforce_pp_baseline")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75, 0.0]))


def test_grpo_by_hand():
    # g0: deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350 -> +-0.5 / 0.577350 = +-0.866025
    # g1: deviations (.25, .25, .25, -.75), sum sq = 3 * .0625 + .5625 = .75, var = .75 / 3 = .25, std = .5
    #     -> (0.5, 0.5, 0.5, -1.5);  g2 (size one) -> 0
    adv = group_baseline_advantages(R, G, "grpo")
    s3 = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    want = torch.tensor([s3, -s3, -s3, s3, .25 / .500001, .25 / .500001, .25 / .500001, -.75 / .500001, 0.0])
    torch.testing.assert_close(adv, want)


def test_rloo_by_hand():
    # g0: a correct answer's others are (0, 0, 1): mean 1/3 -> 2/3; a wrong one's are (1, 0, 1) -> -2/3
    # g1: a correct answer's others are (1, 1, 0): 2/3 -> 1/3; the wrong one's are (1, 1, 1) -> -1
    adv = group_baseline_advantages(R, G, "rloo")
    t = 2 / 3
    torch.testing.assert_close(adv, torch.tensor([t, -t, -t, t, 1 / 3, 1 / 3, 1 / 3, -1.0, 0.0]))


@pytest.mark.parametrize("est", ["reinforce_pp_baseline", "grpo", "rloo"])
def test_degenerate_groups(est):
    # all-equal group -> 0; size-one groups -> 0; empty input -> empty output
    torch.testing.assert_close(group_baseline_advantages(torch.tensor([0.7, 0.7, 0.7]), torch.tensor([4, 4, 4]), est),
                               torch.zeros(3))
    torch.testing.assert_close(group_baseline_advantages(torch.tensor([3.0, -1.0]), torch.tensor([0, 1]), est),
                               torch.zeros(2))
    assert group_baseline_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long), est).shape == (0,)


def test_group_ids_need_not_be_contiguous():
    # groups 7: (1, 3) mean 2 -> (-1, 1); group 3: (2, 6) mean 4 -> (-2, 2)
    adv = group_baseline_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([7, 3, 7, 3]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, -2.0, 1.0, 2.0]))


def test_bad_arguments():
    with pytest.raises(ValueError):
        group_baseline_advantages(R, G, "ppo")
    with pytest.raises(ValueError):
        group_baseline_advantages(R, G[:3])
    with pytest.raises(ValueError):
        compute_advantages(R, G, torch.ones(3, 2), "grpo", True)


def test_whiten_by_hand():
    # valid values 1, 2, 3, 4: mean 2.5, population var (2.25 + .25 + .25 + 2.25) / 4 = 1.25, std 1.118034
    # -> (-1.341641, -0.447214, 0.447214, 1.341641); masked-out positions (holding 100) -> 0
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    s = math.sqrt(1.25)
    want = torch.tensor([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    torch.testing.assert_close(whiten(v, m), want)


def test_whiten_degenerate():
    # no valid token anywhere -> zeros; constant valid values -> 0 / (0 + eps) = 0
    assert torch.equal(whiten(torch.randn(3, 4), torch.zeros(3, 4)), torch.zeros(3, 4))
    torch.testing.assert_close(whiten(torch.full((2, 2), 5.0), torch.ones(2, 2)), torch.zeros(2, 2))
    # an all-masked row stays 0 while the others are whitened
    out = whiten(torch.tensor([[1.0, 3.0], [7.0, 7.0]]), torch.tensor([[1, 1], [0, 0]]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0], [0.0, 0.0]]), atol=1e-6, rtol=0)


def test_compute_advantages_by_hand():
    # one group, rewards (1, 0) -> baseline (0.5, -0.5); row 0 has 2 valid tokens, row 1 has 1:
    # tokens (.5, .5, -.5): mean 1/6, deviations (1/3, 1/3, -2/3), var = (1/9 + 1/9 + 4/9) / 3 = 2/9,
    # std = 0.471405 -> (0.707107, 0.707107, -1.414214)
    rewards = torch.tensor([1.0, 0.0])
    gids = torch.tensor([0, 0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    raw = compute_advantages(rewards, gids, mask, "reinforce_pp_baseline", False)
    torch.testing.assert_close(raw, torch.tensor([[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0]]))
    w = compute_advantages(rewards, gids, mask, "reinforce_pp_baseline", True)
    r2 = math.sqrt(2)
    torch.testing.assert_close(w, torch.tensor([[1 / r2, 1 / r2, 0.0], [-r2, 0.0, 0.0]]))
    assert w.dtype == torch.float32


def test_kl_folded_into_rewards_by_hand():
    # rewards (1, 0), one group -> outcome (0.5, -0.5).  Row 1 starts with a masked (prompt) position.
    # penalties beta*kl: row 0 (.1, .2, .3), row 1 (9 [masked], .1, .1)
    # token rewards: row 0 (-.1, -.2, -.3 + .5 = .2); row 1 (0, -.1, -.1 - .5 = -.6)
    # return-to-go:  row 0 (-.1 - .2 + .2 = -.1, -.2 + .2 = 0, .2); row 1 (0, -.7, -.6)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    pen = torch.tensor([[0.1, 0.2, 0.3], [9.0, 0.1, 0.1]])
    tr = fold_kl_into_rewards(torch.tensor([0.5, -0.5]), mask, pen, beta=1.0)
    torch.testing.assert_close(tr, torch.tensor([[-0.1, -0.2, 0.2], [0.0, -0.1, -0.6]]))
    adv = compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), mask, "reinforce_pp_baseline", False,
                             token_penalty=pen)
    torch.testing.assert_close(adv, torch.tensor([[-0.1, 0.0, 0.2], [0.0, -0.7, -0.6]]))
    # beta scales kl: kl = 2 * pen with beta = 0.5 gives the same token rewards
    torch.testing.assert_close(fold_kl_into_rewards(torch.tensor([0.5, -0.5]), mask, 2 * pen, beta=0.5), tr)
    # zero penalty reduces to the broadcast advantage
    adv0 = compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), mask, "reinforce_pp_baseline", False,
                              token_penalty=torch.zeros(2, 3))
    torch.testing.assert_close(adv0, torch.tensor([[0.5, 0.5, 0.5], [0.0, -0.5, -0.5]]))


def test_returns_to_go_with_holes_and_empty_rows():
    # mask (1, 0, 1): G_0 = r0 + r2 = 1 + 4 = 5, G_1 = 0 (masked), G_2 = 4; an all-masked row is 0
    r = torch.tensor([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
    m = torch.tensor([[1, 0, 1], [0, 0, 0]])
    torch.testing.assert_close(returns_to_go(r, m), torch.tensor([[5.0, 0.0, 4.0], [0.0, 0.0, 0.0]]))
    # the outcome of a row with no valid token is dropped
    tr = fold_kl_into_rewards(torch.tensor([1.0, 3.0]), m)
    torch.testing.assert_close(tr, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))


@settings(max_examples=25, deadline=None)
@given(n_groups=st.integers(1, 5), group_size=st.integers(1, 6), length=st.integers(1, 6), seed=st.integers(0, 10_000),
       est=st.sampled_from(["reinforce_pp_baseline", "grpo", "rloo"]))
def test_whitened_advantages_have_zero_mean_unit_std(n_groups, group_size, length, seed, est):
    g = torch.Generator().manual_seed(seed)
    n = n_groups * group_size
    rewards = torch.randint(0, 3, (n,), generator=g).float() / 2
    gids = torch.arange(n_groups).repeat_interleave(group_size)
    lens = torch.randint(0, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lens[:, None]
    raw = compute_advantages(rewards, gids, mask, est, False).double()
    valid = raw[mask]
    assume(valid.numel() > 1 and float(valid.std(unbiased=False)) > 1e-3)
    adv = compute_advantages(rewards, gids, mask, est, True).double()
    a = adv[mask]
    assert abs(float(a.mean())) < 1e-5
    assert abs(float(a.std(unbiased=False)) - 1.0) < 1e-4
    assert torch.all(adv[~mask] == 0)
    # the baseline sums to zero within each group (reinforce_pp_baseline / grpo / rloo alike)
    base = group_baseline_advantages(rewards, gids, est).double()
    torch.testing.assert_close(base.view(n_groups, group_size).sum(-1), torch.zeros(n_groups, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (8,), generator=g).float()
    gids = torch.arange(4).repeat_interleave(2)
    lens = torch.randint(0, 6, (8,), generator=g)
    lens[2:4] = 0  # an all-masked group on rank 0
    mask = torch.arange(5)[None, :] < lens[:, None]
    values = torch.randn(8, 5, generator=g)
    return rewards, gids, mask, values


def _whiten_worker(rank, world, seed):
    import torch.distributed as dist

    rewards, gids, mask, values = _data(seed)
    rows = slice(rank * 4, (rank + 1) * 4)  # whole groups per rank
    w = whiten(values[rows], mask[rows], group=dist.group.WORLD)
    a = compute_advantages(rewards[rows], gids[rows], mask[rows], "reinforce_pp_baseline", True,
                           group=dist.group.WORLD)
    empty = whiten(values[rows], torch.zeros_like(mask[rows]), group=dist.group.WORLD)
    return w, a, empty


def test_whiten_over_two_ranks_equals_whiten_of_concatenation():
    rewards, gids, mask, values = _data(3)
    out = run_distributed(_whiten_worker, 2, (3,))
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), whiten(values, mask))
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]),
                               compute_advantages(rewards, gids, mask, "reinforce_pp_baseline", True))
    assert torch.equal(out[0][2], torch.zeros(4, 5)) and torch.equal(out[1][2], torch.zeros(4, 5))
