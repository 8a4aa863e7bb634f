"""Fused per-token policy loss over logits [T, V] (Triton), vocab-parallel under tensor parallelism.

The whole loss depends on the logits of row t only through ``logp_t`` and the entropy ``H_t``, so

    dL/dz_j = g_lp * (onehot_j - p_j) - g_H * p_j * (z_j - E_p[z]),
    g_lp = weight * dloss_t/dlogp_t,   g_H = -weight * entropy_coef

and the gradient can be produced from per-row statistics plus one more pass over the vocabulary.
Three kernels:

1. ``_row_stats``   one program per row, online over BLOCK_V chunks of the (local) vocabulary:
                    running max m, s = sum exp(z - m), a = sum exp(z - m) * (z - m) (centred, so the
                    entropy ``log s - a / s`` does not cancel catastrophically for large logits), and
                    the target logit when the token lies in this rank's vocab shard.
   (tensor parallel: m is all-reduced with MAX, s / a / target rescaled and all-reduced with SUM)
2. ``_token_loss``  elementwise over tokens: logp, entropy, kl, weight * loss_t, g_lp, g_H.
3. ``_grad``        one program per row, one more pass over the vocabulary writing dlogits (in the
                    logits dtype; may be the logits buffer itself).  Rows whose g_lp and g_H are 0
                    (masked tokens) are written as zeros without reading the logits.

CPU: the kernels run under triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton was
first imported in the process (triton 3.x decides interpreter vs compiler at ``triton.jit`` time, and
its own standard library is jitted at import).  Our kernels are jitted lazily, per mode, at first use.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megaprorl.kernels import GRAD_MODES

try:  # triton is optional: the package works without it (torch backend)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAVE_TRITON = False

_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


# ----------------------------------------------------------------------------------------------
# kernel bodies (jitted lazily by _kernels())
# ----------------------------------------------------------------------------------------------

def _row_stats(logits_ptr, stride_row, tokens_ptr, stats_ptr, T, V, vocab_start, BLOCK_V: tl.constexpr,
               PREFETCH: tl.constexpr, ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols0 = tl.arange(0, BLOCK_V)
    # scalar running max; per-lane sums (one cross-lane reduction per chunk, two at the end)
    m = -1e30
    s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    a_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    if PREFETCH:  # the next chunk's load is issued before this chunk's reduction
        z_next = tl.load(base + cols0, mask=cols0 < V, other=float("-inf"))
    for off in range(0, V, BLOCK_V):
        cols = off + cols0
        mask = cols < V
        if PREFETCH:
            z = z_next.to(tl.float32)
            ncols = cols + BLOCK_V
            z_next = tl.load(base + ncols, mask=ncols < V, other=float("-inf"))
        else:
            z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        if ENTROPY:  # else the gradient pass accumulates the moment (entropy deferred)
            zc = tl.where(mask, z - m_new, 0.0)
            a_vec = alpha * (a_vec + (m - m_new) * s_vec) + tl.where(e > 0.0, e * zc, 0.0)
        s_vec = alpha * s_vec + e
        m = m_new
    s = tl.sum(s_vec, 0)
    a = tl.sum(a_vec, 0)
    tok = tl.load(tokens_ptr + row).to(tl.int64)
    local = tok - vocab_start
    in_shard = (local >= 0) & (local < V)
    local = tl.where(in_shard, local, 0)
    # masked: a shard may hold no columns at all (V == 0), where even column 0 is out of bounds
    zt = tl.load(base + local, mask=in_shard, other=0.0).to(tl.float32)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + T + row, s)
    tl.store(stats_ptr + 2 * T + row, a)
    tl.store(stats_ptr + 3 * T + row, zt)


def _token_loss(stats_ptr, out_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, T,
                eps_low, eps_high, dual_c, ratio_clamp, kl_coef, kl_lclamp, kl_oclamp, ent_coef,
                HAS_REF: tl.constexpr, KL_EST: tl.constexpr, HAS_DUAL: tl.constexpr,
                USE_KL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < T
    m = tl.load(stats_ptr + offs, mask=mask, other=0.0)
    s = tl.load(stats_ptr + T + offs, mask=mask, other=1.0)
    a = tl.load(stats_ptr + 2 * T + offs, mask=mask, other=0.0)
    zt = tl.load(stats_ptr + 3 * T + offs, mask=mask, other=0.0)
    old = tl.load(old_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    log_s = tl.log(s)
    abar = a / s
    logp = (zt - m) - log_s  # centred: no rounding of m + log_s at large |logits|
    ent = log_s - abar

    # clipped surrogate (clip-higher), gradient conventions of megaprorl.algo.loss
    lr_raw = logp - old
    lr = tl.minimum(tl.maximum(lr_raw, -ratio_clamp), ratio_clamp)
    d_lr = tl.where((lr_raw >= -ratio_clamp) & (lr_raw <= ratio_clamp), 1.0, 0.0)
    ratio = tl.exp(lr)
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    unclipped = -adv * ratio
    cratio = tl.minimum(tl.maximum(ratio, lo), hi)
    clipped = -adv * cratio
    take = clipped > unclipped
    pg = tl.where(take, clipped, unclipped)
    d_cr = tl.where((ratio >= lo) & (ratio <= hi), 1.0, 0.0)
    d_pg = tl.where(take, -adv * d_cr, -adv) * ratio * d_lr
    if HAS_DUAL:
        cap = -adv * dual_c
        dual = (adv < 0.0) & (pg > cap)
        pg = tl.where(dual, cap, pg)
        d_pg = tl.where(dual, 0.0, d_pg)
    loss_t = pg
    d_loss = d_pg
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d_raw = ref - logp
        d = tl.minimum(tl.maximum(d_raw, -kl_lclamp), kl_lclamp)
        d_d = tl.where((d_raw >= -kl_lclamp) & (d_raw <= kl_lclamp), -1.0, 0.0)  # dd/dlogp
        if KL_EST == 1:
            k = -d
            dk = -1.0 + 0.0 * d
        elif KL_EST == 2:
            k = 0.5 * d * d
            dk = d
        else:
            ed = tl.exp(d)
            k = ed - 1.0 - d
            dk = ed - 1.0
        kl = tl.minimum(tl.maximum(k, -kl_oclamp), kl_oclamp)
        d_kl = tl.where((k >= -kl_oclamp) & (k <= kl_oclamp), dk, 0.0) * d_d
        tl.store(out_ptr + 2 * T + offs, kl, mask=mask)
        if USE_KL:
            loss_t = loss_t + kl_coef * kl
            d_loss = d_loss + kl_coef * d_kl
    loss_t = loss_t - ent_coef * ent
    tl.store(out_ptr + offs, logp, mask=mask)
    tl.store(out_ptr + T + offs, ent, mask=mask)
    tl.store(out_ptr + 3 * T + offs, w * loss_t, mask=mask)
    tl.store(out_ptr + 4 * T + offs, w * d_loss, mask=mask)
    tl.store(out_ptr + 5 * T + offs, -w * ent_coef, mask=mask)
    tl.store(out_ptr + 6 * T + offs, log_s, mask=mask)
    tl.store(out_ptr + 7 * T + offs, m, mask=mask)
    tl.store(out_ptr + 8 * T + offs, abar, mask=mask)


def _grad(logits_ptr, stride_row, grad_ptr, stride_grow, tokens_ptr, tstats_ptr, scale_ptr, ent_ptr, T, V,
          vocab_start, skip_zero_rows, BLOCK_V: tl.constexpr, ACC_ENT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    c1 = tl.load(tstats_ptr + 4 * T + row) * scale
    c2 = tl.load(tstats_ptr + 5 * T + row) * scale
    log_s = tl.load(tstats_ptr + 6 * T + row)
    m = tl.load(tstats_ptr + 7 * T + row)
    abar = tl.load(tstats_ptr + 8 * T + row)
    tok = tl.load(tokens_ptr + row).to(tl.int64)
    local = tok - vocab_start
    zbase = logits_ptr + row * stride_row
    gbase = grad_ptr + row * stride_grow
    cols0 = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)  # ACC_ENT: sum p * (z - max) (entropy deferred to this pass)
    # rows without gradient (masked tokens) skip reading the logits, unless the entropy needs them
    if (c1 == 0.0) & (c2 == 0.0) & (skip_zero_rows != 0):
        zero = tl.zeros([BLOCK_V], dtype=tl.float32).to(grad_ptr.dtype.element_ty)
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            tl.store(gbase + cols, zero, mask=cols < V)
    else:
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            z = tl.load(zbase + cols, mask=mask, other=0.0).to(tl.float32)
            zc = tl.where(mask, z - m, 0.0)
            p = tl.exp(zc - log_s)
            if ACC_ENT:
                acc += tl.where(p > 0.0, p * zc, 0.0)
            t = c1 + c2 * (zc - abar)
            g = tl.where(p > 0.0, -p * t, 0.0)
            g = tl.where(cols == local, g + c1, g)
            tl.store(gbase + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    if ACC_ENT:
        tl.store(ent_ptr + row, tl.sum(acc, 0))


_KERNEL_CACHE: dict = {}


def _lang_interpreted() -> bool:
    # triton.language's own @jit helpers (tl.sum, tl.max, ...) are built when triton is first imported
    return type(getattr(tl, "sum", None)).__name__ == "InterpretedFunction"


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter: TRITON_INTERPRET=1 now *and* when triton
    was first imported in this process (its standard library is jitted at import)."""
    if not HAVE_TRITON:
        return False
    try:
        from triton import knobs

        env = bool(knobs.runtime.interpret)
    except Exception:  # older triton: env var only
        env = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return env and _lang_interpreted()


