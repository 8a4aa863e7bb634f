"""The local spec's RMSNorm / LayerNorm, with sequence parallelism.

Megatron-core's ``WrappedTorchNorm`` (the local spec's norm without Apex) refuses
``sequence_parallel``, which left sequence parallelism to TransformerEngine's spec.  Under sequence
parallelism a norm sees only its rank's slice of the tokens, so its weight gradient is a partial sum
over the TP group; Megatron's ``finalize_model_grads`` all-reduces exactly the parameters that carry
``sequence_parallel = True`` (as TE's norms and Megatron's ``FusedLayerNorm`` mark theirs).  This norm
marks its parameters so, and is otherwise torch's own module: the same parameter names and state dict
as ``WrappedTorchNorm``, created directly in ``params_dtype``.
"""

from __future__ import annotations

import torch


class TorchNorm:
    """Build-time factory with ``WrappedTorchNorm``'s signature (Megatron's ``build_module`` calls it)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("TorchNorm: zero-centred gamma is not supported")
        kinds = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in kinds:
            raise ValueError(f"TorchNorm: normalization must be one of {list(kinds)}, got {config.normalization!r}")
        norm = kinds[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm
