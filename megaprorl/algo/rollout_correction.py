"""Rollout correction: importance weights for the gap between the rollout engine and the trainer.

The engine draws each token from its own distribution ``pi_engine`` (TensorRT-LLM's kernels, its bf16 or FP8
weights, its sampler); the clipped ratio is taken against ``pi_old``, the trainer's forward with the same
weights.  The two differ (more so in long runs, with MoE routing, or with FP8 rollouts), so the update is
slightly off-policy even on its first mini-batch.  Weighting each token's policy-gradient term by the
importance ratio ``rho = pi_old / pi_engine`` corrects that, truncated (TIS, Yao et al. 2025, "Your efficient
RL framework secretly brings you off-policy RL training") or masked outside a band (MIS), which bounds the
variance the ratio adds.

Levels (``log rho`` clamped to +-``log_ratio_clamp`` before the exponential):
  token      rho_t = exp(old_t - engine_t)
  sequence   rho_i = exp(sum_t (old_t - engine_t)) over the response's tokens, for each of its tokens
  geometric  rho_i = exp(mean_t (old_t - engine_t)): the per-token geometric mean, which does not grow with
             the response's length
Modes:
  truncate   w = min(rho, cap)
  mask       w = rho where cap_low <= rho <= cap, else 0 (cap_low 0 means 1 / cap)

The weight multiplies the advantage.  The clipped surrogate is positively homogeneous in A: for w >= 0 both
branches, which of them is taken and the dual clip scale with w, so ``pg(w A) = w pg(A)`` and the fused
kernels need no new input.  The KL and entropy terms are not weighted, and a masked token still counts in the
loss's normaliser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask")


@dataclass
class RolloutCorrectionConfig:
    level: str = ""  # "" (off) | token | sequence | geometric
    mode: str = "truncate"  # truncate (TIS) | mask (MIS)
    cap: float = 2.0  # the upper bound on the weight (truncate) or of the band kept (mask)
    cap_low: float = 0.0  # mask: the band's lower bound; 0 = 1 / cap
    log_ratio_clamp: float = 20.0


def mismatch_stats(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """How far the engine's log-probs of the sampled tokens are from the trainer's, over the response tokens:
    the mean absolute difference, and the k3 estimate of KL(pi_engine || pi_old) from the engine's samples
    (``exp(d) - 1 - d``, ``d = old - engine``, unbiased and >= 0)."""
    m = mask.double()
    n = m.sum().clamp(min=1.0)
    d = (old_logp.double() - engine_logp.double()) * m
    k3 = (torch.expm1(d.clamp(-20.0, 20.0)) - d) * m
    return {"rollout/logprob_mismatch": float((d.abs().sum() / n)), "rollout/mismatch_k3": float(k3.sum() / n)}


def rollout_correction_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                               level: str, mode: str = "truncate", cap: float = 2.0, cap_low: float = 0.0,
                               log_ratio_clamp: float = 20.0) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Per-token weights [B, L] (0 outside ``mask``) for the policy-gradient term, and their statistics.

    ``old_logp`` / ``engine_logp``: the trainer's and the engine's log-probs of the sampled tokens, laid out
    as ``mask`` ([B, L]; a row is a sequence).  Statistics, over the tokens (level ``token``) or the sequences
    with at least one response token (the other levels): the mean weight, the fraction truncated or masked,
    and the normalised effective sample size ``(sum w)^2 / (n sum w^2)`` (1: no loss of samples).
    """
    if level not in LEVELS:
        raise ValueError(f"rollout correction level must be one of {LEVELS}, got {level!r}")
    if mode not in MODES:
        raise ValueError(f"rollout correction mode must be one of {MODES}, got {mode!r}")
    if not cap > 0:
        raise ValueError(f"rollout correction cap must be > 0, got {cap}")
    low = cap_low if cap_low > 0 else 1.0 / cap
    if mode == "mask" and not low < cap:
        raise ValueError(f"rollout correction band [{low}, {cap}] is empty")
    m = mask.double()
    d = (old_logp.double() - engine_logp.double()) * m

    def weigh(log_rho):  # the weights of some units, and which of them were truncated or masked
        rho = torch.exp(log_rho.clamp(-log_ratio_clamp, log_ratio_clamp))
        if mode == "truncate":
            return torch.clamp(rho, max=cap), rho > cap
        cut = (rho < low) | (rho > cap)
        return torch.where(cut, torch.zeros_like(rho), rho), cut

    if level == "token":
        wu, cu = weigh(d[m.bool()])
        w = torch.zeros_like(d)
        w[m.bool()] = wu
    else:
        tokens = m.sum(-1)
        per_seq = d.sum(-1) if level == "sequence" else d.sum(-1) / tokens.clamp(min=1.0)
        w_seq, cut_seq = weigh(per_seq)
        w = w_seq[:, None] * m
        wu, cu = w_seq[tokens > 0], cut_seq[tokens > 0]
    n = int(wu.numel())
    total, sq = float(wu.sum()), float((wu * wu).sum())
    name = "truncated_frac" if mode == "truncate" else "masked_frac"
    stats = {"rollout_correction/weight_mean": total / n if n else 1.0,
             f"rollout_correction/{name}": float(cu.double().mean()) if n else 0.0,
             "rollout_correction/ess": total * total / (n * sq) if n and sq > 0 else (1.0 if not n else 0.0)}
    return w.to(old_logp.dtype), stats
