"""Retiring solved prompts from the training pool (``data.retire_solved_after``).

Over a prolonged run more and more prompts are solved by every sample of their group.  Such a group has no
signal: dynamic sampling throws it away and draws again, so each one costs a full group of rollouts for
nothing.  Skywork-OR1 and POLARIS drop prompts whose samples were all correct from later epochs.  Here a prompt
whose group was solved (every sample's verifier reward >= ``solved_reward``) in ``after`` draws in a row leaves
the training pool for the rest of the run.  A draw that is not solved resets the prompt's count.  Prompts that no
sample solves stay: a prolonged run is meant to reach them (ProRL's point).  Evaluation prompts are untouched.

A prompt is known by a key: its record's ``id`` when it has one (with its mixture source), else a hash of its
source, domain and text (``prompt`` or ``messages``).  The counts and the retired keys are the same on every rank
(the trainer gathers each step's outcomes over the data-parallel ranks) and go into the trainer's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Iterable, Mapping, Tuple


def prompt_key(record: Mapping[str, Any]) -> str:
    """A short stable key of a prompt record (16 hex digits)."""
    if record.get("id") is not None:
        basis = json.dumps(["id", record.get("source", ""), str(record["id"])])
    else:
        basis = json.dumps(["text", record.get("source", ""), record.get("domain", ""), record.get("prompt"),
                            record.get("messages")], sort_keys=True, default=str)
    return hashlib.blake2b(basis.encode(), digest_size=8).hexdigest()


class SolvedPromptFilter:
    """Counts, per prompt, the draws in a row whose every sample was solved; retires a prompt at ``after``
    (0: never, the filter is off)."""

    def __init__(self, after: int = 0, solved_reward: float = 1.0):
        if after < 0:
            raise ValueError(f"retire_solved_after must be >= 0, got {after}")
        self.after, self.solved_reward = int(after), float(solved_reward)
        self.streak: Dict[str, int] = {}
        self.retired: set = set()

    @property
    def enabled(self) -> bool:
        return self.after > 0

    def is_retired(self, record: Mapping[str, Any]) -> bool:
        return self.enabled and bool(self.retired) and prompt_key(record) in self.retired

    def outcome(self, record: Mapping[str, Any], rewards: Iterable[float]) -> Tuple[str, bool]:
        """(key, solved) of one drawn group from its samples' raw verifier rewards."""
        rewards = [float(r) for r in rewards]
        return prompt_key(record), bool(rewards) and all(r >= self.solved_reward for r in rewards)

    def observe(self, outcomes: Iterable[Tuple[str, bool]]) -> int:
        """Apply drawn groups' outcomes in order; returns how many prompts they retired."""
        if not self.enabled:
            return 0
        newly = 0
        for key, solved in outcomes:
            if key in self.retired:
                continue
            if not solved:
                self.streak.pop(key, None)
                continue
            count = self.streak.get(key, 0) + 1
            if count >= self.after:
                self.streak.pop(key, None)
                self.retired.add(key)
                newly += 1
            else:
                self.streak[key] = count
        return newly

    def state_dict(self) -> Dict[str, Any]:
        return {"after": self.after, "streak": dict(self.streak), "retired": sorted(self.retired)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A checkpoint's counts and retired prompts (kept as they are if this run's ``after`` differs: a
        retired prompt stays retired, a streak counts on toward the new threshold)."""
        self.streak = {str(k): int(v) for k, v in dict(state.get("streak", {})).items()}
        self.retired = set(str(k) for k in state.get("retired", []))
        if self.enabled:  # a lower threshold retires the streaks that already reach it
            for key in [k for k, c in self.streak.items() if c >= self.after]:
                self.retired.add(key)
                del self.streak[key]

