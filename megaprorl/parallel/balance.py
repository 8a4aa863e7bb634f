"""Balancing an RL step's responses over the data-parallel ranks (``parallel.balance_batch``).

Each data-parallel rank draws its own prompt groups, so one rank can hold the step's longest responses while
another holds short ones; every log-prob pass and every mini-batch's gradient all-reduce then waits for the
rank with the most work.  The ranks instead share the step's responses out afresh: the step's groups, in one
random order (the same on every rank), are cut into the step's mini-batches, and each mini-batch's responses
are split over the ranks so that each rank gets the same number and about the same model FLOPs.  A
mini-batch still holds whole groups, spread over the ranks; each response carries the advantage its group gave
it where the group was drawn, and the loss normalisers count tokens over all ranks, so a mini-batch's gradient
is the same sum whichever rank holds which response.

Responses, not whole groups, are the unit: at 32 data-parallel ranks, ProRL's 64 prompts per mini-batch are 2
groups per rank, too coarse to even out (a simulation with heavy-tailed lengths: the update 1.45x an even
split's with whole groups, where responses reach 1.00x; ``scripts/balance_sim.py``, ``docs/parallelism.md``).

The plan is computed from the gathered costs by every rank alike; only the responses that change rank travel
(``exchange_objects``), and each split goes to the rank that drew most of it.
"""

from __future__ import annotations

import bisect
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

Item = Tuple[int, int]  # (rank an item was drawn on, its index there)


