"""Adaptive entropy control: an entropy bonus whose coefficient steers the policy's entropy toward a target.

The rule Skywork-OR1's report describes (He et al. 2025, "adaptive entropy control"), with ``H*`` the target
entropy, ``delta`` the step and ``H_k`` the mean token entropy of RL step ``k``'s batch under the policy being
trained:

    alpha_{k+1} = alpha_k + delta   if H_k < H*
                  alpha_k - delta   if H_k > H*        (then clipped to [0, max_coef]; max_coef 0: no cap)
    c_{k+1}     = alpha_{k+1}       if H_k <= H*, else 0

``c`` is the coefficient of the entropy bonus in the loss (``loss_t = ... - c * H_t``, algo/loss.py).  The
bonus is on only while the entropy is at or below the target, and grows for as long as it stays there; above
the target it is off and ``alpha`` decays, so a policy that recovers does not keep a large bonus.  ``alpha_0``
is ``init_coef``; before the first observation ``c = alpha_0``.

One step of lag: ``H_k`` is measured while step ``k`` trains (its updates report it), so it sets the
coefficient of step ``k + 1``.  The trainer passes the entropy of the whole batch (the token-weighted mean over
the data-parallel ranks), so every rank uses the same coefficient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional


@dataclass
class EntropyControlConfig:
    target: float = 0.0  # target mean token entropy H* (nats); 0: off (algo.loss.entropy_coef stays fixed)
    delta: float = 0.005  # the coefficient's step per RL step
    init_coef: float = 0.0  # alpha_0
    max_coef: float = 0.0  # the largest coefficient; 0: no cap


class EntropyController:
    def __init__(self, cfg: EntropyControlConfig):
        if cfg.target < 0 or cfg.delta < 0 or cfg.init_coef < 0 or cfg.max_coef < 0:
            raise ValueError("algo.entropy_control: target, delta, init_coef and max_coef must be >= 0")
        if cfg.target > 0 and cfg.delta == 0:
            raise ValueError("algo.entropy_control.delta must be > 0 when a target is set")
        if cfg.max_coef and cfg.init_coef > cfg.max_coef:
            raise ValueError("algo.entropy_control.init_coef must be <= max_coef")
        self.cfg = cfg
        self.alpha = float(cfg.init_coef)
        self.last_entropy: Optional[float] = None

    @property
    def enabled(self) -> bool:
        return self.cfg.target > 0

    def coef(self) -> float:
        """The entropy-bonus coefficient of the next step."""
        if not self.enabled:
            return 0.0
        if self.last_entropy is not None and self.last_entropy > self.cfg.target:
            return 0.0
        return self.alpha

    def observe(self, entropy: float) -> None:
        """Feed the mean token entropy of the step just trained; a non-finite value is ignored."""
        e = float(entropy)
        if not self.enabled or not math.isfinite(e):
            return
        if e < self.cfg.target:
            self.alpha += self.cfg.delta
        elif e > self.cfg.target:
            self.alpha -= self.cfg.delta
        self.alpha = max(0.0, self.alpha)
        if self.cfg.max_coef:
            self.alpha = min(self.cfg.max_coef, self.alpha)
        self.last_entropy = e

    def state_dict(self) -> Dict:
        return {"alpha": self.alpha, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: Dict) -> None:
        self.alpha = float(state.get("alpha", self.cfg.init_coef))
        last = state.get("last_entropy")
        self.last_entropy = None if last is None else float(last)
