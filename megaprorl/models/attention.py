"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix, which at
8K-16K tokens costs tens of GB; TransformerEngine's fused attention is the production path but is
an optional, GPU-only extra.  This drop-in replacement for the local spec's ``core_attention`` lets
PyTorch pick FlashAttention / memory-efficient kernels on GPU (and a fused kernel on CPU): with no
explicit mask it runs causal attention without building any mask; with Megatron's boolean mask
(True = masked, used by the rollout engine's left-padded KV-cached decode) it passes the inverse.
Grouped-query attention uses SDPA's ``enable_gqa`` (no K/V copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need the TransformerEngine spec (model.transformer_impl)")
        if attention_bias is not None:
            raise NotImplementedError("attention bias is not supported by SDPAttention")
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
