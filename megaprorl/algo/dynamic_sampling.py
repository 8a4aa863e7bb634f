"""Dynamic sampling (DAPO): keep only groups whose rewards are not all equal.

A group whose responses all got the same (shaped) reward has zero group-baseline advantage and
contributes no policy gradient.  The trainer drops such groups and draws more prompts until it has
the B groups it wants, at most ``max_extra_draws`` extra draws per RL step; if the bound is reached
it tops the batch up with zero-signal groups.  ``DynamicSampler`` is that loop's bookkeeping (the
trainer's ``_draw_groups`` drives it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Generic, List, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")


MIN_SIGNAL_RATE = 0.1  # the lowest signal rate an extra draw scales by (at most 10x the missing groups)
SIGNAL_RATE_MEMORY = 0.7  # first_draw_oversample: the weight of the past in the running mean of the signal rate
FIRST_DRAW_Z = 1.28  # first_draw_oversample: the first draw has the batch's groups with ~90% probability


@dataclass
class DynamicSamplingConfig:
    enabled: bool = True
    max_extra_draws: int = 4  # extra generate+score rounds per RL step beyond the first
    # an extra draw asks for the missing groups over the share of groups with signal seen so far in the step
    # (at most a full batch), not for the missing groups alone: fewer rounds, each a whole generation's latency
    oversample: bool = True
    # at data-parallel > 1 the ranks draw as one pool: they stop together once the step has its groups with
    # signal, whichever rank drew them (needs parallel.balance_batch, which then evens the ranks' shares out)
    share_over_dp: bool = True
    # the first draw of a step asks for enough prompts that, at the signal rate of the steps before (a running
    # mean of the share of groups with signal), B of them have signal with ~90% probability, instead of B: fewer
    # extra rounds, each a whole generation's latency (its tail); groups with signal beyond B are dropped as an
    # extra draw's are
    first_draw_oversample: bool = False


def draw_size(missing: int, kept: int, generated: int, oversample: bool, cap: int) -> int:
    """How many prompts the next draw asks for: ``missing``, or with ``oversample`` (after a first draw) the
    missing groups over the signal rate seen so far, ``kept / generated`` (at least ``MIN_SIGNAL_RATE``), at
    most ``max(cap, missing)``."""
    if not oversample or generated == 0 or missing <= 0:
        return max(missing, 0)
    rate = max(kept / generated, MIN_SIGNAL_RATE)
    return min(math.ceil(missing / rate - 1e-9), max(cap, missing))


def first_draw_size(target: int, rate: Optional[float], cap: int) -> int:
    """The first draw of a step: the fewest prompts N whose groups with signal, each with probability ``rate``
    (at least ``MIN_SIGNAL_RATE``), reach ``target`` with ~90% probability (binomial, normal approximation:
    N p - z sqrt(N p (1 - p)) = target, z = ``FIRST_DRAW_Z``), so that one draw usually fills the batch; at
    most ``cap``; ``target`` itself before any step has a rate."""
    if rate is None or target <= 0:
        return max(target, 0)
    p = min(max(rate, MIN_SIGNAL_RATE), 1.0)
    spread = FIRST_DRAW_Z * math.sqrt(p * (1 - p))
    root = (spread + math.sqrt(spread * spread + 4 * p * target)) / (2 * p)  # sqrt(N)
    return max(target, min(math.ceil(root * root - 1e-9), cap))


def running_signal_rate(previous: Optional[float], kept: int, generated: int) -> Optional[float]:
    """The running mean of the share of groups with signal after a step that kept ``kept`` of ``generated``."""
    if generated <= 0:
        return previous
    rate = kept / generated
    return rate if previous is None else SIGNAL_RATE_MEMORY * previous + (1 - SIGNAL_RATE_MEMORY) * rate


def groups_with_signal(rewards: torch.Tensor, group_ids: torch.Tensor, tol: float = 0.0,
                       n_groups: Optional[int] = None) -> torch.Tensor:
    """Bool mask [G] over group ids 0..G-1: True where ``max - min > tol`` within the group.

    ``G = n_groups`` or ``max(group_ids) + 1``; ids with no member and groups of size one are False.
    """
    gids = group_ids.long()
    g = int(n_groups) if n_groups is not None else (int(gids.max()) + 1 if gids.numel() else 0)
    if gids.numel() and (int(gids.min()) < 0 or int(gids.max()) >= g):
        raise ValueError(f"group ids must lie in [0, {g})")
    r = rewards.double()
    hi = torch.full((g,), float("-inf"), dtype=torch.float64, device=r.device).scatter_reduce(
        0, gids, r, reduce="amax", include_self=True)
    lo = torch.full((g,), float("inf"), dtype=torch.float64, device=r.device).scatter_reduce(
        0, gids, r, reduce="amin", include_self=True)
    present = torch.isfinite(hi) & torch.isfinite(lo)
    return present & ((hi - lo) > tol)


def group_has_signal(rewards: Sequence[float], tol: float = 0.0) -> bool:
    """One group: True when its rewards are not all equal (``max - min > tol``)."""
    vals = [float(x) for x in rewards]
    return len(vals) > 1 and (max(vals) - min(vals)) > tol


class DynamicSampler(Generic[T]):
    """Accumulates groups with signal over successive draws.

        sampler = DynamicSampler(target_groups=B, cfg=cfg.algo.dynamic_sampling)
        while sampler.can_draw():
            items, rewards = draw(sampler.next_draw())  # one generate+score round
            sampler.add(items, rewards)                  # rewards[i]: the rewards of group i
        batch = sampler.take()                           # B groups (topped up if the bound was hit)

    Groups are arbitrary objects; ``rewards`` is one sequence of rewards per group (a [G, n] tensor
    works).  With ``cfg.enabled`` False every group is kept and only one draw is allowed.
    Counters: ``draws``, ``generated`` (groups seen), ``kept`` (with signal), ``discarded``
    (without), ``filled`` (zero-signal groups used to top up in ``take``).
    """

    def __init__(self, target_groups: int, cfg: Optional[DynamicSamplingConfig] = None, tol: float = 0.0,
                 first_rate: Optional[float] = None):
        if target_groups < 0:
            raise ValueError("target_groups must be >= 0")
        self.cfg = cfg if cfg is not None else DynamicSamplingConfig()
        if self.cfg.max_extra_draws < 0:
            raise ValueError("algo.dynamic_sampling.max_extra_draws must be >= 0")
        self.target = int(target_groups)
        self.tol = tol
        # cfg.first_draw_oversample: the signal rate of the steps before, which the first draw scales by
        self.first_rate = first_rate if (self.cfg.enabled and self.cfg.first_draw_oversample) else None
        self._kept: List[T] = []
        self._spare: List[T] = []
        self.draws = 0
        self.generated = 0
        self.kept = 0
        self.discarded = 0
        self.filled = 0

    @property
    def available(self) -> int:
        """Groups with signal held now (not yet taken)."""
        return len(self._kept)

    @property
    def max_draws(self) -> int:
        return 1 + (self.cfg.max_extra_draws if self.cfg.enabled else 0)

    def is_full(self) -> bool:
        return len(self._kept) >= self.target

    def can_draw(self) -> bool:
        """True while more groups are wanted and the draw bound is not reached."""
        return not self.is_full() and self.draws < self.max_draws

    def wanted(self) -> int:
        """Groups still missing."""
        return max(self.target - len(self._kept), 0)

    def next_draw(self) -> int:
        """The size of this sampler's next draw (``draw_for`` its own counts)."""
        return self.draw_for(self.target, len(self._kept), self.kept, self.generated)

    def draw_for(self, target: int, held: int, kept: int, generated: int) -> int:
        """The size of the next draw of a pool that wants ``target`` groups with signal, holds ``held`` of them
        and has kept ``kept`` of the ``generated`` groups it drew this step (this sampler's own, or the
        data-parallel ranks' together): ``draw_size`` (the missing groups, scaled up by ``cfg.oversample``); the
        first, with ``cfg.first_draw_oversample``, by the steps' signal rate: ``first_draw_size``."""
        if self.draws == 0 and self.first_rate is not None:
            return first_draw_size(max(target - held, 0), self.first_rate, self.max_draws * target)
        return draw_size(max(target - held, 0), kept, generated, self.cfg.oversample and self.cfg.enabled, target)

    @property
    def spare(self) -> int:
        """Zero-signal groups held now, for topping up."""
        return len(self._spare)

    def add(self, items: Sequence[T], rewards: Sequence[Sequence[float]]) -> List[bool]:
        """One draw: sort its groups into kept / spare.  Returns the per-group signal flags."""
        if len(items) != len(rewards):
            raise ValueError(f"{len(items)} groups but {len(rewards)} reward lists")
        flags = []
        for item, rw in zip(items, rewards):
            vals = rw.tolist() if isinstance(rw, torch.Tensor) else list(rw)
            ok = group_has_signal(vals, self.tol) if self.cfg.enabled else True
            (self._kept if ok else self._spare).append(item)
            flags.append(ok)
        self.draws += 1
        self.generated += len(items)
        self.kept += sum(1 for f in flags if f)
        self.discarded += sum(1 for f in flags if not f)
        return flags

    def take(self, n_groups: Optional[int] = None, fill: bool = True) -> List[T]:
        """Remove and return up to ``n_groups`` (default: the target) groups in arrival order; when
        there are too few with signal and ``fill``, top up with zero-signal groups (counted in ``filled``)."""
        n = self.target if n_groups is None else int(n_groups)
        out = self._kept[:n]
        self._kept = self._kept[n:]
        while fill and len(out) < n and self._spare:
            out.append(self._spare.pop(0))
            self.filled += 1
        return out

    def stats(self) -> Dict[str, Any]:
        return {"dynamic_sampling/draws": self.draws,
                "dynamic_sampling/discarded_frac": self.discarded / max(self.generated, 1),
                "dynamic_sampling/filled_zero_signal": self.filled}