def _kernels():
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed (pip install triton); use backend='torch'")
    key = interpreting()
    if key not in _KERNEL_CACHE:
        _KERNEL_CACHE[key] = {
            "row_stats": triton.jit(_row_stats),
            "token_loss": triton.jit(_token_loss),
            "grad": triton.jit(_grad),
        }
    return _KERNEL_CACHE[key]


class TritonUnavailable(RuntimeError):
    """A Triton kernel cannot run here: no triton, or a tensor on neither CUDA nor the interpreter."""


def check_device(t: torch.Tensor, feature: str = "backend 'triton'", instead: str = "backend='torch'") -> None:
    """Raise ``TritonUnavailable`` naming ``feature`` (what was asked for) and ``instead`` (what runs here)
    when the Triton kernels cannot run on ``t``'s device."""
    if not HAVE_TRITON:
        raise TritonUnavailable(f"{feature} needs triton (pip install triton); use {instead}")
    if t.device.type != "cuda" and not interpreting():
        late = os.environ.get("TRITON_INTERPRET") == "1" and not _lang_interpreted()
        raise TritonUnavailable(f"{feature} runs on CUDA tensors, or on {t.device.type} tensors only under the Triton "
                                "interpreter: set TRITON_INTERPRET=1 in the environment before triton is first "
                                "imported in the process"
                                + (" (it was set after triton had been imported)" if late else "")
                                + f", or use {instead}")


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# (BLOCK_V, num_warps) per kernel on CUDA, from scripts/tune_triton.py on an H100 (docs/benchmarks.md).
# Issuing the next chunk's load before the current chunk's reduction (PREFETCH) took the statistics
# pass from 1.97 ms to 1.86 ms at T=16K, V=152K bf16.  Tried there and slower: a running max per lane in the statistics pass (a second exp per element;
# 2.06 ms against 1.97 ms at T=16K), num_stages 1-4 (no effect), and one persistent kernel doing the
# statistics and gradient passes of a row back to back to re-read it from L2 (6.7 ms against 5.4 ms:
# about one row per SM in flight is too little parallelism to keep HBM busy).
CUDA_LAUNCH = {"stats": (2048, 2), "grad": (2048, 16)}
STATS_PREFETCH = {"on": True}  # next chunk loaded before this chunk's reduction; MEGAPRORL_TRITON_PREFETCH=0/1
# Entropy deferred to the gradient pass where the gradient is made in the forward call (grad_mode forward /
# inplace, the fused LM head) and does not need the entropy (entropy_coef == 0): the statistics pass
# then keeps only max and sum of exp, as a log-sum-exp pass does.  Off until measured on a GPU
# (bench kernels row triton-inplace-defer); MEGAPRORL_TRITON_DEFER_ENTROPY=0/1 overrides.
DEFER_ENTROPY = {"on": False}


