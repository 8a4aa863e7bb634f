"""Torch backends of the policy loss: the algo reference and its vocab-parallel form.

``torch_policy_loss`` is ``megaprorl.algo.loss.policy_loss_from_logits`` when the logits hold the whole
vocabulary.  Under tensor parallelism (logits [T, V/TP] holding ids [vocab_start, vocab_start + V_local))
the log-prob and entropy are computed by ``VocabParallelLogpEntropy`` (partial max all-reduced with MAX,
sum-exp / centred sum exp*z / target logit with SUM, as Megatron's vocab_parallel_cross_entropy) and the
rest of the loss by the reference's own ``per_token_loss``, so autograd gives the reference's gradient
for this rank's shard.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from megaprorl.algo.loss import per_token_loss, policy_loss_from_logits


class PolicyLossOutput(NamedTuple):
    """``loss`` = sum(weight * loss_t) (differentiable); ``logp`` / ``entropy`` / ``kl`` are detached fp32 [T]
    (``kl`` is None when no reference log-probs were given)."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    kl: Optional[torch.Tensor]


def tp_world_size(tp_group) -> int:
    if tp_group is None:
        return 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(tp_group)


class VocabParallelLogpEntropy(torch.autograd.Function):
    """(logp, entropy) fp32 [T] of logits sharded over the vocabulary; gradient for the local shard."""

    @staticmethod
    def forward(ctx, logits, tokens, vocab_start, tp_group):
        import torch.distributed as dist

        z = logits.float()
        V = z.shape[-1]  # may be 0: a shard holding only vocabulary padding, left out by the caller
        m = z.max(-1).values if V else z.new_full(z.shape[:-1], float("-inf"))
        if tp_world_size(tp_group) > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        zc = z - m[:, None]
        e = torch.exp(zc)
        local = tokens.long() - vocab_start
        in_shard = (local >= 0) & (local < V)
        zt = (zc.gather(-1, torch.where(in_shard, local, 0)[:, None]).squeeze(-1) * in_shard if V
              else z.new_zeros(z.shape[:-1]))
        red = torch.stack([e.sum(-1), (e * zc).sum(-1), zt])
        if tp_world_size(tp_group) > 1:
            dist.all_reduce(red, op=dist.ReduceOp.SUM, group=tp_group)
        s, a, ztc = red.unbind(0)
        log_s = torch.log(s)
        abar = a / s
        logp = ztc - log_s
        entropy = log_s - abar
        ctx.save_for_backward(logits, local, in_shard, m, log_s, abar)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        logits, local, in_shard, m, log_s, abar = ctx.saved_tensors
        z = logits.float()
        zc = z - m[:, None]
        p = torch.exp(zc - log_s[:, None])
        g_lp = torch.zeros_like(m) if g_lp is None else g_lp.float()
        g_h = torch.zeros_like(m) if g_h is None else g_h.float()
        dz = -p * (g_lp[:, None] + g_h[:, None] * (zc - abar[:, None]))
        rows = torch.nonzero(in_shard).squeeze(-1)
        dz[rows, local[rows]] += g_lp[rows]
        return dz.to(logits.dtype), None, None, None


def vocab_parallel_logp_entropy(logits, tokens, vocab_start_index=0, tp_group=None):
    """fp32 (logp, entropy) per row of vocab-sharded logits; equals the TP=1 reference."""
    return VocabParallelLogpEntropy.apply(logits, tokens.reshape(-1), int(vocab_start_index), tp_group)


def torch_policy_loss(logits, tokens, old_logp, ref_logp, adv, weight, spec, *, tp_group=None,
                      vocab_start_index=0, reference_fn=None) -> PolicyLossOutput:
    """The reference (``policy_loss_from_logits``) at TP=1, its vocab-parallel form otherwise."""
    tokens = tokens.reshape(-1)
    if tp_world_size(tp_group) == 1 and int(vocab_start_index) == 0:
        fn = reference_fn or policy_loss_from_logits
        loss, logp, ent, kl = fn(logits, tokens, old_logp.reshape(-1), None if ref_logp is None else
                                 ref_logp.reshape(-1), adv.reshape(-1), weight.reshape(-1), spec)
    else:
        logp, ent = vocab_parallel_logp_entropy(logits, tokens, vocab_start_index, tp_group)
        parts = per_token_loss(logp, ent, old_logp.reshape(-1).float(),
                               None if ref_logp is None else ref_logp.reshape(-1).float(),
                               adv.reshape(-1).float(), spec)
        loss = (parts["loss_t"] * weight.reshape(-1).float()).sum()
        kl = parts["kl"]
    return PolicyLossOutput(loss, logp.detach(), ent.detach(), None if kl is None else kl.detach())
