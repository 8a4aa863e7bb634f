"""Fused LM head + policy loss: from hidden [T, H] and the (vocab-parallel) LM-head weight [V_local, H].

Never materialises [T, V]: tokens are processed in chunks of ``token_chunk`` rows.  Per chunk:
``logits_c = hidden_c @ W^T`` ([chunk, V_local], one reusable buffer) -> row statistics (Triton pass 1,
all-reduced over the TP group) -> per-token loss -> dlogits written over the chunk buffer (Triton
pass 2) -> ``d_hidden_c = dlogits_c @ W`` and ``d_W += dlogits_c^T @ hidden_c``.  Because the loss
normaliser is folded into ``weight`` the gradients are final after the forward call; backward only
scales them by ``grad_output``.

Extra memory: the chunk buffer (token_chunk x V_local x dtype), d_W (V_local x H, weight dtype) and
d_hidden (T x H).  Under TP, ``d_hidden`` is this rank's partial sum over its vocab shard; the
all-reduce over the TP group is the caller's (``megaprorl.parallel.all_reduce_grad_tp`` does it in
backward), exactly as for an ordinary ColumnParallelLinear output layer.
"""

from __future__ import annotations

import torch

from .policy_loss import _as_f, check_device, loss_and_grad, row_statistics, scale_in_place, token_loss


class _FusedLMHeadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, old_logp, ref_logp, adv, w, spec, tp_group, vocab_start, token_chunk,
                block_v):
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"need hidden [T, H] and weight [V_local, H], got {tuple(hidden.shape)} and "
                             f"{tuple(weight.shape)}")
        T, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        tokens = tokens.reshape(-1).to(torch.int64).contiguous()
        old_logp, adv, w = _as_f(old_logp, T), _as_f(adv, T), _as_f(w, T)
        ref_logp = None if ref_logp is None else _as_f(ref_logp, T)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden = torch.empty_like(hidden) if need_dh else None
        d_weight = torch.zeros_like(weight) if need_dw else None
        logp = torch.empty(T, dtype=torch.float32, device=dev)
        ent = torch.empty_like(logp)
        kl = torch.empty_like(logp) if ref_logp is not None else None
        wloss = torch.empty_like(logp)
        chunk = max(1, min(int(token_chunk), T))
        buf = torch.empty(chunk, V, dtype=hidden.dtype, device=dev) if T > 0 else None
        wt = weight.t()
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            h = hidden[s:e]
            logits = buf[: e - s]
            torch.mm(h, wt, out=logits)
            ref_c = None if ref_logp is None else ref_logp[s:e]
            if need_dh or need_dw:  # dlogits written over the chunk buffer
                ts, g = loss_and_grad(logits, tokens[s:e], old_logp[s:e], ref_c, adv[s:e], w[s:e], spec, tp_group,
                                      vocab_start, block_v, out=logits)
            else:
                ts = token_loss(row_statistics(logits, tokens[s:e], vocab_start, tp_group, block_v), old_logp[s:e],
                                ref_c, adv[s:e], w[s:e], spec)
            logp[s:e] = ts[0]
            ent[s:e] = ts[1]
            wloss[s:e] = ts[3]
            if kl is not None:
                kl[s:e] = ts[2]
            if need_dh:
                torch.mm(g, weight, out=d_hidden[s:e])
            if need_dw:
                d_weight.addmm_(g.t(), h)
        del buf
        ctx.grads = (d_hidden, d_weight)
        outs = [x for x in (logp, ent, kl) if x is not None]
        ctx.mark_non_differentiable(*outs)
        return wloss.sum(), logp, ent, kl

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.grads is None:
            raise RuntimeError("fused LM-head policy loss: backward called twice (retain_graph is not supported)")
        d_hidden, d_weight = ctx.grads
        ctx.grads = None
        # in place: the buffers are ours and used once
        for t in (d_hidden, d_weight):
            if t is not None:
                scale_in_place(t, grad_loss)
        return (d_hidden, d_weight) + (None,) * 10


def policy_loss_lm_head_triton(hidden, weight, tokens, old_logp, ref_logp, adv, w, spec, *, tp_group=None,
                               vocab_start_index=0, token_chunk=2048, block_v=None):
    """Fused LM-head policy loss. Returns (loss, logp, entropy, kl) like the logits version.

    ``weight`` is this rank's vocab shard [V_local, H] covering ids [vocab_start_index, +V_local).
    Gradients flow to ``hidden`` (this shard's partial under TP) and ``weight``.
    """
    check_device(hidden)
    loss, logp, ent, kl = _FusedLMHeadFn.apply(hidden, weight, tokens, old_logp, ref_logp, adv, w, spec, tp_group,
                                              int(vocab_start_index), int(token_chunk), block_v)
    return loss, logp.detach(), ent.detach(), None if kl is None else kl.detach()