def _launch_cfg(V: int, device: torch.device, block_v: Optional[int], kind: str = "stats"):
    """Block size and warps of a vocabulary-pass kernel; MEGAPRORL_TRITON_BLOCK_V / _NUM_WARPS override."""
    cuda_bv, cuda_warps = CUDA_LAUNCH[kind]
    if block_v is None:
        env = os.environ.get("MEGAPRORL_TRITON_BLOCK_V")
        block_v = int(env) if env else (1024 if device.type == "cpu" else cuda_bv)
    block_v = min(_next_pow2(block_v), max(16, _next_pow2(V)))
    if device.type == "cpu":
        return block_v, {}
    num_warps = int(os.environ.get("MEGAPRORL_TRITON_NUM_WARPS", 0)) or cuda_warps
    return block_v, {"num_warps": num_warps}


def _tp_size(tp_group) -> int:
    if tp_group is None:
        return 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(tp_group)


def combine_tp_stats(stats: torch.Tensor, tp_group) -> torch.Tensor:
    """Combine per-shard row statistics [4, T] = (max, sumexp, centred sum exp*z, target logit).

    All-reduce MAX of the max, then SUM of the rescaled sumexp / centred moment / target logit
    (exactly one rank holds each token's target).  Returns the global [4, T] statistics.
    """
    if _tp_size(tp_group) == 1:
        return stats
    import torch.distributed as dist

    m_loc, s_loc, a_loc, zt = stats.unbind(0)
    m = m_loc.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    alpha = torch.exp(m_loc - m)
    red = torch.stack([s_loc * alpha, alpha * (a_loc + (m_loc - m) * s_loc), zt])
    dist.all_reduce(red, op=dist.ReduceOp.SUM, group=tp_group)
    return torch.cat([m[None], red], 0)


