"""The built-in procedural task: multi-digit addition, verifiable, learnable by a tiny model on CPU.

A prompt is ``"a+b="`` and the correct response is the decimal sum followed by end-of-sequence.
Operands are drawn uniformly with ``min_digits..max_digits`` digits.  Training prompts and the
held-out evaluation split come from disjoint seeded streams, and the evaluation split additionally
excludes every (a, b) pair the training stream can produce in its first ``size`` draws.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional

DOMAIN = "addition"


def make_problem(rng: random.Random, min_digits: int, max_digits: int) -> Dict:
    da = rng.randint(min_digits, max_digits)
    db = rng.randint(min_digits, max_digits)
    a = rng.randint(10 ** (da - 1) if da > 1 else 0, 10 ** da - 1)
    b = rng.randint(10 ** (db - 1) if db > 1 else 0, 10 ** db - 1)
    return {"domain": DOMAIN, "prompt": f"{a}+{b}=", "answer": str(a + b), "id": f"{a}+{b}"}


def verify(record: Dict, response: str) -> float:
    """1.0 when the response is exactly the sum (surrounding spaces ignored), else 0.0."""
    return 1.0 if response.strip() == str(record["answer"]) else 0.0


class AdditionSource:
    """Endless seeded stream of addition prompts; resumable (state = seed and draws so far)."""

    def __init__(self, seed: int = 0, min_digits: int = 1, max_digits: int = 2, exclude: Optional[set] = None):
        self.seed, self.min_digits, self.max_digits = seed, min_digits, max_digits
        self.exclude = exclude or set()
        self._rng = random.Random(seed)
        self.draws = 0

    def sample(self, n: int) -> List[Dict]:
        out = []
        while len(out) < n:
            p = make_problem(self._rng, self.min_digits, self.max_digits)
            self.draws += 1
            if p["id"] in self.exclude:
                continue
            out.append(p)
        return out

    def state_dict(self) -> Dict:
        return {"seed": self.seed, "draws": self.draws, "rng": self._rng.getstate()}

    def load_state_dict(self, state: Dict) -> None:
        self.seed, self.draws = state["seed"], state["draws"]
        self._rng.setstate(_as_rng_state(state["rng"]))


def _as_rng_state(s):
    # JSON/YAML round trips turn the tuple state into lists
    return (s[0], tuple(s[1]), s[2]) if isinstance(s, (list, tuple)) else s


def eval_split(n: int, seed: int, min_digits: int, max_digits: int, train_seed: int, train_size: int = 0) -> List[Dict]:
    """``n`` distinct held-out problems.  Pairs seen in the first ``train_size`` training draws are excluded."""
    seen = set()
    if train_size:
        rng = random.Random(train_seed)
        seen = {make_problem(rng, min_digits, max_digits)["id"] for _ in range(train_size)}
    rng = random.Random(10_000_019 + seed)
    out, ids = [], set()
    tries = 0
    while len(out) < n:
        p = make_problem(rng, min_digits, max_digits)
        tries += 1
        if tries > 100 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct held-out addition problems with {min_digits}-{max_digits} digits")
        if p["id"] in ids or p["id"] in seen:
            continue
        ids.add(p["id"])
        out.append(p)
    return out


def sft_examples(n: int, seed: int, min_digits: int, max_digits: int) -> List[Dict]:
    rng = random.Random(seed)
    return [make_problem(rng, min_digits, max_digits) for _ in range(n)]


@dataclass
class _Registered:
    done: bool = False


_REG = _Registered()


def register() -> None:
    """Register the addition verifier with the reward registry and the 'builtin' source type."""
    if _REG.done:
        return
    from ..rewards import register_verifier

    register_verifier(DOMAIN, verify)
    try:
        from .sources import register_source_type
    except ImportError:  # data sources not available: the trainer builds AdditionSource itself
        pass
    else:
        register_source_type("builtin", lambda c: AdditionSource(seed=c.seed, **_digit_kwargs(c)))
    _REG.done = True


def _digit_kwargs(c) -> Dict:
    kw = dict(getattr(c, "kwargs", {}) or {})
    return {"min_digits": int(kw.get("min_digits", 1)), "max_digits": int(kw.get("max_digits", 2))}


# Registered at import, so reward worker processes that re-import this module know the verifier.
register()
