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
across: through ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen) for bf16/fp16 CUDA
tensors when this torch has it, else one SDPA call per sequence (exact, O(sum L_i^2) work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("attention bias is not supported by SDPAttention")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        kwargs = {}
        if attention_mask is not None:
            kwargs["attn_mask"] = ~attention_mask.to(torch.bool)
        elif mask_type == AttnMaskType.causal and q.shape[2] > 1:
            if q.shape[2] != k.shape[2]:
                raise ValueError("causal attention without a mask needs equal query and key lengths")
            kwargs["is_causal"] = True
        if k.shape[1] != q.shape[1]:
            kwargs["enable_gqa"] = True
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=self.softmax_scale, **kwargs)
        # [b, h, s, d] -> [s, b, h*d]
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _packed(self, q, k, v, p):
        if p.qkv_format != "thd":
            raise NotImplementedError(f"SDPAttention supports packed sequences in 'thd' format, got {p.qkv_format!r}")
        if p.cu_seqlens_q_padded is not None and not torch.equal(p.cu_seqlens_q_padded, p.cu_seqlens_q):
            raise NotImplementedError("SDPAttention: padded cu_seqlens (context parallel) are not supported")
        cu_q, cu_k = p.cu_seqlens_q, p.cu_seqlens_kv if p.cu_seqlens_kv is not None else p.cu_seqlens_q
        if not torch.equal(cu_q, cu_k):
            raise ValueError("packed causal self-attention needs cu_seqlens_q == cu_seqlens_kv")
        gqa = k.shape[1] != q.shape[1]
        varlen = _varlen_attn() if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) else None
        if varlen is not None:
            max_len = int(p.max_seqlen_q) if p.max_seqlen_q else int((cu_q[1:] - cu_q[:-1]).max())
            out = varlen(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_len, max_len, scale=self.softmax_scale,
                         window_size=(-1, 0), enable_gqa=gqa)
        else:
            out = torch.empty_like(q)
            bounds = cu_q.tolist()
            for s, e in zip(bounds[:-1], bounds[1:]):
                if e == s:
                    continue
                qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))  # [1, h, L, d]
                o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=0.0, scale=self.softmax_scale,
                                                   is_causal=e - s > 1, enable_gqa=gqa)
                out[s:e] = o[0].transpose(0, 1)
            if bounds[-1] < q.shape[0]:  # tokens after the last sequence (padding of the pack): zeros
                out[bounds[-1]:] = 0
        return out.reshape(out.shape[0], -1)


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn
