"""parallel.balance_batch: the step's responses shared out over the data-parallel ranks by model FLOPs."""

import os
import random
import sys

import pytest
import torch

from megaprorl.parallel.balance import even_take, mini_batch_sizes, plan, split_even, step_imbalance

sys.path.insert(0, os.path.dirname(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _best_max_load(costs, parts, size):
    """The optimum by exhaustive search: the smallest largest load of any split into equal-count lists."""
    best = float("inf")

    def rec(i, loads, counts):
        nonlocal best
        if max(loads) >= best:
            return
        if i == len(costs):
            best = max(loads)
            return
        for p in range(parts):
            if counts[p] < size:
                loads[p] += costs[i]
                counts[p] += 1
                rec(i + 1, loads, counts)
                loads[p] -= costs[i]
                counts[p] -= 1
                if counts[p] == 0:  # the empty lists are interchangeable
                    break

    rec(0, [0.0] * parts, [0] * parts)
    return best


def test_split_even_is_near_the_optimum_with_equal_counts():
    rng = random.Random(0)
    worst = 1.0
    for _ in range(300):
        parts, size = rng.choice([2, 3, 4]), rng.choice([1, 2, 3])
        # heavy-tailed costs, as response lengths are: a few long ones among many short
        costs = [rng.random() ** 4 * 10 if rng.random() < 0.5 else rng.random() for _ in range(parts * size)]
        lists = split_even(costs, parts, size)
        assert sorted(i for lst in lists for i in lst) == list(range(parts * size))
        assert all(len(lst) == size for lst in lists)
        got = max(sum(costs[i] for i in lst) for lst in lists)
        worst = max(worst, got / _best_max_load(costs, parts, size))
    assert worst < 1.10  # measured: 1.032 at worst over these draws (largest first alone is up to 4/3)


def test_split_even_rejects_a_count_that_does_not_split():
    with pytest.raises(ValueError, match="do not make 2 lists of 2"):
        split_even([1.0, 2.0, 3.0], 2, 2)


def test_mini_batch_sizes_cut_as_the_trainer_does():
    assert mini_batch_sizes(8, 4) == [2, 2, 2, 2]
    assert mini_batch_sizes(8, 3) == [2, 2, 4]
    assert mini_batch_sizes(5, 1) == [5]


def test_step_imbalance():
    assert step_imbalance([[1.0, 1.0], [1.0, 1.0]]) == 1.0
    # mini-batch 0 waits for rank 0 (3), mini-batch 1 for rank 1 (2): 5 over a mean of (4 + 3) / 2
    assert step_imbalance([[3.0, 1.0], [1.0, 2.0]]) == pytest.approx(5 / 3.5)
    assert step_imbalance([[0.0], [0.0]]) == 1.0


def _chunks(world, n, n_mini, seed, group_size):
    """The items of each mini-batch as the plan cuts them: whole groups, in the seed's order of all ranks'."""
    groups = [(r, g) for r in range(world) for g in range(n // group_size)]
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for size in mini_batch_sizes(n // group_size, n_mini):
        out.append({(r, g * group_size + j) for r, g in (groups[k] for k in order[start:start + size * world])
                    for j in range(group_size)})
        start += size * world
    return out


@pytest.mark.parametrize("world,n,n_mini,group_size", [(2, 4, 1, 1), (2, 8, 2, 1), (4, 8, 4, 1), (3, 6, 2, 1),
                                                       (2, 8, 2, 2), (4, 8, 2, 2), (3, 12, 2, 3)])
def test_plan_gives_each_rank_its_share_of_every_mini_batch(world, n, n_mini, group_size):
    rng = random.Random(world * 100 + n)
    # rank 0 drew every long response: as drawn, it carries most of the step
    costs = [[(50.0 if r == 0 else 1.0) * (1 + rng.random()) for _ in range(n)] for r in range(world)]
    layout = plan(costs, n_mini, seed=7, group_size=group_size)
    assert layout == plan(costs, n_mini, seed=7, group_size=group_size)  # every rank computes the same plan
    assert sorted(it for part in layout for it in part) == [(r, i) for r in range(world) for i in range(n)]
    sizes = [s * group_size for s in mini_batch_sizes(n // group_size, n_mini)]
    bounds = [sum(sizes[:m]) for m in range(n_mini + 1)]
    chunks = _chunks(world, n, n_mini, 7, group_size)
    for m, chunk in enumerate(chunks):
        shares = [layout[r][bounds[m]:bounds[m + 1]] for r in range(world)]
        assert all(len(s) == sizes[m] for s in shares)
        assert {it for s in shares for it in s} == chunk  # the mini-batch's whole groups, shared out
    loads = [[sum(costs[s][i] for s, i in layout[r][bounds[m]:bounds[m + 1]]) for m in range(n_mini)]
             for r in range(world)]
    drawn = [[sum(costs[r][i] for i in range(bounds[m], bounds[m + 1])) for m in range(n_mini)]
             for r in range(world)]
    assert step_imbalance(drawn) > 1.5
    assert step_imbalance(loads) < step_imbalance(drawn)
    for m, chunk in enumerate(chunks):  # each mini-batch near its best split
        best = _best_max_load([costs[r][i] for r, i in sorted(chunk)], world, sizes[m])
        assert max(loads[r][m] for r in range(world)) <= 1.1 * best


def test_responses_even_out_what_whole_groups_cannot():
    """Two ranks, one group each per mini-batch: as whole groups the long group's rank carries it alone; as
    responses each rank trains half of each group."""
    costs = [[10.0, 10.0, 10.0, 10.0], [1.0, 1.0, 1.0, 1.0]]  # rank 0's group (4 responses), rank 1's
    whole = plan([[40.0], [4.0]], 1, seed=0)  # each group one item
    assert step_imbalance([[40.0 if p == [(0, 0)] else 4.0] for p in whole]) == pytest.approx(40 / 22)
    spread = plan(costs, 1, seed=0, group_size=4)
    loads = [sum(costs[s][i] for s, i in p) for p in spread]
    assert loads == [22.0, 22.0] and step_imbalance([[x] for x in loads]) == 1.0


def test_split_even_is_fast_at_prorl_scale():
    """ProRL at 32 ranks: a mini-batch of 64 groups x 16 responses split 32 ways; every rank plans 4 of them
    each step, in Python.  A bound, not a timing test: it must not take seconds."""
    import time

    rng = random.Random(1)
    costs = [rng.lognormvariate(7, 1) for _ in range(64 * 16)]
    t = time.perf_counter()
    lists = split_even(costs, 32, 32)
    loads = [sum(costs[i] for i in lst) for lst in lists]
    assert max(loads) / (sum(loads) / 32) < 1.02
    assert time.perf_counter() - t < 5.0


def test_each_list_goes_to_the_rank_that_drew_most_of_it():
    from megaprorl.parallel.balance import _label

    cost = {(0, 0): 5.0, (0, 1): 1.0, (1, 0): 1.0, (1, 1): 4.0, (2, 0): 2.0, (2, 1): 2.0}
    lists = [[(1, 1), (0, 1)], [(2, 0), (2, 1)], [(0, 0), (1, 0)]]
    assert _label(lists, cost) == [[(0, 0), (1, 0)], [(1, 1), (0, 1)], [(2, 0), (2, 1)]]


def test_plan_rejects_counts_that_do_not_split():
    with pytest.raises(ValueError, match="3 groups do not split evenly over 2 ranks"):
        plan([[1.0, 2.0], [1.0]], 1, seed=0)
    with pytest.raises(ValueError, match="not groups of 2"):
        plan([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], 1, seed=0, group_size=2)


def test_plan_evens_out_ranks_that_drew_different_numbers():
    """Pooled dynamic sampling leaves the ranks with different numbers of groups: 3, 0 and 3 groups of 2 make
    two per rank, each mini-batch's whole groups spread over the ranks."""
    costs = [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]]
    layout = plan(costs, 2, seed=1, group_size=2)
    assert [len(p) for p in layout] == [4, 4, 4]
    assert sorted(it for p in layout for it in p) == [(r, i) for r in (0, 2) for i in range(6)]


def test_even_take():
    assert even_take([5, 0, 3], 6) == [3, 0, 3]
    assert even_take([1, 10], 8) == [1, 7]
    assert even_take([5, 5, 5], 7) == [3, 2, 2]
    assert even_take([1, 2], 8) == [1, 2]  # all there are
    assert even_take([4, 4], 0) == [0, 0]


def _exchange_job(rank, world):
    from megaprorl.parallel.balance import exchange_objects

    send = [[(rank, d, "x" * (rank + 1) * (d + 1))] if d != rank else [] for d in range(world)]
    return exchange_objects(send)


def test_exchange_objects_delivers_each_list_to_its_rank():
    from dist_utils import run_distributed

    out = run_distributed(_exchange_job, 3)
    for me in range(3):
        assert out[me] == [[(src, me, "x" * (src + 1) * (me + 1))] if src != me else [] for src in range(3)]


def _trainer(tmp, *extra):
    from megaprorl.config import load_config
    from megaprorl.trainer import Trainer

    return Trainer(load_config(os.path.join(ROOT, "examples", "demo.yaml"), [
        f"output_dir={tmp}", "warmstart.steps=5", "train.prompts_per_step=8", "rollout.n_samples=2",
        "rollout.max_new_tokens=6", "eval.n_prompts=4", "logging.progress=false", "model.num_layers=1",
        "model.hidden_size=32", "model.ffn_hidden_size=64", "rewards.num_workers=0",
        "algo.dynamic_sampling.enabled=false", *extra]))


def _dp_job(rank, world, tmp, balance, mini, swap=False, extra=()):
    from pathlib import Path

    if swap:  # every group to the other rank: the whole exchange and the reassembly in use
        from megaprorl.parallel import balance as bal

        bal.plan = lambda costs, n_mini, seed, group_size: [[(1 - r, i) for i in range(len(costs[0]))]
                                                            for r in range(2)]
    t = _trainer(Path(tmp) / f"{balance}_{mini}_r{rank}", f"parallel.balance_batch={balance}",
                 f"train.mini_batch_prompts={mini}", *extra)
    seen = []
    real = t.policy.train_step

    def spy(mb, *a, **k):
        # each trained sequence (unpadded), its response tokens and their summed advantage
        adv = (mb.advantages * mb.loss_mask).sum(-1)
        seen.append(sorted((tuple(r[:n]), int(k), round(float(a), 5)) for r, n, k, a in zip(
            mb.tokens.tolist(), mb.lengths.tolist(), mb.loss_mask.sum(-1).tolist(), adv)))
        return real(mb, *a, **k)

    t.policy.train_step = spy
    try:
        stats = t.rl_step()
        params = torch.cat([p.detach().flatten() for p in t.policy.model.parameters()])
        return stats, seen, params, t.flops_shape
    finally:
        t.close()


@pytest.mark.parametrize("mini,swap", [(8, False), (4, False), (8, True)])
def test_balanced_batch_trains_the_same_sequences(tmp_path, mini, swap):
    """DP=2, balanced or not: the same rollouts are drawn (their draws do not depend on the layout) and all of
    them are trained, each rank its equal share of every mini-batch.  With one mini-batch the update is the
    same sum of the same sequences' gradients, so the weights after the step agree."""
    from dist_utils import run_distributed

    on = run_distributed(_dp_job, 2, (str(tmp_path), True, mini, swap))
    off = run_distributed(_dp_job, 2, (str(tmp_path), False, mini))

    def trained(out):
        return sorted(s for rank in out for mb in rank[1] for s in mb)

    assert trained(on) == trained(off) and len(trained(on)) == 8 * 2
    for out in (on, off):
        assert [len(mb) for mb in out[0][1]] == [len(mb) for mb in out[1][1]] == [mini // 2 * 2] * (8 // mini)
    s_on, s_off = on[0][0], off[0][0]
    assert s_on["dp/load_imbalance_drawn"] == s_off["dp/load_imbalance_drawn"] == s_off["dp/load_imbalance"]
    assert "dp/responses_moved" in s_on and "dp/responses_moved" not in s_off
    if swap:
        assert s_on["dp/responses_moved"] == 16
    else:
        assert 1.0 <= s_on["dp/load_imbalance"] <= s_on["dp/load_imbalance_drawn"]
    assert torch.equal(on[0][2], on[1][2])  # the ranks hold one model
    if mini == 8:
        assert s_on["grad_norm"] == pytest.approx(s_off["grad_norm"], rel=1e-5)
        torch.testing.assert_close(on[0][2], off[0][2], rtol=0, atol=1e-6)


def test_balanced_batch_under_pipeline_parallelism(tmp_path):
    """PP=2 x DP=2, every response sent to the other replica: each stage's ranks exchange with their own
    data-parallel peers; both stages of a replica train the same responses in the same order (else the schedule
    would pair activations of different sequences), and with one mini-batch the weights after the step equal
    the unbalanced run's."""
    from dist_utils import run_distributed

    pp = ("parallel.pipeline_parallel=2", "model.num_layers=2")
    on = run_distributed(_dp_job, 4, (str(tmp_path), True, 8, True, pp))
    off = run_distributed(_dp_job, 4, (str(tmp_path), False, 8, False, pp))
    assert on[0][0]["dp/responses_moved"] == 16
    # ranks r and r + 2: the two stages of data-parallel replica r (Megatron's order: TP, then DP, then PP)
    for out in (on, off):
        for r in range(2):
            assert out[r][1] == out[r + 2][1]  # the two stages of a replica trained the same sequences
    assert sorted(s for r in (0, 1) for mb in on[r][1] for s in mb) == sorted(
        s for r in (0, 1) for mb in off[r][1] for s in mb)
    assert on[0][0]["grad_norm"] == pytest.approx(off[0][0]["grad_norm"], rel=1e-5)
    for r in range(4):
        torch.testing.assert_close(on[r][2], off[r][2], rtol=0, atol=1e-6)


def _uneven_job(rank, world, tmp):
    from megaprorl.config import ConfigError

    try:
        _trainer(tmp, "train.prompts_per_step=6", "train.mini_batch_prompts=3").close()
    except ConfigError as e:
        return str(e)
    return None


def test_mini_batches_that_do_not_split_over_the_ranks_are_a_config_error(tmp_path):
    from dist_utils import run_distributed

    out = run_distributed(_uneven_job, 2, (str(tmp_path),))
    assert all(o and "train.mini_batch_prompts" in o and "2 data-parallel ranks" in o for o in out)


def _mini_batch_sizes(t) -> list:
    """The sizes of the mini-batches ``t``'s policy trains from now on (filled in as it trains them)."""
    seen = []
    real = t.policy.train_step

    def spy(mb, *a, **k):
        seen.append(len(mb))
        return real(mb, *a, **k)

    t.policy.train_step = spy
    return seen


def _pooled_job(rank, world, tmp, share, signal_ranks=(0,), steps=1, extra=()):
    """Rank 0's groups all have signal, rank 1's none: per rank, rank 1 draws to the bound and trains groups
    without signal; pooled, rank 0's surplus makes the step's batch.  ``steps`` > 1: every step's stats."""
    from pathlib import Path

    import megaprorl.trainer as tr
    from megaprorl.rewards.base import RewardResult

    real = tr.Trainer._generate_scored

    def scored(self, records, prompts, params, claim=None):
        rollouts, scores, t_gen, t_wait = real(self, records, prompts, params, claim)
        n = params.n
        fake = [RewardResult(float(rank in signal_ranks and k % n == 0)) for k in range(len(rollouts))]
        return rollouts, fake, t_gen, t_wait

    tr.Trainer._generate_scored = scored
    t = _trainer(Path(tmp) / f"{share}_{len(signal_ranks)}_r{rank}", "algo.dynamic_sampling.enabled=true",
                 "algo.dynamic_sampling.max_extra_draws=2", f"algo.dynamic_sampling.share_over_dp={share}",
                 "train.mini_batch_prompts=8", *extra)
    seen = _mini_batch_sizes(t)
    try:
        if steps > 1:
            return [t.rl_step() for _ in range(steps)]
        return t.rl_step(), seen
    finally:
        t.close()


def test_pooled_dynamic_sampling_fills_the_batch_from_any_rank(tmp_path):
    from dist_utils import run_distributed

    pooled = run_distributed(_pooled_job, 2, (str(tmp_path), True))
    per_rank = run_distributed(_pooled_job, 2, (str(tmp_path), False))
    # per rank: rank 1 draws to the bound (3 draws) and tops its 4 groups up with zero-signal ones
    (s0, _), (s1, _) = per_rank
    assert s0["dynamic_sampling/draws"] == 1 and s1["dynamic_sampling/draws"] == 3
    assert s1["dynamic_sampling/filled_zero_signal"] == 4
    # of all 16 groups drawn, rank 1's 12 had no signal: the same figure on both ranks (not 0/4 and 12/12)
    assert s0["dynamic_sampling/discarded_frac"] == s1["dynamic_sampling/discarded_frac"] == 12 / 16
    # pooled: rank 0's 4 groups with signal are half the step's 8; the pool draws again (both ranks, the same
    # number: 4 missing at a signal rate of 1/2 -> 8 prompts, 4 per rank), and rank 0's new 4 fill it
    (p0, n0), (p1, n1) = pooled
    assert p0["dynamic_sampling/draws"] == p1["dynamic_sampling/draws"] == 2
    assert p0["dynamic_sampling/filled_zero_signal"] == p1["dynamic_sampling/filled_zero_signal"] == 0
    assert p0["dynamic_sampling/surplus_groups"] == p1["dynamic_sampling/surplus_groups"] == 0
    assert p0["dp/responses_moved"] == 8  # half of rank 0's 8 groups x 2 responses go to rank 1
    assert n0 == n1 == [8]  # after the exchange each rank trains 4 groups x 2 responses


def test_first_draw_sized_by_the_signal_rate_of_the_steps_before(tmp_path):
    """algo.dynamic_sampling.first_draw_oversample, pooled over two ranks (rank 0's groups have signal, rank 1's
    none): the first step draws the batch (8: 4 with signal) and once more (8: 4 with signal), a signal rate of
    8/16; the next step's first draw asks for 23 prompts (8 groups with signal at ~90% at a rate of 0.5), 12 a
    rank, and rank 0's 12 fill the batch in that one draw, 4 to spare.  The rate is the same on both ranks."""
    from dist_utils import run_distributed

    for stats in run_distributed(_pooled_job, 2, (str(tmp_path), True, (0,), 2,
                                                  ["algo.dynamic_sampling.first_draw_oversample=true"])):
        assert [s["dynamic_sampling/draws"] for s in stats] == [2, 1]
        assert [s["dynamic_sampling/signal_rate"] for s in stats] == [0.5, 0.5]
        assert [s["dynamic_sampling/discarded_frac"] for s in stats] == [0.5, 0.5]
        assert stats[1]["dynamic_sampling/filled_zero_signal"] == 0 and stats[1]["dynamic_sampling/surplus_groups"] == 4


def test_pooled_dynamic_sampling_tops_up_evenly_at_the_draw_bound(tmp_path):
    """No group has signal anywhere: the pool draws to the bound (each extra draw a full batch, the rate's
    floor scaled up to the cap) and every rank tops up its equal share with zero-signal groups."""
    from dist_utils import run_distributed

    for stats, seen in run_distributed(_pooled_job, 2, (str(tmp_path), True, ())):
        assert stats["dynamic_sampling/draws"] == 3 and stats["dynamic_sampling/filled_zero_signal"] == 4
        assert stats["dynamic_sampling/discarded_frac"] == 1.0 and seen == [8]


def test_later_ppo_epochs_of_a_balanced_batch_train_every_response_once_per_pass(tmp_path):
    """train.ppo_epochs=3 at DP=2, balanced: every pass trains each rank's responses once (the later passes cut
    by ``Trainer._balanced_order``), each rank its equal share of every mini-batch."""
    from dist_utils import run_distributed

    out = run_distributed(_dp_job, 2, (str(tmp_path), True, 2, False, ("train.ppo_epochs=3", "warmstart.steps=0",
                                                                     "rollout.max_new_tokens=24")))
    n_mini = 4
    for rank in out:
        mbs = rank[1]
        assert len(mbs) == 3 * n_mini and {len(mb) for mb in mbs} == {2}
        passes = [sorted(s for mb in mbs[e * n_mini:(e + 1) * n_mini] for s in mb) for e in range(3)]
        assert passes[0] == passes[1] == passes[2]
        assert [mbs[e * n_mini:(e + 1) * n_mini] for e in (1, 2)] != [mbs[:n_mini]] * 2  # a pass's own cut


def test_balanced_order_cuts_equal_loads_where_a_reshuffle_does_not(tmp_path):
    """``_balanced_order`` on responses of very different lengths: a permutation, its ``n_mini`` cuts of equal
    counts within 3% of each other's FLOPs, a new one each pass; the plain reshuffle it replaces is far from
    even on the same batch (so each rank's share of a mini-batch followed its luck, not its whole load)."""
    from megaprorl.models.flops import train_flops
    from megaprorl.policy import build_seq_batch

    t = _trainer(tmp_path, "warmstart.steps=0", "train.mini_batch_prompts=4")
    try:
        lengths = [40, 38, 35, 30, 28, 25, 22, 20, 18, 15, 12, 10, 8, 5, 3, 1]
        batch = build_seq_batch([[3, 4]] * len(lengths), [[5] * n for n in lengths], 0)
        cost = lambda idx: sum(train_flops(t.flops_shape, [2 + lengths[i]]) for i in idx)  # noqa: E731
        n_mini, size = 4, 4

        def spread(order):
            loads = [cost(order[k * size:(k + 1) * size].tolist()) for k in range(n_mini)]
            return max(loads) / min(loads)

        orders = [t._balanced_order(batch, n_mini, e) for e in (1, 2)]
        for order in orders:
            assert sorted(order.tolist()) == list(range(len(lengths)))
            assert spread(order) < 1.03  # measured: 1.016
        assert not torch.equal(orders[0], orders[1])
        assert spread(t._group_order(len(lengths), 0, 1)) > 1.3  # measured: 2.99
    finally:
        t.close()


def _shared_job(rank, world, tmp, slow_rank, extra=()):
    """rollout.share_prompts_over_dp at DP=2 with one rank's decode steps slowed: what each rank generated, the
    step's stats and the trained sequences."""
    import time
    from pathlib import Path

    t = _trainer(Path(tmp) / f"slow{slow_rank}_r{rank}", "rollout.share_prompts_over_dp=true",
                 "train.mini_batch_prompts=4", "rollout.batch_size=2", "rollout.max_new_tokens=8", *extra)
    if rank == slow_rank:
        step = t.engine._step

        def slow_step(*a, **k):
            time.sleep(0.05)
            return step(*a, **k)

        t.engine._step = slow_step
    made = []
    generate = t.engine.generate

    def spy(prompts, params, **k):
        out = generate(prompts, params, **k)
        made.extend((tuple(r.prompt_ids), tuple(r.response_ids)) for r in out)
        return out

    t.engine.generate = spy
    seen = _mini_batch_sizes(t)
    try:
        stats = t.rl_step()
        return made, stats, seen
    finally:
        t.close()


def test_shared_prompts_go_to_the_rank_with_free_rows(tmp_path):
    """rollout.share_prompts_over_dp: the ranks' prompts of a round are one pool, claimed as rows free up.  With
    rank 1 slowed, rank 0 decodes more of them, and the other way round; either way every prompt is decoded once
    with the same tokens (per-prompt seeds: whoever decodes it), and after the exchange both ranks train their
    equal share of every mini-batch."""
    from dist_utils import run_distributed

    runs = {slow: run_distributed(_shared_job, 2, (str(tmp_path), slow)) for slow in (1, 0)}
    made = {slow: sorted(m for rank in out for m in rank[0]) for slow, out in runs.items()}
    assert made[1] == made[0] and len(made[1]) == 8 * 2  # 8 prompts x 2 samples, each once
    for slow, out in runs.items():
        claimed = [len(rank[0]) // 2 for rank in out]
        assert sum(claimed) == 8 and claimed[1 - slow] > claimed[slow], (slow, claimed)
        assert [rank[1]["rollout/prompts_claimed"] for rank in out] == claimed
        assert [rank[2] for rank in out] == [[4, 4], [4, 4]]  # each rank: 2 groups' responses per mini-batch


def test_shared_prompts_under_tensor_parallelism(tmp_path):
    """TP=2 x DP=2: each tensor-parallel pair claims through its first rank, which shares the claim with its
    pair, so both ranks of a pair decode the same prompts (every prompt once per pair); a slowed pair (rank 1
    slows its pair's lock-step decode) claims fewer."""
    from dist_utils import run_distributed

    out = run_distributed(_shared_job, 4, (str(tmp_path), 1, ("parallel.tensor_parallel=2",)))
    made = [sorted(rank[0]) for rank in out]
    assert made[0] == made[1] and made[2] == made[3]  # a pair's ranks: the same rollouts
    assert len(made[0]) + len(made[2]) == 8 * 2 and len(made[2]) > len(made[0])
    assert not set(made[0]) & set(made[2])


@pytest.mark.parametrize("extra,why", [
    (["parallel.balance_batch=false", "algo.dynamic_sampling.enabled=false"], "needs parallel.balance_batch"),
    (["algo.dynamic_sampling.enabled=true", "algo.dynamic_sampling.share_over_dp=false"], "share_over_dp"),
    (["model.num_experts=4", "model.moe_topk=2", "parallel.expert_parallel=2"], "experts across data-parallel")])
def test_shared_prompts_config_errors(extra, why):
    from megaprorl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"rollout.share_prompts_over_dp.*{why}"):
        load_config(os.path.join(ROOT, "examples", "demo.yaml"), ["rollout.share_prompts_over_dp=true", *extra])
