"""RoPE for packed (``thd``) sequences without a per-sequence loop.

Megatron-core 0.16's unfused RoPE for packed sequences (``_apply_rotary_pos_emb_thd``) splits the
pack into its sequences and concatenates one slice of the frequency table per sequence, for the
query and for the key of every layer, forward and backward: a few ops per sequence per layer.  The
rotation itself only needs each token's position inside its own sequence, which is the same for
every layer of a forward pass.  ``install()`` reroutes Megatron's attention to ``apply_rotary_pos_emb``
below: for a packed input it gathers the per-token frequencies once per (frequency table,
boundaries) pair, and rotates the whole pack with Megatron's own ``bshd`` function; every other case
(no packing, fused RoPE, context parallelism, multi-latent attention) goes to Megatron unchanged.
Same numbers as Megatron's path, element for element (tests/test_packing.py).
"""

from __future__ import annotations

import torch

_ORIGINAL = None
_CACHE = {"key": None, "value": None}  # one entry: (freqs, cu_seqlens, tokens) -> per-token freqs


def token_positions(cu_seqlens: torch.Tensor, total: int, device=None) -> torch.Tensor:
    """Position of each of the ``total`` tokens inside its own sequence, for boundaries ``cu_seqlens``
    (``[n + 1]``, starting at 0, ending at ``total``).  No device synchronisation."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return torch.arange(total, device=cu.device) - starts


def packed_freqs(freqs: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Per-token frequencies ``[total, 1, 1, d]`` for a pack: Megatron's mapping (a table of the whole
    pack's length is indexed by offset, a table of the longest sequence's length by position)."""
    key = (freqs, cu_seqlens, total)
    cached = _CACHE["key"]
    if cached is not None and cached[0] is freqs and cached[1] is cu_seqlens and cached[2] == total:
        return _CACHE["value"]
    ends = cu_seqlens[[0, -1]].tolist()  # once per forward pass (a device sync for CUDA boundaries)
    if ends != [0, total]:
        raise ValueError(f"packed sequences: cu_seqlens runs from {ends[0]} to {ends[1]}, the pack has {total} "
                         "tokens (boundaries must start at 0 and end at the pack's length)")
    if freqs.size(0) == total:  # Megatron's "exact mapping with offsets": token i gets row i
        value = freqs
    else:
        value = freqs[token_positions(cu_seqlens, total, freqs.device)]
    _CACHE["key"], _CACHE["value"] = key, value  # holds both tensors, so identity cannot be reused
    return value


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """Drop-in for ``megatron.core.models.common.embeddings.rope_utils.apply_rotary_pos_emb``."""
    from megatron.core.models.common.embeddings import rope_utils

    cp_size = cp_group.size() if cp_group is not None else 1
    if cu_seqlens is None or config.apply_rope_fusion or cp_size > 1 or t.dim() != 3:
        return (_ORIGINAL or rope_utils.apply_rotary_pos_emb)(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    per_token = packed_freqs(freqs, cu_seqlens, t.shape[0])
    return rope_utils._apply_rotary_pos_emb_bshd(
        t.unsqueeze(1), per_token, rotary_interleaved=config.rotary_interleaved,
        multi_latent_attention=config.multi_latent_attention, mscale=mscale).squeeze(1)


def install() -> None:
    """Route Megatron's attention modules through ``apply_rotary_pos_emb`` (idempotent)."""
    global _ORIGINAL
    import megatron.core.transformer.attention as attention

    if attention.apply_rotary_pos_emb is apply_rotary_pos_emb:
        return
    _ORIGINAL = attention.apply_rotary_pos_emb
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb
