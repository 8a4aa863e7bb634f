"""The one entry point for the per-token policy loss: torch reference, Triton, or the CUDA extension.

    policy_loss(logits, tokens, old_logp, ref_logp, adv, weight, spec, *, backend="auto",
                tp_group=None, vocab_start_index=0, grad_mode="recompute") -> PolicyLossOutput
    policy_loss_lm_head(hidden, lm_weight, tokens, old_logp, ref_logp, adv, weight, spec, *,
                        backend="auto", tp_group=None, vocab_start_index=0, token_chunk=2048)

``loss = sum(weight * loss_t)`` with gradient to the logits (or hidden and LM-head weight); ``logp``,
``entropy``, ``kl`` are detached fp32 [T] (``kl`` is None without ``ref_logp``).  Logits may be bf16/fp16
/fp32 [T, V_local]; under tensor parallelism pass the TP ``tp_group`` and this rank's
``vocab_start_index``: results equal TP=1 and each rank gets the gradient of its own shard.

backend: ``auto`` (Triton for CUDA tensors when triton imports, else torch), ``torch`` (the
``megaprorl.algo.loss`` reference; vocab-parallel form under TP), ``torch_compile`` (``torch.compile``
of the reference at TP=1; the torch vocab-parallel path under TP), ``triton``, ``cuda`` (the
``megaprorl.kernels.cuda_ext`` extension).  On CPU tensors ``triton`` needs ``TRITON_INTERPRET=1``.
The semantics are those of ``megaprorl/algo/loss.py``; see docs/kernels.md.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .torch_ref import PolicyLossOutput, tp_world_size, torch_policy_loss, vocab_parallel_logp_entropy

BACKENDS = ("auto", "torch", "triton", "cuda", "torch_compile")
# where the Triton loss computes the logits gradient (policy_loss's grad_mode); other backends ignore it
GRAD_MODES = ("recompute", "forward", "inplace")

_COMPILED = {}


def triton_available() -> bool:
    """True when the Triton kernels (triton + the triton_kernels package) import."""
    try:
        import triton_kernels
    except Exception:
        return False
    return bool(triton_kernels.HAVE_TRITON)


def _resolve(backend: str, t: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if (t.is_cuda and triton_available()) else "torch"
    return backend


def _triton():
    try:
        import triton_kernels
    except ImportError as e:  # triton missing, or the repository root not on sys.path
        raise RuntimeError(f"backend 'triton' is unavailable ({e}); install triton (pip install -e .[gpu]) or use "
                           "backend='torch'") from e
    if not triton_kernels.HAVE_TRITON:
        raise RuntimeError("backend 'triton' needs the triton package (pip install triton); use backend='torch'")
    return triton_kernels


def _cuda_ext():
    try:
        return importlib.import_module("megaprorl.kernels.cuda_ext")
    except Exception as e:
        raise RuntimeError(
            f"backend 'cuda' is unavailable: importing megaprorl.kernels.cuda_ext failed ({type(e).__name__}: {e}). "
            "Build the CUDA extension on a machine with nvcc and a CUDA build of torch: "
            "`MEGAPRORL_BUILD_CUDA=1 pip install -e .[gpu]`; or use backend='triton' / 'torch'.") from e


def _compiled_reference():
    if "ref" not in _COMPILED:
        from megaprorl.algo.loss import policy_loss_from_logits

        _COMPILED["ref"] = torch.compile(policy_loss_from_logits, dynamic=False)
    return _COMPILED["ref"]


def policy_loss(logits: torch.Tensor, tokens: torch.Tensor, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
                adv: torch.Tensor, weight: torch.Tensor, spec, *, backend: str = "auto", tp_group=None,
                vocab_start_index: int = 0, grad_mode: str = "recompute") -> PolicyLossOutput:
    """Per-token policy loss on (vocab-parallel) logits [T, V_local] (or [..., V_local], flattened);
    see the module docstring.

    grad_mode (Triton only): ``recompute`` (default; backward makes one more pass over the logits),
    ``forward`` (gradient computed in the forward call into a new buffer) or ``inplace`` (the gradient
    overwrites ``logits`` in the forward call, saving a [T, V] buffer; ``logits`` must not be used again).
    ``cuda`` takes ``inplace`` as its in-place backward (the gradient written over the saved logits:
    the same one [T, V] buffer) and computes the gradient in backward for the other two; the torch
    backends accept any of the three and ignore it.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    b = _resolve(backend, logits)
    if logits.dim() != 2:  # [..., V] -> [T, V]; per-token inputs are flattened alike
        logits = logits.reshape(-1, logits.shape[-1])
    tokens, old_logp, adv, weight = (t.reshape(-1) for t in (tokens, old_logp, adv, weight))
    ref_logp = None if ref_logp is None else ref_logp.reshape(-1)
    if b == "torch":
        return torch_policy_loss(logits, tokens, old_logp, ref_logp, adv, weight, spec, tp_group=tp_group,
                                 vocab_start_index=vocab_start_index)
    if b == "torch_compile":
        ref_fn = _compiled_reference() if tp_world_size(tp_group) == 1 else None
        return torch_policy_loss(logits, tokens, old_logp, ref_logp, adv, weight, spec, tp_group=tp_group,
                                 vocab_start_index=vocab_start_index, reference_fn=ref_fn)
    if b == "triton":
        tk = _triton()
        loss, logp, ent, kl = tk.policy_loss_triton(logits, tokens, old_logp, ref_logp, adv, weight, spec,
                                                    tp_group=tp_group, vocab_start_index=vocab_start_index,
                                                    grad_mode=grad_mode)
        return PolicyLossOutput(loss, logp, ent, kl)
    # cuda
    out = _cuda_ext().policy_loss_cuda(logits, tokens, old_logp, ref_logp, adv, weight, spec, tp_group=tp_group,
                                       vocab_start_index=vocab_start_index,
                                       inplace_backward=grad_mode == "inplace")
    return PolicyLossOutput(*out)


