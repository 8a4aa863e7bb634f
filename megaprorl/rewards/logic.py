"""Logic-puzzle verifier: Reasoning Gym's own scorer (``dataset.score_answer``), reward in [0, 1].

Record fields: ``task`` (a Reasoning Gym dataset name, e.g. ``"leg_counting"``) and ``entry``
(the generated entry: ``{"question", "answer", "metadata"}``) as produced by
:class:`megaprorl.data.sources.ReasoningGymSource`. ``answer``/``metadata`` at the top level of the
record are accepted when ``entry`` is absent.

The response's answer is the content of the last ``<answer>...</answer>`` (Reasoning Gym's
convention), else the last ``\\boxed{...}``; none found scores 0.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Dict, Optional, Tuple

import reasoning_gym  # heavy: this module is imported lazily, by get_verifier or a pool worker
from reasoning_gym.utils import extract_answer

from .base import register_verifier

_BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")


def extract_logic_answer(response: str) -> Optional[str]:
    a = extract_answer(response, tag_name="answer")
    if a is not None:
        return a
    boxed = _BOXED_RE.findall(response)
    if boxed:
        return boxed[-1].strip()
    return None


@functools.lru_cache(maxsize=256)
def _scorer(task: str) -> Callable[..., float]:
    try:
        return reasoning_gym.get_score_answer_fn(task)
    except ValueError as e:
        raise KeyError(f"unknown Reasoning Gym task {task!r}") from e


def verify_logic(record: Dict[str, Any], response: str) -> Tuple[float, Dict[str, Any]]:
    entry = record.get("entry")
    if entry is None:
        if "answer" not in record:
            raise KeyError("logic record has neither 'entry' nor 'answer'")
        entry = {"question": record.get("prompt", ""), "answer": record["answer"],
                 "metadata": record.get("metadata", {})}
    if not isinstance(entry, dict):
        raise TypeError("logic record 'entry' must be an object")
    entry.setdefault("metadata", {})
    task = record.get("task") or (entry.get("metadata") or {}).get("source_dataset")
    if not task:
        raise KeyError("logic record has no 'task'")
    answer = extract_logic_answer(response)
    parts: Dict[str, Any] = {"extracted": answer if answer is None or len(answer) < 200 else answer[:200] + "..."}
    if answer is None:
        parts["no_answer"] = True
        return 0.0, parts
    score = _scorer(task)(answer=answer, entry=entry)
    score = float(score or 0.0)
    return min(1.0, max(0.0, score)), parts


register_verifier("logic", verify_logic)
