"""Advantage estimators for outcome rewards: group baselines, global whitening, KL folded into rewards.

Shapes: ``N`` responses (rows), ``L`` token positions per row; ``mask[N, L]`` marks the tokens the
loss is taken over (the response tokens).  ``group_ids[N]`` (int) says which prompt each response
answers; ids need not be contiguous or sorted.

REINFORCE++-baseline (the ProRL default, see PRORL_RECIPE.md)::

    R~_i   = R_i - mean_{j in g(i)} R_j                   (group baseline)
    A_i,t  = R~_i                                         (every valid token of response i)
    A      <- (A - mean(A)) / (std(A) + 1e-8)             (mean/std over the valid tokens of the
                                                           GLOBAL batch: all DP ranks)

Other group estimators:
  * ``grpo``: (R_i - mean_g) / (std_g + eps_std) with the *unbiased* (Bessel) group std, as verl and
    OpenRLHF compute it (``torch.std`` default), eps_std = 1e-6.
  * ``rloo``: R_i - mean of the *other* responses of the group = n/(n-1) * (R_i - mean_g).
A group of size one has no baseline: its advantage is 0 under every estimator (for
``reinforce_pp_baseline`` this falls out of R - mean; for grpo/rloo it is set explicitly).

KL folded into the reward (``algo.kl.placement = reward``): token rewards
``r_t = -beta * kl_t`` on every valid token plus the (baselined) outcome at the last valid token, and
the token advantage is the undiscounted (gamma = 1) return-to-go ``A_t = sum_{s >= t, valid} r_s``.
Whitening, when on, is applied afterwards (as OpenRLHF does for REINFORCE++).
"""

from __future__ import annotations

from typing import Optional

import torch

ESTIMATORS = ("reinforce_pp_baseline", "grpo", "rloo")
GRPO_STD_EPS = 1e-6


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-response group size, group sum, and group sum of squares (float64)."""
    gids = group_ids.long()
    _, inv = torch.unique(gids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    r = rewards.double()
    size = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r))
    total = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, r)
    return inv, size, total


def group_baseline_advantages(rewards: torch.Tensor, group_ids: torch.Tensor,
                              estimator: str = "reinforce_pp_baseline") -> torch.Tensor:
    """One scalar advantage per response [N] from scalar rewards [N] and their group ids [N].

    See the module docstring for the estimators.  Computed in float64, returned in the dtype of
    ``rewards`` (float32 for integer rewards).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ESTIMATORS}")
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} "
                         "must be equal 1-D shapes")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)
    r = rewards.double()
    inv, size, total = _group_stats(rewards, group_ids)
    n = size[inv]
    mean = total[inv] / n
    single = n <= 1
    if estimator == "reinforce_pp_baseline":
        adv = r - mean
    elif estimator == "rloo":
        adv = torch.where(single, torch.zeros_like(r), (r - mean) * n / (n - 1).clamp_min(1.0))
    else:  # grpo
        dev2 = torch.zeros_like(size).index_add_(0, inv, (r - mean) ** 2)
        std = torch.sqrt(dev2[inv] / (n - 1).clamp_min(1.0))  # unbiased (Bessel) group std
        adv = torch.where(single, torch.zeros_like(r), (r - mean) / (std + GRPO_STD_EPS))
    adv = torch.where(single, torch.zeros_like(adv), adv)
    return adv.to(out_dtype)


def whiten(values: torch.Tensor, mask: torch.Tensor, group=None, eps: float = 1e-8) -> torch.Tensor:
    """(v - mean) / (std + eps) over the masked tokens of the global batch; 0 where mask is 0.

    ``mean`` and the *population* ``std`` are taken over every valid token of every rank of
    ``group`` (a torch.distributed process group; None = this process only).  Statistics are
    reduced in float64 in two passes (sum and count, then the sum of squared deviations), so
    every rank gets bit-identical statistics; every rank of ``group`` must call this (collective).
    With no valid token anywhere the result is all zeros.
    """
    m = mask.to(torch.bool)
    v = values.double()
    s = torch.stack([torch.where(m, v, torch.zeros_like(v)).sum(), m.sum().double()])
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(s, group=group)
    total, count = s[0], s[1]
    if float(count) == 0.0:
        return torch.zeros_like(values, dtype=values.dtype if values.is_floating_point() else torch.float32)
    mean = total / count
    dev2 = torch.where(m, (v - mean) ** 2, torch.zeros_like(v)).sum().reshape(1)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(dev2, group=group)
    std = torch.sqrt(dev2[0] / count)
    out = torch.where(m, (v - mean) / (std + eps), torch.zeros_like(v))
    return out.to(values.dtype if values.is_floating_point() else torch.float32)


