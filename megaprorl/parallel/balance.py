"""Balancing an RL step's prompt groups over the data-parallel ranks (``parallel.balance_batch``).

Each data-parallel rank draws its own prompt groups, so one rank can hold the step's longest responses while
another holds short ones; every log-prob pass and every mini-batch's gradient all-reduce then waits for the
rank with the most work.  The ranks instead share the step's groups out afresh: the step's groups in one
random order (the same on every rank) are cut into the step's mini-batches, and each mini-batch's groups are
split over the ranks so that each rank gets the same number of groups and about the same model FLOPs.  Whole
groups move, so each group's samples stay together (their advantages are computed per group), and the loss
normalisers, which count tokens over all ranks, are unchanged: a mini-batch's gradient is the same sum
whichever rank holds which of its groups.

The plan is computed from the gathered group costs by every rank alike; only the groups that change rank
travel (``exchange_objects``), and each split keeps as many groups where they were drawn as it can.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

Item = Tuple[int, int]  # (rank the group was drawn on, its index there)


def mini_batch_sizes(n_groups: int, n_mini: int) -> List[int]:
    """How many of a rank's ``n_groups`` groups each of the ``n_mini`` mini-batches takes: equal shares, the
    last one taking the remainder (the trainer's mini-batch cut)."""
    per = max(1, n_groups // n_mini)
    sizes = [per] * (n_mini - 1)
    return sizes + [n_groups - sum(sizes)]


def split_even(costs: Sequence[float], parts: int, size: int) -> List[List[int]]:
    """Split the items ``costs`` (``parts * size`` of them) into ``parts`` lists of ``size`` items each with
    loads (cost sums) as even as it finds: largest first onto the lightest list that has room, then pairwise
    swaps between the heaviest and the lightest list while one lowers the larger of the two.  Deterministic:
    ties go to the lower index."""
    if len(costs) != parts * size:
        raise ValueError(f"split_even: {len(costs)} items do not make {parts} lists of {size}")
    lists: List[List[int]] = [[] for _ in range(parts)]
    loads = [0.0] * parts
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        p = min((p for p in range(parts) if len(lists[p]) < size), key=lambda p: (loads[p], p))
        lists[p].append(i)
        loads[p] += costs[i]
    for _ in range(4 * len(costs)):
        hi = max(range(parts), key=lambda p: (loads[p], -p))
        lo = min(range(parts), key=lambda p: (loads[p], p))
        gap = loads[hi] - loads[lo]
        best, best_d = None, 0.0
        for a in lists[hi]:
            for b in lists[lo]:
                d = costs[a] - costs[b]  # moving a down and b up narrows the gap by 2d
                if 0 < d < gap and min(d, gap - d) > best_d:
                    best, best_d = (a, b), min(d, gap - d)
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
    """Give each list to a rank, the rank that drew most of its cost first, so that the fewest groups move."""
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


def plan(costs: List[List[float]], n_mini: int, seed: int) -> List[List[Item]]:
    """The balanced layout of a step: ``costs[r][i]`` is the cost of group i drawn on rank r (every rank the
    same number).  Returns, per rank, the groups it trains, in order: its share of mini-batch 0, then of
    mini-batch 1, ... (``mini_batch_sizes`` of them each, as it would cut its own groups)."""
    world = len(costs)
    n = len(costs[0])
    if any(len(c) != n for c in costs):
        raise ValueError("balance plan: every rank must hold the same number of groups")
    items = [(r, i) for r in range(world) for i in range(n)]
    cost = {(r, i): float(costs[r][i]) for r, i in items}
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    out: List[List[Item]] = [[] for _ in range(world)]
    start = 0
    for size in mini_batch_sizes(n, n_mini):
        chunk = [items[k] for k in order[start:start + size * world]]
        start += size * world
        lists = [[chunk[k] for k in lst] for lst in split_even([cost[it] for it in chunk], world, size)]
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