def _as_f(x: torch.Tensor, T: int) -> torch.Tensor:
    x = x.reshape(-1)
    if x.numel() != T:
        raise ValueError(f"per-token input has {x.numel()} elements, expected {T}")
    return x.contiguous()


def row_statistics(logits, tokens, vocab_start_index=0, tp_group=None, block_v=None, entropy=True):
    """Pass 1 (+ TP combine): global per-row statistics [4, T] fp32 (``entropy=False``: the centred
    moment is left 0 for the gradient pass to accumulate)."""
    T, V = logits.shape
    stats = torch.empty(4, T, dtype=torch.float32, device=logits.device)
    if T == 0:
        return stats
    k = _kernels()
    bv, kw = _launch_cfg(V, logits.device, block_v)
    env = os.environ.get("MEGAPRORL_TRITON_PREFETCH")
    prefetch = STATS_PREFETCH["on"] if env is None else env == "1"
    k["row_stats"][(T,)](logits, logits.stride(0), tokens, stats, T, V, int(vocab_start_index), BLOCK_V=bv,
                         PREFETCH=prefetch, ENTROPY=bool(entropy), **kw)
    return combine_tp_stats(stats, tp_group)


def token_loss(stats, old_logp, ref_logp, adv, weight, spec):
    """Kernel 2: per-token outputs [9, T] = (logp, entropy, kl, w*loss_t, g_lp, g_H, log_s, max, abar)."""
    T = stats.shape[1]
    out = torch.zeros(9, T, dtype=torch.float32, device=stats.device)
    if T == 0:
        return out
    k = _kernels()
    has_ref = ref_logp is not None
    block = 1024 if stats.device.type != "cpu" else 256
    old = _as_f(old_logp, T)
    ref = _as_f(ref_logp, T) if has_ref else old
    k["token_loss"][(triton.cdiv(T, block),)](
        stats, out, old, ref, _as_f(adv, T), _as_f(weight, T), T,
        float(spec.eps_low), float(spec.eps_high), float(spec.dual_clip or 0.0), float(spec.ratio_log_clamp),
        float(spec.kl_coef), float(spec.kl_log_ratio_clamp), float(spec.kl_output_clamp), float(spec.entropy_coef),
        HAS_REF=has_ref, KL_EST=_KL_CODES[spec.kl_estimator], HAS_DUAL=spec.dual_clip is not None,
        USE_KL=float(spec.kl_coef) != 0.0, BLOCK=block)
    return out