_whiten = whiten  # compute_advantages' ``whiten`` flag shadows the function name


def fold_kl_into_rewards(outcome: torch.Tensor, mask: torch.Tensor, kl: Optional[torch.Tensor] = None,
                         beta: float = 0.0) -> torch.Tensor:
    """Token rewards [N, L]: ``-beta * kl_t`` on every valid token, plus ``outcome[i]`` added at the
    last valid token of row i.  Rows without a valid token are all zero (their outcome is dropped).
    """
    m = mask.to(torch.bool)
    n, length = m.shape
    r = torch.zeros(m.shape, dtype=torch.float64, device=m.device)
    if kl is not None and beta != 0.0:
        r = torch.where(m, -beta * kl.double(), r)
    pos = torch.arange(length, device=m.device).expand(n, length)
    last = torch.where(m, pos, torch.full_like(pos, -1)).max(dim=-1).values  # -1 = no valid token
    has = last >= 0
    rows = torch.nonzero(has).squeeze(-1)
    r[rows, last[rows]] += outcome.double()[rows]
    return r.to(outcome.dtype if outcome.is_floating_point() else torch.float32)


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Undiscounted (gamma = 1) return-to-go over valid tokens: ``G_t = sum_{s >= t, mask_s} r_s``;
    0 at invalid positions."""
    m = mask.to(torch.bool)
    r = torch.where(m, token_rewards.double(), torch.zeros_like(token_rewards, dtype=torch.float64))
    g = torch.flip(torch.cumsum(torch.flip(r, dims=[-1]), dim=-1), dims=[-1])
    g = torch.where(m, g, torch.zeros_like(g))
    return g.to(token_rewards.dtype if token_rewards.is_floating_point() else torch.float32)


def token_advantages(seq_adv: torch.Tensor, mask: torch.Tensor, whiten: bool = True, group=None,
                     token_penalty: Optional[torch.Tensor] = None, eps: float = 1e-8) -> torch.Tensor:
    """Token advantages [N, L] (float32) from each response's scalar advantage [N] (steps 2 and 3 of
    ``compute_advantages``).  Nothing here looks at the groups, so the responses may sit on any rank: the
    trainer computes the group baselines where the groups were drawn and spreads the responses over the
    data-parallel ranks before this (``parallel.balance_batch``)."""
    m = mask.to(torch.bool)
    if m.dim() != 2 or m.shape[0] != seq_adv.shape[0]:
        raise ValueError(f"mask {tuple(m.shape)} must be [N, L] with N = len(advantages) = {seq_adv.shape[0]}")
    adv = seq_adv.double()
    if token_penalty is not None:
        tok = returns_to_go(fold_kl_into_rewards(adv, m, token_penalty.double(), beta=1.0), m)
    else:
        tok = torch.where(m, adv[:, None].expand(m.shape), torch.zeros(m.shape, dtype=torch.float64, device=m.device))
    if whiten:
        tok = _whiten(tok, m, group=group, eps=eps)
    return tok.float()


def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor,
                       estimator: str = "reinforce_pp_baseline", whiten: bool = True, group=None,
                       token_penalty: Optional[torch.Tensor] = None, eps: float = 1e-8) -> torch.Tensor:
    """Token advantages [N, L] (float32) from scalar rewards [N].

    1. scalar group advantage per response (``group_baseline_advantages``);
    2. broadcast to every valid token of the response — or, when ``token_penalty`` [N, L] is given
       (``beta * kl_t``, KL placed in the reward), the return-to-go of the token rewards
       ``-token_penalty_t`` + group advantage at the last valid token (``fold_kl_into_rewards``);
    3. when ``whiten``: global whitening over the valid tokens of all ranks of ``group``
       (collective over ``group``: every rank must call).
    Positions where ``mask`` is 0 are 0.
    """
    m = mask.to(torch.bool)
    if m.dim() != 2 or m.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask {tuple(m.shape)} must be [N, L] with N = len(rewards) = {rewards.shape[0]}")
    adv = group_baseline_advantages(rewards.double(), group_ids, estimator)
    return token_advantages(adv, m, whiten, group, token_penalty, eps)
