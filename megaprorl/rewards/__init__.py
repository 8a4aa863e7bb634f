"""Verifiable rewards: one verifier per domain behind a registry, a worker pool, the code sandbox.

Domains: "math", "code", "stem", "logic" (Reasoning Gym), "ifeval"; more via register_verifier.
See docs/rewards.md.
"""

from .base import (
    RewardConfig,
    RewardResult,
    get_verifier,
    register_verifier,
    registered_domains,
    score_one,
)
from .pool import RewardFuture, RewardPool

__all__ = [
    "RewardConfig",
    "RewardResult",
    "RewardFuture",
    "RewardPool",
    "get_verifier",
    "register_verifier",
    "registered_domains",
    "score_one",
]
