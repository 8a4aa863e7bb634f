"""Scheduled cosine length reward (arXiv 2502.03373, "Demystifying Long Chain-of-Thought Reasoning").

    CosFn(L, L_max, r0, rL) = rL + 0.5 * (r0 - rL) * (1 + cos(pi * L / L_max))

``L`` is the generated length in tokens (clamped to [0, L_max]), ``L_max`` the generation limit;
the value is ``r0`` at L = 0 and ``rL`` at L = L_max.  Shaped reward of one response:

  * truncated (no end-of-sequence before the limit): ``exceed_reward``;
  * correct (verifier reward >= ``correct_threshold``): CosFn(L, L_max, correct_r0, correct_rL)
    — decays from 2.0 to 1.0 by default: shorter correct answers are preferred;
  * otherwise (wrong, including partial credit below the threshold):
    CosFn(L, L_max, wrong_r0, wrong_rL) — rises from -10.0 toward 0.0: longer attempts are
    penalised less.

Defaults are the values of arXiv 2502.03373 (r0_c = 2, rL_c = 1, r0_w = -10, rL_w = 0,
r_exceed = -10).  The penalty is scheduled: ``on_steps`` RL steps on, then ``off_steps`` off,
repeating from step 0 (``start_on = False`` begins with the off phase).  Off means the plain verifier
reward; dynamic sampling and the advantages see the shaped reward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass
class LengthPenaltyConfig:
    enabled: bool = False
    max_length: int = 0  # L_max in tokens; 0 = the caller passes it (the rollout's max_new_tokens)
    correct_r0: float = 2.0
    correct_rL: float = 1.0
    wrong_r0: float = -10.0
    wrong_rL: float = 0.0
    exceed_reward: float = -10.0
    correct_threshold: float = 1.0  # a response is correct when its verifier reward >= this
    on_steps: int = 100
    off_steps: int = 500
    start_on: bool = True


def cosine_fn(length, max_length, r0: float, rL: float):
    """CosFn(L, L_max, r0, rL); ``length`` may be a number or a tensor; L is clamped to [0, L_max]."""
    if max_length <= 0:
        raise ValueError(f"max_length must be > 0 (got {max_length})")
    if isinstance(length, torch.Tensor):
        x = length.double().clamp(0.0, float(max_length)) / float(max_length)
        return rL + 0.5 * (r0 - rL) * (1.0 + torch.cos(math.pi * x))
    x = min(max(float(length), 0.0), float(max_length)) / float(max_length)
    return rL + 0.5 * (r0 - rL) * (1.0 + math.cos(math.pi * x))


@dataclass
class OverlongPenaltyConfig:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): added to the reward of a response whose length
    enters the last ``buffer`` tokens of the budget L_max, growing linearly to ``-factor`` at L_max (a truncated
    response is at L_max).  0 = off."""

    buffer: int = 0  # L_cache, in tokens (DAPO: 4096 of a 20480-token budget)
    factor: float = 1.0  # the penalty at the budget


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float) -> torch.Tensor:
    """-factor * clamp((L - (L_max - buffer)) / buffer, 0, 1) per response length L [N] (float32): 0 up to
    L_max - buffer, -factor at L_max and beyond."""
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"the overlong buffer must be in [1, max_length={max_length}], got {buffer}")
    over = (lengths.double() - float(max_length - buffer)) / float(buffer)
    return (-float(factor) * over.clamp(0.0, 1.0)).float()


def filter_overlong(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO's overlong filtering: the loss mask [B, L] with the rows of truncated responses (no end token within
    the budget) zeroed, so that they take no part in the loss, its normaliser or the advantages' whitening; their
    rewards still count in their group's baseline."""
    return mask * (~truncated.to(torch.bool, copy=False)).to(mask.dtype)[:, None]


def apply_length_penalty(rewards: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor,
                         cfg: LengthPenaltyConfig, max_length: Optional[int] = None) -> torch.Tensor:
    """Shaped rewards [N] from verifier rewards [N], generated lengths [N] and truncation flags [N].

    ``L_max`` is ``cfg.max_length`` when > 0, else ``max_length`` (the caller's generation limit).
    Applies the penalty unconditionally: checking ``cfg.enabled`` and the schedule is the caller's job
    (``LengthPenaltySchedule.is_on``).  Returned in the dtype of ``rewards`` (float32 if integer).
    """
    l_max = cfg.max_length if cfg.max_length > 0 else (max_length or 0)
    if l_max <= 0:
        raise ValueError("algo.length_penalty.max_length must be > 0 (or pass max_length=the rollout's "
                         "max_new_tokens)")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    lengths = lengths.to(rewards.device)
    correct = rewards.double() >= cfg.correct_threshold
    good = cosine_fn(lengths, l_max, cfg.correct_r0, cfg.correct_rL)
    bad = cosine_fn(lengths, l_max, cfg.wrong_r0, cfg.wrong_rL)
    shaped = torch.where(correct, good, bad)
    trunc = truncated.to(torch.bool).to(rewards.device)
    shaped = torch.where(trunc, torch.full_like(shaped, cfg.exceed_reward), shaped)
    return shaped.to(out_dtype)


class LengthPenaltySchedule:
    """On/off cycle of the length penalty: a pure function of the RL step.

    With ``start_on``: steps [0, on) on, [on, on + off) off, and so on; otherwise the off phase
    comes first.  ``on_steps <= 0`` means never on; ``off_steps <= 0`` means always on (when enabled).
    ``is_on`` is False whenever ``cfg.enabled`` is False.
    """

    def __init__(self, cfg: LengthPenaltyConfig):
        if cfg.on_steps < 0 or cfg.off_steps < 0:
            raise ValueError("algo.length_penalty.on_steps and off_steps must be >= 0")
        self.cfg = cfg

    def is_on(self, step: int) -> bool:
        c = self.cfg
        if not c.enabled or c.on_steps <= 0:
            return False
        if c.off_steps <= 0:
            return True
        phase = int(step) % (c.on_steps + c.off_steps)
        return phase < c.on_steps if c.start_on else phase >= c.off_steps

    def state_dict(self) -> Dict:
        # Nothing evolves (the schedule is a function of the step); the config is saved for the record.
        c = self.cfg
        return {"enabled": c.enabled, "on_steps": c.on_steps, "off_steps": c.off_steps, "start_on": c.start_on}

    def load_state_dict(self, state: Dict) -> None:
        # The current config wins, so a resumed run may change the schedule; keep what was saved.
        self.loaded_state = dict(state or {})
