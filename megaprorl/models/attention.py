"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix, which at
8K-16K tokens costs tens of GB; TransformerEngine's fused attention is the production path but is
an optional, GPU-only extra.  This drop-in replacement for the local spec's ``core_attention`` lets
PyTorch pick FlashAttention / memory-efficient kernels on GPU (and a fused kernel on CPU): with no
explicit mask it runs causal attention without building any mask; with Megatron's boolean mask
(True = masked, used by the rollout engine's left-padded KV-cached decode) it passes the inverse.
Grouped-query attention uses SDPA's ``enable_gqa`` (no K/V copies).

Packed sequences (``PackedSeqParams`` with ``qkv_format='thd'``: q/k/v are [t, heads, d], sequences
laid end to end with boundaries ``cu_seqlens``) run causal attention inside each sequence and none
across: one SDPA call per sequence (exact, O(sum L_i^2) work, cuDNN/flash kernels on GPU), or for
packs of many short sequences ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen, one
launch) for bf16/fp16 CUDA tensors when this torch has it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


PACKED_CALLS = {"varlen": 0, "per_sequence": 0}  # which packed path ran (tests and benchmarks read it)
# packs of more sequences than this use FlashAttention varlen (one launch); fewer, one cuDNN SDPA call
# each (on an H100 cuDNN's attention ran ~2.5x faster per token pair than torch 2.11's varlen)
VARLEN_MIN_SEQS = int(os.environ.get("MEGAPRORL_VARLEN_MIN_SEQS", 8))


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("attention bias is not supported by SDPAttention")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        return sdpa_sbhd(query, key, value, attention_mask, self.softmax_scale, causal)

    def _packed(self, q, k, v, p):
        if p.qkv_format != "thd":
            raise NotImplementedError(f"SDPAttention supports packed sequences in 'thd' format, got {p.qkv_format!r}")
        cu_q = p.cu_seqlens_q
        cu_k = p.cu_seqlens_kv if p.cu_seqlens_kv is not None else cu_q
        # a CPU copy of the boundaries in the *_padded fields (see cpu_boundaries) saves a device sync per layer
        cpu = p.cu_seqlens_q_padded if _on_cpu(p.cu_seqlens_q_padded) and q.is_cuda else None
        if cpu is None and p.cu_seqlens_q_padded is not None and not torch.equal(p.cu_seqlens_q_padded, cu_q):
            raise NotImplementedError("SDPAttention: padded cu_seqlens (context parallel) are not supported")
        if cu_k is not cu_q and not torch.equal(cu_q, cu_k):
            raise ValueError("packed causal self-attention needs cu_seqlens_q == cu_seqlens_kv")
        bounds = (cpu if cpu is not None else cu_q).tolist()
        gqa = k.shape[1] != q.shape[1]
        varlen = _varlen_attn() if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) else None
        if varlen is not None and len(bounds) - 1 > VARLEN_MIN_SEQS:
            PACKED_CALLS["varlen"] += 1
            max_len = int(p.max_seqlen_q) if p.max_seqlen_q else max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
            kw = {"window_size": (-1, 0)} if _accepts(varlen, "window_size") else {"is_causal": True}
            if gqa:
                if _accepts(varlen, "enable_gqa"):
                    kw["enable_gqa"] = True
                else:  # older varlen_attn (torch 2.11): one K/V head per query head
                    rep = q.shape[1] // k.shape[1]
                    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            cu = cu_q.to(torch.int32)
            out = varlen(q, k, v, cu, cu, max_len, max_len, scale=self.softmax_scale, **kw)
        else:  # one SDPA call per sequence: cuDNN / flash kernels on GPU, exact on CPU
            PACKED_CALLS["per_sequence"] += 1
            out = packed_per_sequence(q, k, v, bounds, self.softmax_scale)
        return out.reshape(q.shape[0], -1)


def sdpa_sbhd(query, key, value, attention_mask=None, scale=None, causal: bool = False):
    """SDPA on Megatron's layout: q/k/v [s, b, heads, d] (K/V may have fewer heads: GQA), ``attention_mask``
    Megatron's boolean mask (True = masked; broadcastable to [b, heads, s_q, s_k]) or None with ``causal``.
    Returns [s, b, heads * d]."""
    # [s, b, h, d] -> [b, h, s, d]
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
    kwargs = {}
    if attention_mask is not None:
        kwargs["attn_mask"] = _allowed(attention_mask)
    elif causal and q.shape[2] > 1:
        if q.shape[2] != k.shape[2]:
            raise ValueError("causal attention without a mask needs equal query and key lengths")
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        kwargs["enable_gqa"] = True
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=scale, **kwargs)
    # [b, h, s, d] -> [s, b, h*d]
    b, h, s, d = out.shape
    return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def packed_per_sequence(q, k, v, bounds, scale=None):
    """Causal attention within each sequence of a pack, one SDPA call per sequence.  q/k/v [t, heads, d]
    (K/V may have fewer heads: GQA), ``bounds`` the sequence boundaries as ints (cu_seqlens); tokens past
    the last boundary (the pack's padding) get zeros.  Returns [1, t, heads, d_v].

    Split/cat rather than slicing and slice-assignment: the backward of each slice (and of each
    assignment) would allocate and add a full-size zero tensor per sequence.  The pack is viewed as
    [1, heads, t, d] once and split along t, and the outputs [1, L, heads, d] are joined along L, so a
    sequence costs its SDPA call, its split views and one transpose: no per-sequence select, whose
    backward allocated a zero tensor and copied into it (scripts/count_packed_ops.py: 10,754 -> 8,994
    aten ops per train step)."""
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    tail = q.shape[0] - bounds[-1]
    parts = sizes + [tail] if tail else sizes
    gqa = k.shape[1] != q.shape[1]
    outs = []
    views = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, t, d]
    for qs, ks, vs in zip(*(torch.split(x, parts, dim=2) for x in views)):
        n = qs.shape[2]
        if len(outs) == len(sizes):
            outs.append(qs.new_zeros(1, n, qs.shape[1], vs.shape[3]))
        elif n == 0:
            outs.append(qs.new_empty(1, 0, qs.shape[1], vs.shape[3]))
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=0.0, scale=scale, is_causal=n > 1,
                                               enable_gqa=gqa)  # [1, heads, L, d]
            outs.append(o.transpose(1, 2))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


_ALLOWED = {"mask": None, "value": None}  # one entry: Megatron's mask (True = masked) -> SDPA's (True = kept)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """SDPA's boolean mask from Megatron's, once per mask tensor: the layers of a forward pass (each decode
    step of the engine) are given the same mask object.  The entry holds that object, so identity cannot
    be reused while it is cached; masks are not written in place."""
    if _ALLOWED["mask"] is not mask:
        _ALLOWED["mask"], _ALLOWED["value"] = mask, ~mask.to(torch.bool)
    return _ALLOWED["value"]


def cpu_boundaries(params) -> None:
    """Put a CPU copy of ``cu_seqlens_q`` into the ``*_padded`` fields of a local-spec PackedSeqParams:
    Megatron's RoPE for THD reads those first and calls ``.tolist()`` on them (on a CUDA tensor that is a
    device sync in every layer), and SDPAttention takes its loop bounds from them."""
    cpu = params.cu_seqlens_q.cpu()
    params.cu_seqlens_q_padded = cpu
    params.cu_seqlens_kv_padded = cpu


def _on_cpu(t) -> bool:
    return t is not None and t.device.type == "cpu"


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn
