"""Per-token policy loss: the executable specification.

Every fused kernel (Triton, CUDA, fused LM-head) is tested against the functions here.

Notation (one row per token, ``T`` tokens):
  logp      log-prob of the sampled token under the policy being trained (requires grad)
  old_logp  log-prob under the policy that generated the sample (no grad)
  ref_logp  log-prob under the frozen reference policy (no grad), or None when beta == 0
  adv       advantage per token
  weight    per-token loss weight; the scalar loss is ``sum(weight * loss_t)``.  For the
            token-mean over the global batch ``weight = mask / n_valid_tokens_global``; for the
            sequence-mean ``weight = mask / (len_i * n_seqs_global)``.  Folding the normaliser into
            the weight lets a kernel produce the gradient in the same call as the loss.

loss_t = pg_t + beta * kl_t - entropy_coef * H_t
pg_t   = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)),  r = exp(clamp(logp - old_logp, +-ratio_clamp))
         with dual clip (A < 0): pg_t = min(pg_t, -A * dual_clip)
kl_t   = clamp(k(d), +-kl_output_clamp),  d = clamp(ref_logp - logp, +-kl_log_ratio_clamp)
         k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - 1 - d

Sequence-level ratios (``ratio_level = "sequence"``: GSPO-token, Zheng et al. 2025, "Group Sequence Policy
Optimization"): every token of sequence i takes the ratio
  s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)],  s_i = exp(clamp(mean_t (logp_t - old_logp_t), +-ratio_clamp))
over the sequence's response tokens: its value is the sequence's geometric-mean ratio s_i (so the clip decides per
sequence) and its gradient that of the token's own log-prob times s_i.  ``sequence_ratio_old_logp`` turns that into
the token-level loss above: with old'_t = sg[logp_t] - log s_i the token ratio exp(logp_t - old'_t) is s_i,t in
value and gradient, so every kernel computes GSPO-token from its usual inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossSpec:
    """The numbers that define the per-token loss (a subset of the training config)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: Optional[float] = None  # c > 1, applied to tokens with A < 0
    ratio_log_clamp: float = 20.0
    kl_coef: float = 0.0  # beta; 0 disables the KL term
    kl_estimator: str = "k3"
    kl_log_ratio_clamp: float = 20.0
    kl_output_clamp: float = 10.0
    entropy_coef: float = 0.0
    ratio_level: str = "token"  # token | sequence (GSPO-token: each token the sequence's geometric-mean ratio)

    def __post_init__(self) -> None:
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError("eps_low and eps_high must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (got {self.dual_clip})")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3",
                log_ratio_clamp: float = 20.0, output_clamp: float = 10.0) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3)."""
    d = torch.clamp(ref_logp - logp, -log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        k = -d
    elif estimator == "k2":
        k = 0.5 * d * d
    elif estimator == "k3":
        k = torch.exp(d) - 1.0 - d
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    return torch.clamp(k, -output_clamp, output_clamp)


def clipped_pg_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float,
                    eps_high: float, dual_clip: Optional[float] = None, ratio_log_clamp: float = 20.0):
    """Clipped surrogate with decoupled bounds (clip-higher). Returns (pg_t, clipped_low, clipped_high).

    The clipped branch is taken only where it is strictly larger, so the gradient is exactly
    ``-A * r`` on unclipped tokens and 0 on clipped ones (no tie-splitting of ``torch.maximum``).
    ``clipped_low`` / ``clipped_high`` flag tokens whose gradient was removed by the lower / upper bound.
    """
    log_ratio = torch.clamp(logp - old_logp, -ratio_log_clamp, ratio_log_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clipped = -adv * clipped_ratio
    take_clipped = clipped > unclipped
    pg = torch.where(take_clipped, clipped, unclipped)
    clipped_high = take_clipped & (ratio > 1.0 + eps_high)
    clipped_low = take_clipped & (ratio < 1.0 - eps_low)
    if dual_clip is not None:
        cap = -adv * dual_clip  # positive where adv < 0
        dual = (adv < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
        clipped_low = clipped_low | dual
    return pg, clipped_low, clipped_high


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor,
                       ratio_log_clamp: float = 20.0) -> torch.Tensor:
    """log s per token (detached): the mean of ``logp - old_logp`` over the masked tokens of the token's sequence
    (``segments``: a sequence id per token, from 0), clamped to +-``ratio_log_clamp``; 0 for a sequence without
    masked tokens."""
    seg = segments.long()
    n = int(seg.max()) + 1 if seg.numel() else 0
    m = mask.detach().double()
    d = (logp.detach().double() - old_logp.detach().double()) * m
    total = torch.zeros(n, dtype=torch.float64, device=d.device).index_add_(0, seg, d)
    count = torch.zeros(n, dtype=torch.float64, device=d.device).index_add_(0, seg, m)
    log_s = (total / count.clamp(min=1.0)).clamp(-ratio_log_clamp, ratio_log_clamp)
    return log_s[seg].to(logp.dtype)


def sequence_ratio_old_logp(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor,
                            ratio_log_clamp: float = 20.0) -> torch.Tensor:
    """The old log-probs that make the token-level loss GSPO-token's: ``sg[logp] - log s`` (see the module
    docstring).  ``logp`` are the current policy's log-probs of the same tokens, as the loss will compute them."""
    return logp.detach() - sequence_log_ratio(logp, old_logp, mask, segments, ratio_log_clamp)


