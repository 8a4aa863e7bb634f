"""Math verifier: final-answer extraction and equivalence with math-verify (binary reward).

Record fields: ``answer`` (the reference: a number, LaTeX expression, interval, set, ... with or
without ``$``/``\\boxed{}``).  The response's answer is the last ``\\boxed{...}`` or a final-answer
phrase ("the final answer is ...", the last such phrase), else math-verify's own search of the response.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Dict, Tuple

import math_verify  # heavy (sympy): this module is imported lazily, by get_verifier or a pool worker

from .base import RewardConfig, register_verifier

_FINAL_RE = re.compile(r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:)", re.IGNORECASE)


def _mv():
    return math_verify


def _timeout(cfg: RewardConfig):
    # math-verify's timeout uses SIGALRM, which only works in the main thread.
    if threading.current_thread() is not threading.main_thread():
        return None
    t = int(max(1, round(cfg.math_timeout_s))) if cfg.math_timeout_s and cfg.math_timeout_s > 0 else None
    return t


def parse_gold(answer: Any, cfg: RewardConfig):
    mv = _mv()
    s = str(answer).strip()
    if not s:
        raise ValueError("math record has an empty 'answer'")
    t = _timeout(cfg) or 0
    cfgs = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    text = s if ("$" in s or "\\boxed" in s or "\\(" in s or "\\[" in s) else f"${s}$"
    gold = mv.parse(text, extraction_config=cfgs, parsing_timeout=t)
    if not gold:
        gold = mv.parse(s, extraction_config=cfgs, parsing_timeout=t)
    if not gold:
        raise ValueError(f"cannot parse the reference answer {s!r}")
    return gold


def last_boxed(text: str):
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or None."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0 or text[i:j].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:k]
    return None


def parse_response(response: str, cfg: RewardConfig):
    mv = _mv()
    boxed = last_boxed(response)
    if boxed is not None:
        # only the last boxed answer counts (math-verify would otherwise merge all boxes into a set)
        response = "$\\boxed{" + boxed + "}$"
    t = _timeout(cfg) or 0
    cfgs = [
        mv.LatexExtractionConfig(boxed_match_priority=0),
        mv.ExprExtractionConfig(),
    ]
    if boxed is None:
        # no box: the answer after the last final-answer phrase ("Answer: 7 ... no, the answer is 8" is 8, where
        # math-verify alone takes its first such phrase), else math-verify's own search of the whole response
        phrases = list(_FINAL_RE.finditer(response))
        if phrases:
            got = mv.parse(response[phrases[-1].start():], extraction_config=cfgs, parsing_timeout=t)
            if got:
                return got
    return mv.parse(response, extraction_config=cfgs, parsing_timeout=t)


def verify_math(record: Dict[str, Any], response: str, cfg: RewardConfig) -> Tuple[float, Dict[str, Any]]:
    if "answer" not in record:
        raise KeyError("math record has no 'answer'")
    mv = _mv()
    gold = parse_gold(record["answer"], cfg)
    pred = parse_response(response, cfg)
    parts: Dict[str, Any] = {"extracted": str(pred[-1]) if pred else None}
    if not pred:
        parts["no_answer"] = True
        return 0.0, parts
    ok = mv.verify(gold, pred, timeout_seconds=_timeout(cfg))
    return (1.0 if ok else 0.0), parts


register_verifier("math", verify_math)