def logits_grad(logits, tokens, tstats, scale, out=None, vocab_start_index=0, block_v=None, moment_out=None):
    """Kernel 3: dlogits = scale * dL/dlogits for this shard, written to ``out`` (may be ``logits``).
    ``moment_out`` [T] fp32: also accumulate this shard's sum of p * (z - max) into it (deferred entropy)."""
    T, V = logits.shape
    if out is None:
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if T == 0:
        return out
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=logits.device)
    scale = scale.reshape(1).to(device=logits.device, dtype=torch.float32).contiguous()
    k = _kernels()
    bv, kw = _launch_cfg(V, logits.device, block_v, "grad")
    acc = moment_out is not None
    k["grad"][(T,)](logits, logits.stride(0), out, out.stride(0), tokens, tstats, scale,
                    moment_out if acc else scale, T, V, int(vocab_start_index), 0 if acc else 1, BLOCK_V=bv,
                    ACC_ENT=acc, **kw)
    return out


def entropy_deferred(spec) -> bool:
    """Whether loss_and_grad defers the entropy to the gradient pass for this loss (see DEFER_ENTROPY)."""
    env = os.environ.get("MEGAPRORL_TRITON_DEFER_ENTROPY")
    on = DEFER_ENTROPY["on"] if env is None else env == "1"
    return on and float(spec.entropy_coef) == 0.0


def loss_and_grad(logits, tokens, old_logp, ref_logp, adv, weight, spec, tp_group=None, vocab_start_index=0,
                  block_v=None, out=None):
    """All passes in one call, for the modes that make the gradient in the forward: per-token outputs
    [9, T] (as token_loss) and dlogits (unscaled) written to ``out`` (a new buffer when None; may be
    ``logits``).  With the entropy deferred the gradient pass accumulates the centred moment, which is
    summed over the TP group like the other statistics, and the entropy is finished from it."""
    defer = entropy_deferred(spec)
    stats = row_statistics(logits, tokens, vocab_start_index, tp_group, block_v, entropy=not defer)
    tstats = token_loss(stats, old_logp, ref_logp, adv, weight, spec)
    one = torch.ones(1, dtype=torch.float32, device=logits.device)
    moment = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device) if defer else None
    g = logits_grad(logits, tokens, tstats, one, out=out, vocab_start_index=vocab_start_index, block_v=block_v,
                    moment_out=moment)
    if defer:
        if _tp_size(tp_group) > 1:
            import torch.distributed as dist

            dist.all_reduce(moment, op=dist.ReduceOp.SUM, group=tp_group)
        tstats[8] = moment  # abar = sum p * (z - max)
        tstats[1] = tstats[6] - moment  # entropy = log(sum exp(z - max)) - abar, as token_loss
    return tstats, g


