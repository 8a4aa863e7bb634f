"""RoPE for packed (``thd``) sequences without a per-sequence loop.

Megatron-core 0.16's unfused RoPE for packed sequences (``_apply_rotary_pos_emb_thd``) splits the
pack into its sequences and concatenates one slice of the frequency table per sequence, for the
query and for the key of every layer, forward and backward: a few ops per sequence per layer.  The
rotation itself only needs each token's position inside its own sequence, which is the same for
every layer of a forward pass.  ``install()`` reroutes Megatron's attention to ``apply_rotary_pos_emb``
below: for a packed input it gathers the per-token frequencies once per (frequency table,
boundaries) pair, and rotates the whole pack as Megatron's ``bshd`` function does (``rotate_bshd``,
which also serves unpacked inputs, with cos and sin computed once per frequency table); fused RoPE,
context parallelism and multi-latent attention go to Megatron unchanged.  Same numbers as Megatron's
path, element for element (tests/test_packing.py, tests/test_rope_packed.py).

KV-cached decoding (the embedded engine, Megatron's static inference context): Megatron stores keys
in the cache unrotated and rotates the whole cached prefix ``[t, b, groups, d]`` again in every layer
at every step, several elementwise passes over the keys, more memory traffic than the attention's own
read of them.  ``install()`` also wraps ``Attention._adjust_key_value_for_inference``: each new key is
rotated once, with its own positions' frequencies, before it is stored, and the attention then skips
the key rotation.  RoPE is elementwise per position, so the numbers are the same, element for element
(tests/test_rope_packed.py).

RoPE scaling (``rope_scaling_spec`` / ``scale_rope``): the frequency table of Llama-3.x checkpoints
(``rope_type: llama3``), of linear position interpolation (``rope_type: linear``) and of YaRN
(``rope_type: yarn``, Qwen3 / Qwen2.5 past their pretraining context), HF's formulas, set on the model's
``rotary_pos_emb`` once after it is built; every path above reads that table.  YaRN also scales cos and sin
by its attention factor: set on the model's TransformerConfig as Megatron's own YaRN fields, so Megatron's
attention passes it to every rotation (``attention_factor`` reads it back for the engine's lean step).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Mapping

import torch

# rope_type -> the parameters it needs (HF's config.json names)
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
# yarn's optional parameters and HF's defaults for them (mscale 0: not given)
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.0, "mscale_all_dim": 0.0, "truncate": True}

_ORIGINAL = None
_ORIGINAL_ADJUST = None
_CACHE = {"key": None, "value": None}  # one entry: (freqs, cu_seqlens, tokens) -> per-token freqs
_TRIG = {"key": None, "value": None}  # one entry: a frequency table's cos and sin (see _cos_sin)


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


def _cos_sin(freqs: torch.Tensor, dtype, mscale: float):
    """``(cos(freqs) * mscale).to(dtype)`` and the same for sin, as Megatron's unfused RoPE computes them in
    every call; here once per frequency table, which the layers of a forward pass share (the query and
    key of every layer, and in decoding each step's slice).  The entry holds the table itself, so its
    storage cannot be reused by another tensor while the key (address, shape, strides) is cached."""
    key = (freqs.data_ptr(), tuple(freqs.shape), freqs.stride(), freqs.dtype, freqs.device, dtype, float(mscale))
    if _TRIG["key"] == key:
        return _TRIG["value"][1:]
    cos_ = (torch.cos(freqs) * mscale).to(dtype)
    sin_ = (torch.sin(freqs) * mscale).to(dtype)
    _TRIG["key"], _TRIG["value"] = key, (freqs, cos_, sin_)
    return cos_, sin_


def rotate_bshd(t, freqs, config, mscale: float = 1.0):
    """Megatron's ``_apply_rotary_pos_emb_bshd`` (not multi-latent), element for element, with the cos and
    sin shared through ``_cos_sin`` and no concatenation when the rotation covers the whole head."""
    from megatron.core.models.common.embeddings import rope_utils

    rot_dim = freqs.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos_, sin_ = _cos_sin(freqs, t.dtype, mscale)
    t = (t * cos_) + (rope_utils._rotate_half(t, config.rotary_interleaved) * sin_)
    return t if t_pass.shape[-1] == 0 else torch.cat((t, t_pass), dim=-1)


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """Drop-in for ``megatron.core.models.common.embeddings.rope_utils.apply_rotary_pos_emb``."""
    from megatron.core.models.common.embeddings import rope_utils

    cp_size = cp_group.size() if cp_group is not None else 1
    if config.apply_rope_fusion or cp_size > 1 or config.multi_latent_attention or (cu_seqlens is not None
                                                                                     and t.dim() != 3):
        return (_ORIGINAL or rope_utils.apply_rotary_pos_emb)(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    if cu_seqlens is None:
        return rotate_bshd(t, freqs, config, mscale)
    per_token = packed_freqs(freqs, cu_seqlens, t.shape[0])
    return rotate_bshd(t.unsqueeze(1), per_token, config, mscale).squeeze(1)


def adjust_key_value_rotating_once(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
    """Wraps ``Attention._adjust_key_value_for_inference``: under a static inference context the new keys
    are rotated before the cache stores them, and the returned embeddings carry no key part, so the
    attention rotates only the query.  Anything else (no context, dynamic batching, flash decode, fused
    RoPE, multi-latent attention) goes to Megatron unchanged.

    A context marked ``explicit_masks`` (the embedded engine's: left-padded prompts, rows at their own
    positions) gets the attention mask type ``arbitrary``: Megatron asks for ``causal`` in a prefill and
    ``no_mask`` in a decode step, under which TransformerEngine's attention ignores the mask it is given
    and would attend to the padding (the local spec's attentions apply any mask they are given)."""
    ctx = inference_context if inference_context is not None else kwargs.get("inference_params")
    if (ctx is None or not ctx.is_static_batching() or not isinstance(rotary_pos_emb, tuple)
            or rotary_pos_emb[1] is None or self.config.flash_decode or self.config.apply_rope_fusion
            or self.config.multi_latent_attention):
        out = _ORIGINAL_ADJUST(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        return _explicit_masks(ctx, out)
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    start = ctx.sequence_len_offset
    k_freqs = rotary_pos_emb[1][start: start + key.size(0)]
    key = apply_rotary_pos_emb(key, k_freqs, config=self.config,
                               mscale=_yarn_get_concentration_factor_from_config(self.config))
    q, k, v, rope, mask_type, block_table = _ORIGINAL_ADJUST(self, inference_context, query, key, value,
                                                             rotary_pos_emb, *args, **kwargs)
    return _explicit_masks(ctx, (q, k, v, (rope[0], None), mask_type, block_table))


def _explicit_masks(ctx, adjusted):
    if not getattr(ctx, "explicit_masks", False):
        return adjusted
    from megatron.core.transformer.enums import AttnMaskType

    return (*adjusted[:4], AttnMaskType.arbitrary, *adjusted[5:])


def install() -> None:
    """Route Megatron's attention modules through ``apply_rotary_pos_emb`` and
    ``adjust_key_value_rotating_once`` (idempotent)."""
    global _ORIGINAL, _ORIGINAL_ADJUST
    import megatron.core.transformer.attention as attention

    if attention.apply_rotary_pos_emb is apply_rotary_pos_emb:
        return
    _ORIGINAL = attention.apply_rotary_pos_emb
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb
    _ORIGINAL_ADJUST = attention.Attention._adjust_key_value_for_inference
    attention.Attention._adjust_key_value_for_inference = adjust_key_value_rotating_once


def rope_scaling_spec(raw, where: str = "model.rope_scaling") -> Dict:
    """HF's ``rope_scaling`` (or ``rope_parameters``) dict, or the run config's ``model.rope_scaling``, as
    ``{"rope_type": t, <its parameters>}`` with the parameters as floats (``original_max_position_embeddings``
    an int); ``{}`` for none or ``default``.  Other keys (``rope_theta`` in ``rope_parameters``) are left
    out.  Raises ``ValueError`` naming ``where`` for a type megaprorl does not build or a missing or bad
    parameter."""
    if dataclasses.is_dataclass(raw):  # the run config's model.rope_scaling
        raw = dataclasses.asdict(raw)
    if not raw:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping like {{rope_type: llama3, factor: 8.0, ...}}, got {raw!r}")
    rt = str(raw.get("rope_type", raw.get("type", "default")) or "default")
    if rt == "default":
        return {}
    if rt not in ROPE_SCALINGS:
        raise ValueError(f"{where}: RoPE scaling {rt!r} is not supported (megaprorl builds "
                         f"{' and '.join(ROPE_SCALINGS)}); the model would not reproduce the checkpoint's logits")
    out: Dict = {"rope_type": rt}
    for k in ROPE_SCALINGS[rt]:
        v = raw.get(k)
        try:
            out[k] = int(v) if k == "original_max_position_embeddings" else float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: rope_type {rt!r} needs a number for {k!r}, got {v!r}") from None
        if out[k] <= 0:
            raise ValueError(f"{where}: {k} must be > 0, got {v!r}")
    if rt == "yarn":
        for k, default in YARN_DEFAULTS.items():
            v = raw.get(k)
            if v is None:
                v = default
            if k == "truncate":
                if not isinstance(v, bool):
                    raise ValueError(f"{where}: yarn's truncate must be true or false, got {v!r}")
                out[k] = v
                continue
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: yarn's {k} must be a number, got {v!r}") from None
        if raw.get("attention_factor") is not None:
            derived = _yarn_attention_factor(out)
            if abs(float(raw["attention_factor"]) - derived) > 1e-9 * derived:
                raise ValueError(f"{where}: yarn with attention_factor={raw['attention_factor']} (other than the "
                                 f"{derived:.6g} its factor and mscales give) is not supported")
    if rt == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"{where}: high_freq_factor ({out['high_freq_factor']}) must exceed low_freq_factor "
                         f"({out['low_freq_factor']})")
    return out


def _megatron_yarn_mscales(spec: Dict):
    """(mscale, mscale_all_dim) as Megatron's YaRN fields take them: HF uses the pair only when both are
    non-zero (else the factor alone), Megatron only when neither is None."""
    both = bool(spec["mscale"] and spec["mscale_all_dim"])
    return (spec["mscale"], spec["mscale_all_dim"]) if both else (None, None)


def _yarn_attention_factor(spec: Dict) -> float:
    """YaRN's scale of cos and sin (HF's attention_factor), by Megatron's concentration factor."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

    return _yarn_get_concentration_factor(spec["factor"], *_megatron_yarn_mscales(spec))


def yarn_inv_freq(inv_freq: torch.Tensor, spec: Dict, base: float) -> torch.Tensor:
    """YaRN's frequencies (HF's ``_compute_yarn_parameters``): the interpolated ones (/ factor) for the slow
    dimensions, the original ones for the fast, a linear ramp between the correction range's ends."""
    dim = 2 * inv_freq.numel()

    def correction_dim(rotations):
        return dim * math.log(spec["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(spec["beta_fast"]), correction_dim(spec["beta_slow"])
    if spec["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(inv_freq.device)
    extrapolation = 1 - ramp
    return inv_freq / spec["factor"] * (1 - extrapolation) + inv_freq * extrapolation


def attention_factor(config) -> float:
    """The scale of cos and sin that Megatron's attention applies (YaRN's; 1 otherwise)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    return _yarn_get_concentration_factor_from_config(config)


def scale_rope(model, spec: Dict, base: float) -> None:
    """Rescale the frequencies of ``model.rotary_pos_emb`` (a fresh Megatron ``RotaryEmbedding``, before
    its first forward: its table is cached, built with RoPE base ``base``) by ``spec`` from
    :func:`rope_scaling_spec`; for YaRN also set its attention factor on ``model.config``."""
    if not spec:
        return
    rpe = model.rotary_pos_emb
    if spec["rope_type"] == "linear":
        rpe.inv_freq = rpe.inv_freq / spec["factor"]
    elif spec["rope_type"] == "yarn":
        rpe.inv_freq = yarn_inv_freq(rpe.inv_freq, spec, base)
        # Megatron's attention scales every rotation by the concentration factor of these fields (its YaRN
        # for multi-latent attention)
        cfg = model.config
        cfg.yarn_rotary_scaling_factor = spec["factor"]
        cfg.yarn_mscale, cfg.yarn_mscale_all_dim = _megatron_yarn_mscales(spec)
    else:  # Megatron's own Llama-3 scaling, which takes the four parameters (its constructor only the factor)
        rpe.inv_freq = rpe._apply_scaling(rpe.inv_freq, **{k: v for k, v in spec.items() if k != "rope_type"})