def policy_loss_lm_head(hidden: torch.Tensor, lm_weight: torch.Tensor, tokens: torch.Tensor, old_logp: torch.Tensor,
                        ref_logp: Optional[torch.Tensor], adv: torch.Tensor, weight: torch.Tensor, spec, *,
                        backend: str = "auto", tp_group=None, vocab_start_index: int = 0,
                        token_chunk: int = 2048) -> PolicyLossOutput:
    """Policy loss from hidden [T, H] and the LM-head weight shard [V_local, H].

    ``triton`` never materialises [T, V]: token chunks of ``token_chunk`` rows, gradients to hidden and
    weight computed in the forward call.  ``torch`` / ``torch_compile`` / ``cuda`` materialise the logits
    (``hidden @ lm_weight.T``) and call ``policy_loss`` (the cuda extension's own fused LM head is used
    when it offers ``policy_loss_lm_head_cuda``).  Under TP the gradient to ``hidden`` is this rank's
    partial sum; the caller all-reduces it (``megaprorl.parallel.all_reduce_grad_tp``, as the policy does).
    """
    b = _resolve(backend, hidden)
    if hidden.dim() != 2:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    if b == "triton":
        tk = _triton()
        loss, logp, ent, kl = tk.policy_loss_lm_head_triton(hidden, lm_weight, tokens, old_logp, ref_logp, adv,
                                                            weight, spec, tp_group=tp_group,
                                                            vocab_start_index=vocab_start_index,
                                                            token_chunk=token_chunk)
        return PolicyLossOutput(loss, logp, ent, kl)
    if b == "cuda":
        ext = _cuda_ext()
        if hasattr(ext, "policy_loss_lm_head_cuda"):
            return PolicyLossOutput(*ext.policy_loss_lm_head_cuda(
                hidden, lm_weight, tokens, old_logp, ref_logp, adv, weight, spec, tp_group=tp_group,
                vocab_start_index=vocab_start_index, token_chunk=token_chunk))
    logits = hidden @ lm_weight.t()
    return policy_loss(logits, tokens, old_logp, ref_logp, adv, weight, spec, backend=b, tp_group=tp_group,
                       vocab_start_index=vocab_start_index)


__all__ = ["BACKENDS", "GRAD_MODES", "PolicyLossOutput", "policy_loss", "policy_loss_lm_head", "torch_policy_loss",
           "vocab_parallel_logp_entropy", "triton_available"]
