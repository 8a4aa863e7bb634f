"""Dynamic sampling: which groups carry signal, and the accumulating sampler."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megaprorl.algo.dynamic_sampling import DynamicSampler, DynamicSamplingConfig, group_has_signal, groups_with_signal


def test_groups_with_signal_by_hand():
    # group 0: (1, 1, 1) all correct -> no signal; group 1: (0, 1, 0) -> signal; group 2: (0, 0, 0) -> none;
    # group 3: (0.5) size one -> none; group 4: no member -> none; group 5: (0.2, 0.25) -> signal
    rewards = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0, 0.5, 0.2, 0.25])
    gids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 5, 5])
    assert groups_with_signal(rewards, gids).tolist() == [False, True, False, False, False, True]
    # with tol = 0.1 the 0.05 spread of group 5 is not signal
    assert groups_with_signal(rewards, gids, tol=0.1).tolist() == [False, True, False, False, False, False]
    # n_groups pads trailing empty groups
    assert groups_with_signal(rewards, gids, n_groups=7).tolist()[-1] is False
    with pytest.raises(ValueError):
        groups_with_signal(rewards, gids, n_groups=3)
    assert groups_with_signal(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_group_order_does_not_matter():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0])
    gids = torch.tensor([1, 0, 1, 0])  # interleaved
    assert groups_with_signal(rewards, gids).tolist() == [False, True]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=5), min_size=1, max_size=6))
def test_tensor_and_scalar_forms_agree(groups):
    rewards = torch.tensor([r for g in groups for r in g])
    gids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    assert groups_with_signal(rewards, gids).tolist() == [group_has_signal(g) for g in groups]


def test_sampler_accumulates_until_full():
    s = DynamicSampler(target_groups=3, cfg=DynamicSamplingConfig(enabled=True, max_extra_draws=4))
    assert s.can_draw() and s.wanted() == 3
    # draw 1: a (signal), b (all equal), c (all equal)
    assert s.add(["a", "b", "c"], [[0, 1], [1, 1], [0, 0]]) == [True, False, False]
    assert s.wanted() == 2 and not s.is_full() and s.can_draw()
    # draw 2 (of the 2 wanted): d (signal), e (signal)
    s.add(["d", "e"], torch.tensor([[0.0, 0.5], [1.0, 0.0]]))
    assert s.is_full() and not s.can_draw()
    assert (s.draws, s.generated, s.kept, s.discarded) == (2, 5, 3, 2)
    assert s.take() == ["a", "d", "e"]
    assert s.filled == 0
    assert s.stats() == {"dynamic_sampling/draws": 2, "dynamic_sampling/discarded_frac": 2 / 5,
                         "dynamic_sampling/filled_zero_signal": 0}


def test_sampler_draw_bound_and_top_up():
    s = DynamicSampler(target_groups=3, cfg=DynamicSamplingConfig(enabled=True, max_extra_draws=1))
    s.add(["a", "b"], [[1, 1], [0, 1]])  # b kept
    assert s.can_draw()
    s.add(["c", "d"], [[0, 0], [1, 1]])  # nothing kept; bound of 1 + 1 draws reached
    assert not s.can_draw() and not s.is_full()
    # top up with zero-signal groups in arrival order
    assert s.take() == ["b", "a", "c"]
    assert s.filled == 2
    # without filling only the groups with signal come back
    s2 = DynamicSampler(target_groups=3, cfg=DynamicSamplingConfig(enabled=True, max_extra_draws=0))
    s2.add(["a", "b"], [[1, 1], [0, 1]])
    assert not s2.can_draw()
    assert s2.take(fill=False) == ["b"]


def test_sampler_take_partial_and_overfull():
    s = DynamicSampler(target_groups=2)
    s.add(list("abc"), [[0, 1]] * 3)  # more than wanted: all kept, take returns the target count
    assert s.is_full() and s.available == 3
    assert s.take() == ["a", "b"]
    assert s.available == 1 and s.take(5) == ["c"]
    assert s.take() == []


def test_sampler_disabled_keeps_everything_in_one_draw():
    s = DynamicSampler(target_groups=2, cfg=DynamicSamplingConfig(enabled=False, max_extra_draws=4))
    assert s.max_draws == 1
    s.add(["a", "b"], [[1, 1], [0, 0]])
    assert s.is_full() and not s.can_draw() and s.discarded == 0
    assert s.take() == ["a", "b"]


def test_sampler_errors_and_group_of_one():
    s = DynamicSampler(target_groups=1)
    with pytest.raises(ValueError):
        s.add(["a"], [[0, 1], [1, 0]])
    assert s.add(["solo"], [[0.7]]) == [False]  # a group of one has no signal
    with pytest.raises(ValueError):
        DynamicSampler(target_groups=-1)
    with pytest.raises(ValueError):
        DynamicSampler(1, DynamicSamplingConfig(max_extra_draws=-1))


def test_draw_size_scales_the_missing_groups_by_the_signal_rate():
    from megaprorl.algo.dynamic_sampling import draw_size

    assert draw_size(8, 0, 0, True, 8) == 8  # the first draw: what is missing
    assert draw_size(3, 5, 8, False, 8) == 3  # without oversampling: what is missing
    assert draw_size(3, 5, 10, True, 8) == 6  # half the groups had signal: twice the missing
    assert draw_size(3, 6, 8, True, 8) == 4  # 3 / 0.75
    assert draw_size(6, 0, 8, True, 8) == 8  # no signal yet: the rate's floor (0.1), at most a full batch
    assert draw_size(9, 0, 8, True, 8) == 9  # the cap never asks for fewer than are missing
    assert draw_size(0, 8, 8, True, 8) == 0


def test_sampler_next_draw_oversamples_unless_told_not_to():
    s = DynamicSampler(target_groups=4, cfg=DynamicSamplingConfig(enabled=True, max_extra_draws=4))
    s.add(["a", "b", "c", "d"], [[0, 1], [1, 1], [0, 0], [1, 0]])  # 2 of 4 with signal
    assert s.wanted() == 2 and s.next_draw() == 4 and s.spare == 2
    plain = DynamicSampler(target_groups=4, cfg=DynamicSamplingConfig(enabled=True, oversample=False))
    plain.add(["a", "b", "c", "d"], [[0, 1], [1, 1], [0, 0], [1, 0]])
    assert plain.next_draw() == 2
