"""Decode attention over a KV cache whose rows hold sequences of their own extents (Triton).

One query token per row (a decode step) attends to the keys ``[start_r, end_r)`` of its row of the
cache, nothing else: the embedded engine's continuous batching keeps rows at different positions (a
row refilled late is short while others are long), and a masked SDPA over the cache reads every row
over the furthest row's span.  Here each row reads its own keys once per query group, for all the
group's query heads together (grouped-query attention: the K/V of a group are not read once per head).

    q      [b, heads, d]                  the step's queries (rotated), any strides with stride(-1) == 1
    k, v   [seq, b, groups, d]            Megatron's static inference cache layout (keys rotated)
    start  [b] int, end [b] int           row r attends to positions start[r] <= s < end[r] (end > start)

Split-K ("flash decoding"): grid (rows, groups, splits).  Each program runs the online softmax over one
split of its row's extent and stores (max, sum, unnormalised output) in fp32; a second kernel combines
the splits of each (row, head).  With one split, the first kernel writes the normalised output itself
(one launch).  Splits past a row's extent are empty and are weighted out in the combine.

CPU: runs under triton's interpreter (TRITON_INTERPRET=1 set before triton is first imported), which
the tests use against ``reference`` (SDPA with the equivalent boolean mask).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .policy_loss import HAVE_TRITON, check_device, interpreting

if HAVE_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None


def _partial(q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, o_ptr, ml_ptr, out_ptr,
             sq_b, sq_h, sk_s, sk_b, sk_h, sv_s, sv_b, sv_h, so_b, so_h, so_s, sml_b, sml_h, sml_s, sout_b, sout_h,
             scale, split_len,
             GROUP: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr, WIDE: tl.constexpr,
             DOT_F32: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    lo = tl.load(start_ptr + r).to(tl.int32) + sp * split_len
    hi = tl.minimum(lo + split_len, tl.load(end_ptr + r).to(tl.int32))
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hm = h < GROUP
    dm = d < D
    heads = g * GROUP + h
    q = tl.load(q_ptr + r * sq_b + heads[:, None] * sq_h + d[None, :], mask=hm[:, None] & dm[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_row = k_ptr + r * sk_b + g * sk_h
    v_row = v_ptr + r * sv_b + g * sv_h
    n0 = tl.arange(0, BLOCK_N)
    for s0 in range(lo, hi, BLOCK_N):  # every block holds at least one valid key
        n = s0 + n0
        nm = n < hi
        k = tl.load(k_row + (n[:, None] * sk_s + d[None, :]), mask=nm[:, None] & dm[None, :], other=0.0)
        if DOT_F32:  # the interpreter's bf16/fp16 dot is wrong (triton 3.9); the products are exact in fp32
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_H, BLOCK_N]
        qk = tl.where(nm[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(qk - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_row + (n[:, None] * sv_s + d[None, :]), mask=nm[:, None] & dm[None, :], other=0.0)
        pv = p.to(v.dtype)  # p rounded to the cache dtype, as the compiled bf16 dot takes it
        if DOT_F32:
            pv, v = pv.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION)
        m = m_new
    keep = hm[:, None] & dm[None, :]
    if DIRECT:  # one split: the output itself
        o = acc / l[:, None]
        tl.store(out_ptr + r * sout_b + heads[:, None] * sout_h + d[None, :], o.to(out_ptr.dtype.element_ty), mask=keep)
    else:
        tl.store(o_ptr + r * so_b + heads[:, None] * so_h + sp * so_s + d[None, :], acc, mask=keep)
        tl.store(ml_ptr + r * sml_b + heads * sml_h + sp * sml_s, m, mask=hm)
        tl.store(ml_ptr + r * sml_b + heads * sml_h + sp * sml_s + 1, l, mask=hm)


def _combine(o_ptr, ml_ptr, out_ptr, so_b, so_h, so_s, sml_b, sml_h, sml_s, sout_b, sout_h, splits,
             D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm = s < splits
    base = ml_ptr + r * sml_b + h * sml_h + s * sml_s
    m = tl.load(base, mask=sm, other=float("-inf"))
    l = tl.load(base + 1, mask=sm, other=0.0)
    w = tl.where(l > 0.0, tl.exp(m - tl.max(m, 0)), 0.0)  # empty splits (m = -inf, l = 0) weigh nothing
    o = tl.load(o_ptr + r * so_b + h * so_h + s[:, None] * so_s + d[None, :], mask=sm[:, None] & (d[None, :] < D),
                other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + r * sout_b + h * sout_h + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


_KERNEL_CACHE = {}


def _kernels():
    if not HAVE_TRITON:
        raise RuntimeError("rollout.decode_attention=triton needs triton (pip install triton)")
    key = interpreting()
    if key not in _KERNEL_CACHE:
        _KERNEL_CACHE[key] = {"partial": triton.jit(_partial), "combine": triton.jit(_combine)}
    return _KERNEL_CACHE[key]


FEATURE, INSTEAD = "rollout.decode_attention=triton", "'sdpa'"  # for check_device's message
MIN_SPLIT = 256  # positions: a split shorter than this costs more in its combine than it gains in parallelism
MAX_SPLITS = 32  # the combine's block: one compiled combine whatever the split count


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan(rows: int, groups: int, max_len: int, device: torch.device, block_n: int) -> int:
    """The number of splits: enough programs to fill the device (4 per SM), none shorter than MIN_SPLIT."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = -(-4 * sms // max(rows * groups, 1))
    return max(1, min(want, -(-max_len // max(MIN_SPLIT, block_n)), MAX_SPLITS))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                     scale: Optional[float] = None, max_len: Optional[int] = None, splits: Optional[int] = None,
                     block_n: Optional[int] = None) -> torch.Tensor:
    """Attention of each row's query heads ``q`` [b, heads, d] to its keys and values ``k``/``v``
    [seq, b, groups, d] at positions ``start[r] <= s < end[r]``.  Returns [b, heads, d] in q's dtype.
    ``max_len``: the longest extent (end - start) when the caller knows it (saves a device sync);
    ``splits``/``block_n`` override the launch plan (tests)."""
    check_device(q, FEATURE, INSTEAD)
    b, heads, D = q.shape
    S, bk, groups, Dk = k.shape
    if (bk, Dk) != (b, D) or v.shape != k.shape or heads % groups:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "(q [b, heads, d], k/v [seq, b, groups, d], heads a multiple of groups)")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode_attention: the last dimension of q, k and v must be contiguous")
    group = heads // groups
    if max_len is None:
        max_len = int((end - start).max())
    block_n = int(block_n or (32 if D <= 128 else 16))
    block_h = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(D))
    n_split = int(splits or plan(b, groups, max_len, q.device, block_n))
    if not 1 <= n_split <= MAX_SPLITS:
        raise ValueError(f"decode_attention: splits must be in [1, {MAX_SPLITS}], got {n_split}")
    split_len = -(-max_len // n_split)
    split_len = -(-split_len // block_n) * block_n  # whole blocks per split
    n_split = -(-max_len // split_len)
    scale = float(scale if scale is not None else 1.0 / math.sqrt(D))
    precision = "ieee" if q.dtype == torch.float32 or interpreting() else "tf32"
    out = torch.empty(b, heads, D, dtype=q.dtype, device=q.device)
    direct = n_split == 1
    if direct:
        o_part = ml = out  # unused
        so = sml = (0, 0, 0)
    else:
        o_part = torch.empty(b, heads, n_split, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(b, heads, n_split, 2, dtype=torch.float32, device=q.device)
        so, sml = o_part.stride()[:3], ml.stride()[:3]
    kern = _kernels()
    warps = {} if interpreting() else {"num_warps": 4, "num_stages": 2}
    kern["partial"][(b, groups, n_split)](
        q, k, v, start, end, o_part, ml, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *so, *sml, out.stride(0), out.stride(1), scale, split_len,
        GROUP=group, D=D, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, DIRECT=direct,
        WIDE=S * max(k.stride(0), v.stride(0)) >= 2**31, DOT_F32=interpreting() and q.dtype != torch.float32,
        **warps)
    if not direct:
        kern["combine"][(b, heads)](o_part, ml, out, *so, *sml, out.stride(0), out.stride(1), n_split,
                                    D=D, BLOCK_S=MAX_SPLITS, BLOCK_D=block_d,
                                    **({} if interpreting() else {"num_warps": 4}))
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
              scale: Optional[float] = None) -> torch.Tensor:
    """The same attention through SDPA with a boolean mask over the whole cache (the engine's SDPA path),
    computed in fp32.  [b, heads, d]."""
    S = k.shape[0]
    pos = torch.arange(S, device=q.device)[None]
    allowed = (pos >= start[:, None]) & (pos < end[:, None])  # [b, S]
    qq = q.float()[:, :, None]  # [b, heads, 1, d]
    kk, vv = (x.float().permute(1, 2, 0, 3) for x in (k, v))  # [b, groups, S, d]
    o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed[:, None, None], scale=scale,
                                                         enable_gqa=kk.shape[1] != qq.shape[1])
    return o[:, :, 0]