def mini_batch_sizes(n_groups: int, n_mini: int) -> List[int]:
    """How many of a rank's ``n_groups`` groups each of the ``n_mini`` mini-batches takes: equal shares, the
    last one taking the remainder (the trainer's mini-batch cut)."""
    per = max(1, n_groups // n_mini)
    sizes = [per] * (n_mini - 1)
    return sizes + [n_groups - sum(sizes)]


def mini_batch_bounds(n_groups: int, n_mini: int) -> List[int]:
    """Where each mini-batch of a rank's ``n_groups`` groups starts, and the end: ``n_mini + 1`` offsets."""
    bounds = [0]
    for size in mini_batch_sizes(n_groups, n_mini):
        bounds.append(bounds[-1] + size)
    return bounds


def mini_batch_loads(costs: Sequence[float], n_groups: int, n_mini: int, group_size: int = 1) -> List[float]:
    """The load of each mini-batch of a rank's items ``costs``, in the order it trains them: ``n_groups`` groups of
    ``group_size`` items, cut as ``mini_batch_sizes``."""
    b = mini_batch_bounds(n_groups, n_mini)
    return [sum(costs[b[m] * group_size:b[m + 1] * group_size]) for m in range(n_mini)]


def split_even(costs: Sequence[float], parts: int, size: int) -> List[List[int]]:
    """Split the items ``costs`` (``parts * size`` of them) into ``parts`` lists of ``size`` items each with
    loads (cost sums) as even as it finds: largest first onto the lightest list that has room, then swaps
    between the heaviest and the lightest list, each the pair that lowers the larger of the two most, while one
    does and they differ by more than 0.1%.  Deterministic: ties go to the lower index."""
    if len(costs) != parts * size:
        raise ValueError(f"split_even: {len(costs)} items do not make {parts} lists of {size}")
    lists: List[List[int]] = [[] for _ in range(parts)]
    loads = [0.0] * parts
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        p = min((p for p in range(parts) if len(lists[p]) < size), key=lambda p: (loads[p], p))
        lists[p].append(i)
        loads[p] += costs[i]
    for _ in range(len(costs)):
        hi = max(range(parts), key=lambda p: (loads[p], -p))
        lo = min(range(parts), key=lambda p: (loads[p], p))
        gap = loads[hi] - loads[lo]
        if gap <= 1e-3 * loads[hi]:  # within 0.1%: even enough, and the swaps' gains only shrink from here
            break
        low = sorted(lists[lo], key=lambda b: (costs[b], b))
        low_costs = [costs[b] for b in low]
        best, best_gain = None, 0.0
        for a in lists[hi]:
            # swapping a (down) with b (up) moves d = cost a - cost b and lowers the pair's larger load by
            # min(d, gap - d): best at d = gap / 2, so look at the two b around cost a - gap / 2
            k = bisect.bisect_left(low_costs, costs[a] - gap / 2)
            for b in low[max(k - 1, 0):k + 1]:
                d = costs[a] - costs[b]
                if 0 < d < gap and min(d, gap - d) > best_gain:
                    best, best_gain = (a, b), min(d, gap - d)
        if best is None:
            break
        a, b = best
        lists[hi][lists[hi].index(a)] = b
        lists[lo][lists[lo].index(b)] = a
        d = costs[a] - costs[b]
        loads[hi] -= d
        loads[lo] += d
    return lists


def _label(lists: List[List[Item]], costs: dict) -> List[List[Item]]:
    """Give each list to a rank, the rank that drew most of its cost first, so that the fewest items move."""
    parts = len(lists)
    pairs = sorted(((-sum(costs[it] for it in lst if it[0] == r), p, r) for p, lst in enumerate(lists)
                    for r in range(parts)))
    owner: List[int] = [-1] * parts
    taken = set()
    for _, p, r in pairs:
        if owner[p] < 0 and r not in taken:
            owner[p] = r
            taken.add(r)
    out: List[List[Item]] = [[] for _ in range(parts)]
    for p, r in enumerate(owner):
        out[r] = lists[p]
    return out


def even_take(available: Sequence[int], total: int) -> List[int]:
    """How many of its ``available[r]`` items each rank gives so that they make ``total`` (or all there are)
    spread as evenly as the availabilities allow; the lower ranks give the remainder."""
    want = min(total, sum(available))
    out = [0] * len(available)
    while sum(out) < want:
        open_ = [r for r in range(len(available)) if out[r] < available[r]]
        share = max((want - sum(out)) // len(open_), 1)
        for r in open_:
            if sum(out) < want:
                out[r] += min(share, available[r] - out[r], want - sum(out))
    return out


def plan(costs: List[List[float]], n_mini: int, seed: int, group_size: int = 1) -> List[List[Item]]:
    """The balanced layout of a step: ``costs[r][i]`` is the cost of item i drawn on rank r, whose groups are
    ``group_size`` consecutive items; the ranks may have drawn different numbers of groups, as long as they
    split evenly over the ranks.  The groups, in the seed's order, are cut into mini-batches of
    ``mini_batch_sizes`` groups per rank; each mini-batch's items are split over the ranks.  Returns, per rank,
    the items it trains: its share of mini-batch 0, then of mini-batch 1, ..."""
    world = len(costs)
    if any(len(c) % group_size for c in costs):
        raise ValueError(f"balance plan: {[len(c) for c in costs]} items are not groups of {group_size}")
    groups = [(r, g) for r in range(world) for g in range(len(costs[r]) // group_size)]
    if len(groups) % world:
        raise ValueError(f"balance plan: {len(groups)} groups do not split evenly over {world} ranks")
    cost = {(r, i): float(c) for r in range(world) for i, c in enumerate(costs[r])}
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    out: List[List[Item]] = [[] for _ in range(world)]
    bounds = mini_batch_bounds(len(groups) // world, n_mini)
    for m in range(n_mini):
        size = bounds[m + 1] - bounds[m]
        chunk = [(r, g * group_size + j) for r, g in (groups[k] for k in order[bounds[m] * world:bounds[m + 1] * world])
                 for j in range(group_size)]
        lists = [[chunk[k] for k in lst] for lst in split_even([cost[it] for it in chunk], world, size * group_size)]
        for r, lst in enumerate(_label(lists, cost)):
            out[r] += lst
    return out


def step_imbalance(loads: Sequence[Sequence[float]]) -> float:
    """``loads[r][m]``: rank r's load in mini-batch m.  Each mini-batch waits for its most loaded rank, so the
    step takes the sum over mini-batches of their largest load; returns that over the sum of their mean loads
    (1: even; 2: the update takes twice what an even split would)."""
    n_mini = len(loads[0])
    slowest = sum(max(r[m] for r in loads) for m in range(n_mini))
    mean = sum(sum(r[m] for r in loads) for m in range(n_mini)) / len(loads)
    return slowest / mean if mean > 0 else 1.0


def exchange_objects(send: List[list], group=None) -> List[list]:
    """All-to-all of picklable lists over ``group``: ``send[d]`` goes to the group's rank d; returns what each
    rank sent here (indexed by source).  One scatter per source rank, so each rank receives only its own."""
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    if len(send) != world:
        raise ValueError(f"exchange_objects: {len(send)} lists for {world} ranks")
    got: List[list] = []
    for src in range(world):
        out = [None]
        dist.scatter_object_list(out, send if me == src else None, group=group, group_src=src)
        got.append(out[0])
    return got