def sequence_level_pg_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                           segments: torch.Tensor, eps_low: float, eps_high: float, dual_clip: Optional[float] = None,
                           ratio_log_clamp: float = 20.0):
    """GSPO-token's clipped surrogate written out (the reference for ``sequence_ratio_old_logp``): the ratio
    s_i,t = sg[s_i] * exp(logp - sg[logp]) clipped as ``clipped_pg_loss`` clips a token ratio.  Returns
    (pg_t, clipped_low, clipped_high)."""
    s_it = sequence_log_ratio(logp, old_logp, mask, segments, ratio_log_clamp) + logp - logp.detach()
    return clipped_pg_loss(s_it, torch.zeros_like(logp), adv, eps_low, eps_high, dual_clip, ratio_log_clamp)


def logprob_entropy_from_logits(logits: torch.Tensor, tokens: torch.Tensor):
    """fp32 log-prob of ``tokens`` and entropy of the softmax, per row of ``logits`` [T, V]."""
    z = logits.float()
    logz = torch.logsumexp(z, dim=-1)
    logp_all = z - logz[:, None]
    logp = logp_all.gather(-1, tokens.long()[:, None]).squeeze(-1)
    p = torch.exp(logp_all)
    # -sum p log p, written relative to logz: no cancellation between logz and E[z] at |z| ~ 1e4
    entropy = -(p * logp_all).sum(-1)
    return logp, entropy


def per_token_loss(logp: torch.Tensor, entropy: Optional[torch.Tensor], old_logp: torch.Tensor,
                   ref_logp: Optional[torch.Tensor], adv: torch.Tensor, spec: LossSpec):
    """loss_t and its parts. Returns dict with loss_t, pg, kl (or None), clipped_low, clipped_high."""
    pg, clo, chi = clipped_pg_loss(logp, old_logp, adv, spec.eps_low, spec.eps_high, spec.dual_clip,
                                   spec.ratio_log_clamp)
    loss_t = pg
    kl = None
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, spec.kl_estimator, spec.kl_log_ratio_clamp, spec.kl_output_clamp)
        if spec.kl_coef != 0.0:
            loss_t = loss_t + spec.kl_coef * kl
    if spec.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the entropy")
        loss_t = loss_t - spec.entropy_coef * entropy
    return {"loss_t": loss_t, "pg": pg, "kl": kl, "clipped_low": clo, "clipped_high": chi}


def policy_loss_from_logits(logits: torch.Tensor, tokens: torch.Tensor, old_logp: torch.Tensor,
                            ref_logp: Optional[torch.Tensor], adv: torch.Tensor, weight: torch.Tensor,
                            spec: LossSpec):
    """Reference for the fused kernels: scalar loss ``sum(weight * loss_t)`` plus per-token stats.

    Returns (loss, logp, entropy, kl) where logp / entropy / kl are fp32 [T] tensors (kl is None
    when ref_logp is None).  Gradients flow to ``logits`` only.
    """
    logp, entropy = logprob_entropy_from_logits(logits, tokens)
    parts = per_token_loss(logp, entropy, old_logp.float(), None if ref_logp is None else ref_logp.float(),
                           adv.float(), spec)
    loss = (parts["loss_t"] * weight.float()).sum()
    return loss, logp, entropy, parts["kl"]


AGGREGATIONS = ("token-mean", "sequence-mean", "token-sum-norm")


def aggregation_weights(mask: torch.Tensor, mode: str, n_valid_tokens: float, n_sequences: float,
                        norm_length: float = 0.0) -> torch.Tensor:
    """Per-token loss weights for a [B, L] mask.

    ``token-mean``: every valid token of the global batch counts equally (the ProRL default);
    ``sequence-mean``: each sequence's token mean, averaged over the global batch's sequences;
    ``token-sum-norm``: each sequence's token sum divided by the constant ``norm_length`` (the response budget),
    averaged over the global batch's sequences (Dr. GRPO, Liu et al. 2025): a token's weight depends on neither
    its response's length nor the batch's, so long responses are not down-weighted per token as under
    ``sequence-mean`` nor is the step's size set by the batch's token count as under ``token-mean``.
    ``n_valid_tokens`` / ``n_sequences`` are global-batch counts (all micro-batches and DP ranks).
    """
    m = mask.float()
    if mode == "token-mean":
        return m / max(float(n_valid_tokens), 1.0)
    if mode == "sequence-mean":
        lens = m.sum(-1, keepdim=True).clamp_min(1.0)
        return m / lens / max(float(n_sequences), 1.0)
    if mode == "token-sum-norm":
        if norm_length <= 0:
            raise ValueError(f"loss aggregation 'token-sum-norm' needs norm_length > 0, got {norm_length}")
        return m / float(norm_length) / max(float(n_sequences), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(AGGREGATIONS)}")
