"""When to reset the reference policy (ProRL): pure decision logic; the trainer copies the weights.

Triggers (each off at 0):
  * ``interval``: ``step - last_reset_step >= interval`` (the clock restarts at every reset, whatever
    its trigger; the first interval counts from step 0).
  * ``kl_spike``: an observed KL to the reference exceeds ``kl_spike_factor`` x the running mean of
    the KLs observed before it since the last reset (an EMA with weight ``kl_ema`` on the past; the
    first observation initialises it).  Armed only after ``kl_warmup_steps`` observations since the
    last reset and only while the running mean is > 0.  Non-finite KL values are ignored.
  * ``val_stall``: the validation metric (higher is better) has not improved on the best seen by
    more than ``stall_min_delta`` for ``stall_evals`` consecutive evaluations.  A reset restarts
    the count (the best value is kept, so a policy that stays below it resets again after another
    ``stall_evals`` evaluations: v1's "stalled or degrading").
A trigger that fires stays pending until a reset is recorded.  ``should_reset`` answers None within
``min_gap`` steps of the last reset.  When several triggers are pending the order of precedence is
kl_spike, val_stall, interval.  ``reset_optimizer`` (v1: True, v2: False) is read by the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

TRIGGERS = ("interval", "kl_spike", "val_stall")


@dataclass
class ReferenceResetConfig:
    interval: int = 0  # RL steps between resets; 0 = off (v2: 200-500)
    kl_spike_factor: float = 0.0  # reset when KL > factor x running mean of KL; 0 = off
    kl_ema: float = 0.9  # weight of the past in the running mean of KL
    kl_warmup_steps: int = 10  # KL observations after a reset before a spike can trigger
    # reset after this many evaluations without improvement (the one before RL sets the first best); 0 = off
    stall_evals: int = 0
    stall_min_delta: float = 0.0  # an improvement must exceed the best by more than this
    stall_metric: str = "eval/accuracy"  # the validation metric watched for a stall (e.g. eval/aime24/pass@1)
    reset_optimizer: bool = False  # v1 clears the optimizer state on reset; v2 keeps it
    min_gap: int = 1  # no reset within this many steps of the previous one


class ReferenceResetController:
    def __init__(self, cfg: ReferenceResetConfig):
        if cfg.interval < 0 or cfg.stall_evals < 0 or cfg.kl_warmup_steps < 0 or cfg.min_gap < 0:
            raise ValueError("algo.reference_reset: interval, stall_evals, kl_warmup_steps and min_gap must be >= 0")
        if cfg.kl_spike_factor < 0:
            raise ValueError("algo.reference_reset.kl_spike_factor must be >= 0")
        if not 0.0 <= cfg.kl_ema < 1.0:
            raise ValueError("algo.reference_reset.kl_ema must be in [0, 1)")
        self.cfg = cfg
        self.history: List[Tuple[int, str]] = []
        self.last_reset_step = 0
        self.kl_mean: Optional[float] = None
        self.kl_count = 0
        self.best_metric: Optional[float] = None
        self.evals_since_improvement = 0
        self.pending: List[str] = []

    # --------------------------------------------------------------------------- observations
    def observe_kl(self, step: int, kl: float) -> bool:
        """Feed the mean KL to the reference at ``step``; returns True when it is a spike."""
        kl = float(kl)
        if not math.isfinite(kl):
            return False
        c = self.cfg
        spike = (c.kl_spike_factor > 0 and self.kl_mean is not None and self.kl_mean > 0
                 and self.kl_count >= c.kl_warmup_steps and kl > c.kl_spike_factor * self.kl_mean)
        if spike and "kl_spike" not in self.pending:
            self.pending.append("kl_spike")
        self.kl_mean = kl if self.kl_mean is None else c.kl_ema * self.kl_mean + (1.0 - c.kl_ema) * kl
        self.kl_count += 1
        return spike

    def observe_validation(self, step: int, metric: float) -> bool:
        """Feed a validation metric (higher is better); returns True when it is an improvement."""
        metric = float(metric)
        if not math.isfinite(metric):
            improved = False
        else:
            improved = self.best_metric is None or metric > self.best_metric + self.cfg.stall_min_delta
        if improved:
            self.best_metric = metric
            self.evals_since_improvement = 0
        else:
            self.evals_since_improvement += 1
        if (self.cfg.stall_evals > 0 and self.evals_since_improvement >= self.cfg.stall_evals
                and "val_stall" not in self.pending):
            self.pending.append("val_stall")
        return improved

    # --------------------------------------------------------------------------- decisions
    def should_reset(self, step: int) -> Optional[str]:
        """The trigger that asks for a reset at ``step`` ("kl_spike" | "val_stall" | "interval"), or None."""
        if self.history and step - self.last_reset_step < self.cfg.min_gap:
            return None
        for trig in ("kl_spike", "val_stall"):
            if trig in self.pending:
                return trig
        if self.cfg.interval > 0 and step - self.last_reset_step >= self.cfg.interval:
            return "interval"
        return None

    def record_reset(self, step: int, trigger: str) -> None:
        """The trainer replaced the reference at ``step``: restart the KL statistics (the KL to a fresh
        reference starts at 0), the stall count and the interval clock; clear pending triggers."""
        self.history.append((int(step), str(trigger)))
        self.last_reset_step = int(step)
        self.kl_mean = None
        self.kl_count = 0
        self.evals_since_improvement = 0
        self.pending = []

    # --------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> Dict:
        return {"history": [[s, t] for s, t in self.history], "last_reset_step": self.last_reset_step,
                "kl_mean": self.kl_mean, "kl_count": self.kl_count, "best_metric": self.best_metric,
                "evals_since_improvement": self.evals_since_improvement, "pending": list(self.pending)}

    def load_state_dict(self, state: Dict) -> None:
        self.history = [(int(s), str(t)) for s, t in state.get("history", [])]
        self.last_reset_step = int(state.get("last_reset_step", 0))
        self.kl_mean = state.get("kl_mean")
        self.kl_count = int(state.get("kl_count", 0))
        self.best_metric = state.get("best_metric")
        self.evals_since_improvement = int(state.get("evals_since_improvement", 0))
        self.pending = list(state.get("pending", []))
