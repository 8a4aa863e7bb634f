"""Triton kernels of megaprorl: the fused per-token policy loss (logits input and fused LM head).

Use them through ``megaprorl.kernels.policy_loss`` / ``policy_loss_lm_head``; see docs/kernels.md.
"""

from .policy_loss import GRAD_MODES, HAVE_TRITON, interpreting, policy_loss_triton  # noqa: F401
from .fused_lm_head import policy_loss_lm_head_triton  # noqa: F401