def _prep(logits, tokens):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, V], got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = tokens.reshape(-1)
    if tokens.numel() != logits.shape[0]:
        raise ValueError(f"tokens has {tokens.numel()} elements, logits has {logits.shape[0]} rows")
    return logits, tokens.to(torch.int64).contiguous()


class _PolicyLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, old_logp, ref_logp, adv, weight, spec, tp_group, vocab_start, grad_mode,
                block_v):
        logits, tokens = _prep(logits, tokens)
        ctx.grad_mode = grad_mode
        ctx.vocab_start = vocab_start
        ctx.block_v = block_v
        if ctx.needs_input_grad[0] and grad_mode != "recompute":
            tstats, ctx.grad = loss_and_grad(logits, tokens, old_logp, ref_logp, adv, weight, spec, tp_group,
                                             vocab_start, block_v, out=logits if grad_mode == "inplace" else None)
        else:
            stats = row_statistics(logits, tokens, vocab_start, tp_group, block_v)
            tstats = token_loss(stats, old_logp, ref_logp, adv, weight, spec)
            if ctx.needs_input_grad[0]:
                ctx.save_for_backward(logits, tokens, tstats)
        loss = tstats[3].sum()
        logp, ent = tstats[0].clone(), tstats[1].clone()
        kl = tstats[2].clone() if ref_logp is not None else None
        ctx.mark_non_differentiable(*(x for x in (logp, ent, kl) if x is not None))
        return loss, logp, ent, kl

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if not ctx.needs_input_grad[0]:
            return (None,) * 11
        if ctx.grad_mode == "recompute":
            logits, tokens, tstats = ctx.saved_tensors
            g = logits_grad(logits, tokens, tstats, grad_loss.detach(), vocab_start_index=ctx.vocab_start,
                            block_v=ctx.block_v)
        else:
            g = ctx.grad
            if g is None:
                raise RuntimeError("policy loss with grad_mode='forward'/'inplace': backward called twice "
                                   "(retain_graph is not supported)")
            ctx.grad = None
            scale_in_place(g, grad_loss)
        return (g,) + (None,) * 10


def scale_in_place(g: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """g *= grad_loss, skipping the full pass over g when grad_loss == 1 (the usual case)."""
    grad_loss = grad_loss.detach()
    if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
        g.mul_(grad_loss.to(g.dtype))


def policy_loss_triton(logits, tokens, old_logp, ref_logp, adv, weight, spec, *, tp_group=None,
                       vocab_start_index=0, grad_mode="recompute", block_v=None):
    """Fused policy loss on logits [T, V_local]. Returns (loss, logp, entropy, kl) like the reference.

    grad_mode: ``recompute`` (backward does the second vocab pass; saves logits + [T] stats),
    ``forward`` (gradient computed in this call into a new [T, V] buffer; backward only scales), or
    ``inplace`` (gradient written over ``logits`` itself in this call, as Liger does; ``logits`` is
    destroyed, so nothing else may need it).  logp / entropy / kl are detached fp32 [T].
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    check_device(logits)
    if grad_mode == "inplace" and logits.stride(-1) != 1:
        raise ValueError("grad_mode='inplace' needs logits with a contiguous last dimension")
    loss, logp, ent, kl = _PolicyLossFn.apply(logits, tokens, old_logp, ref_logp, adv, weight, spec, tp_group,
                                             int(vocab_start_index), grad_mode, block_v)
    return loss, logp.detach(), ent.detach(), None if kl is None else kl.detach()


__all__ = ["policy_loss_triton", "row_statistics", "token_loss", "logits_grad", "combine_tp_stats",
           "loss_and_grad", "entropy_deferred", "DEFER_ENTROPY", "interpreting", "check_device", "TritonUnavailable",
           "HAVE_TRITON", "GRAD_MODES"]
