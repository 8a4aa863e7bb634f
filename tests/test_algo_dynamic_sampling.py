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


def test_first_draw_oversample_scales_the_first_draw_by_the_steps_signal_rate():
    """algo.dynamic_sampling.first_draw_oversample: a step's first draw asks for the fewest prompts whose groups
    with signal reach B with ~90% probability at the running signal rate of the steps before (B before any step;
    the rate at least MIN_SIGNAL_RATE, the draw at most the cap); later draws as before."""
    import math

    from megaprorl.algo.dynamic_sampling import (FIRST_DRAW_Z, SIGNAL_RATE_MEMORY, DynamicSampler,
                                                 DynamicSamplingConfig, draw_size, first_draw_size,
                                                 running_signal_rate)

    def enough(n, p, b):  # n p - z sqrt(n p (1 - p)) >= b: b groups with signal at ~90%
        return n * p - FIRST_DRAW_Z * math.sqrt(n * p * (1 - p)) >= b - 1e-9

    for b, p in ((8, 0.5), (8, 0.3), (64, 0.5), (256, 0.6), (256, 0.8)):
        n = first_draw_size(b, p, 10 ** 6)
        assert enough(n, p, b) and not enough(n - 1, p, b), (b, p, n)
    assert first_draw_size(8, 0.5, 40) == 23 and first_draw_size(256, 0.6, 2000) == 449  # B / p: 16, 427
    assert first_draw_size(8, None, 40) == 8 and first_draw_size(8, 1.0, 40) == 8
    assert first_draw_size(8, 0.01, 400) == first_draw_size(8, 0.1, 400) == 123 and first_draw_size(8, 0.01, 40) == 40
    assert running_signal_rate(None, 3, 4) == 0.75 and running_signal_rate(0.5, 0, 0) == 0.5
    assert running_signal_rate(0.5, 1, 4) == pytest.approx(SIGNAL_RATE_MEMORY * 0.5 + (1 - SIGNAL_RATE_MEMORY) * 0.25)
    on = DynamicSamplingConfig(max_extra_draws=4, first_draw_oversample=True)
    s = DynamicSampler(8, on, first_rate=0.5)
    assert s.next_draw() == 23
    s.add(list(range(23)), [[0.0, 1.0]] * 4 + [[1.0, 1.0]] * 19)  # 4 groups with signal
    assert s.next_draw() == draw_size(4, 4, 23, True, 8) == 8  # an extra draw as before
    assert DynamicSampler(8, on, first_rate=None).next_draw() == 8  # the run's first step: no rate yet
    assert DynamicSampler(8, DynamicSamplingConfig(), first_rate=0.5).next_draw() == 8  # option off
    off = DynamicSamplingConfig(enabled=False, first_draw_oversample=True)
    assert DynamicSampler(8, off, first_rate=0.5).next_draw() == 8
