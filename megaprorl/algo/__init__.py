"""The executable specification of the ProRL algorithm: pure functions on tensors.

No I/O; the only distributed calls are collectives over a process group passed as an argument
(``whiten`` / ``compute_advantages``).  Kernels and parallel paths are tested against these.
"""

from .advantages import (ESTIMATORS, compute_advantages, fold_kl_into_rewards, group_baseline_advantages,
                         returns_to_go, token_advantages, whiten)
from .entropy_control import EntropyControlConfig, EntropyController
from .dynamic_sampling import DynamicSampler, DynamicSamplingConfig, group_has_signal, groups_with_signal
from .length_penalty import (LengthPenaltyConfig, LengthPenaltySchedule, OverlongPenaltyConfig, apply_length_penalty,
                             cosine_fn, filter_overlong, overlong_penalty)
from .loss import (KL_ESTIMATORS, RATIO_LEVELS, LossSpec, aggregation_weights, clipped_pg_loss, kl_estimate,
                   logprob_entropy_from_logits, per_token_loss, policy_loss_from_logits, sequence_level_pg_loss,
                   sequence_log_ratio, sequence_ratio_old_logp)
from .passk import pass_at_k, pass_at_k_batch, summarize_eval
from .rollout_correction import RolloutCorrectionConfig, mismatch_stats, rollout_correction_weights
from .reset import TRIGGERS, ReferenceResetConfig, ReferenceResetController

__all__ = [
    "ESTIMATORS", "compute_advantages", "fold_kl_into_rewards", "group_baseline_advantages", "returns_to_go",
    "token_advantages", "whiten",
    "EntropyControlConfig", "EntropyController",
    "DynamicSampler", "DynamicSamplingConfig", "group_has_signal", "groups_with_signal",
    "LengthPenaltyConfig", "LengthPenaltySchedule", "OverlongPenaltyConfig", "apply_length_penalty", "cosine_fn",
    "filter_overlong", "overlong_penalty",
    "KL_ESTIMATORS", "LossSpec", "aggregation_weights", "clipped_pg_loss", "kl_estimate",
    "logprob_entropy_from_logits", "per_token_loss", "policy_loss_from_logits", "RATIO_LEVELS",
    "sequence_level_pg_loss", "sequence_log_ratio", "sequence_ratio_old_logp",
    "pass_at_k", "pass_at_k_batch", "summarize_eval",
    "RolloutCorrectionConfig", "mismatch_stats", "rollout_correction_weights",
    "TRIGGERS", "ReferenceResetConfig", "ReferenceResetController",
]
