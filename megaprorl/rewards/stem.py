"""STEM multiple-choice verifier (binary).

Record fields: ``answer`` (the correct label, e.g. ``"C"``, or its 0-based index), optional
``choices`` (list of option texts, labelled A, B, C, ... in order, or a dict label -> text).

Extraction, strongest signal first, each taking the *last* occurrence in the response:
``\\boxed{C}``, ``<answer>C</answer>``, a final-answer phrase ("the answer is (C)", "Answer: C",
"correct option is C"), and finally a last line that is just a label ("(C)", "C."). An extracted
answer that names more than one label ("A or C", "\\boxed{AC}") scores 0, so hedging never pays.
If ``choices`` are given, a final answer that repeats an option's text exactly is accepted too.
"""

from __future__ import annotations

import re
import string
from typing import Any, Dict, List, Optional, Tuple

from .base import register_verifier

_BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_TAG_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)
_PHRASE_RE = re.compile(
    r"(?:final\s+answer|correct\s+answer|correct\s+option|correct\s+choice|the\s+answer|answer)"
    r"\s*(?:is|would\s+be|should\s+be|:|=)?\s*(?:[:\-])?\s*(?:option|choice)?\s*"
    r"(\*\*|\\textbf\{|\\text\{)?\s*[\(\[]?\s*([A-Z])\s*[\)\]]?(?![A-Za-z])((?:\s*(?:,|or|and|/|&)\s*[\(\[]?[A-Z][\)\]]?(?![A-Za-z]))*)",
    re.IGNORECASE,
)
_LINE_RE = re.compile(r"^\s*(?:\*\*)?\s*[\(\[]?\s*([A-Z])\s*[\)\]]?\s*[\.:]?\s*(?:\*\*)?\s*$")


def _labels(record: Dict[str, Any]) -> List[str]:
    ch = record.get("choices")
    if isinstance(ch, dict) and ch:
        return [str(k).strip().upper() for k in ch]
    if isinstance(ch, (list, tuple)) and ch:
        return list(string.ascii_uppercase[: len(ch)])
    return list("ABCDEFGHIJ")


def _gold_label(record: Dict[str, Any], labels: List[str]) -> str:
    if "answer" not in record:
        raise KeyError("stem record has no 'answer'")
    a = record["answer"]
    if isinstance(a, bool):
        raise ValueError(f"stem 'answer' must be a label or index, got {a!r}")
    if isinstance(a, int):
        if not 0 <= a < len(labels):
            raise ValueError(f"stem 'answer' index {a} out of range for {len(labels)} choices")
        return labels[a]
    s = str(a).strip().strip("()[].").upper()
    if s not in labels:
        raise ValueError(f"stem 'answer' {a!r} is not one of the labels {labels}")
    return s


def _labels_in(text: str, labels: List[str]) -> List[str]:
    """Distinct labels named in a short extracted answer (e.g. 'B', '(B)', 'A or C', 'AC')."""
    t = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", text)
    t = t.replace("$", "").replace("*", "").strip()
    t = re.sub(r"^(?:option|choice|answer)\s*[:\-]?\s*", "", t, flags=re.IGNORECASE)
    m = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[\.:]?(?:\s+.*)?", t, flags=re.DOTALL)
    found: List[str] = []
    if m and len(t) <= 3:
        found = [m.group(1).upper()]
    else:
        # every standalone capital label (or a run like 'AC')
        for tok in re.findall(r"(?<![A-Za-z])([A-Z]{1,10})(?![A-Za-z])", t):
            if all(c in labels for c in tok):
                found.extend(tok)
        if not found and m:
            found = [m.group(1).upper()]
    out: List[str] = []
    for f in found:
        if f not in out:
            out.append(f)
    return out


def _text_match(candidate: str, record: Dict[str, Any], labels: List[str]) -> Optional[str]:
    ch = record.get("choices")
    if not ch:
        return None
    items = list(ch.items()) if isinstance(ch, dict) else list(zip(labels, ch))
    c = re.sub(r"\s+", " ", candidate).strip().strip(".").lower()
    hits = [str(k).upper() for k, v in items if re.sub(r"\s+", " ", str(v)).strip().strip(".").lower() == c]
    return hits[0] if len(hits) == 1 else None


def extract_choice(response: str, record: Dict[str, Any]) -> Tuple[Optional[List[str]], str]:
    """Returns (labels named by the final answer, how it was found) or (None, 'none')."""
    labels = _labels(record)
    boxed = _BOXED_RE.findall(response)
    if boxed:
        c = boxed[-1]
        got = _labels_in(c, labels) or ([_text_match(c, record, labels)] if _text_match(c, record, labels) else [])
        return (got or None), "boxed"
    tags = _TAG_RE.findall(response)
    if tags:
        c = tags[-1]
        got = _labels_in(c, labels) or ([_text_match(c, record, labels)] if _text_match(c, record, labels) else [])
        return (got or None), "tag"
    last = None
    for m in _PHRASE_RE.finditer(response):
        letter = m.group(2)
        if not letter.isupper() and not m.group(1):
            # lower-case letter after a phrase ("the answer is a ...") is an article, not a label
            continue
        last = m
    if last is not None:
        got = [last.group(2).upper()]
        rest = last.group(3) or ""
        for tok in re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", rest):
            if tok not in got:
                got.append(tok)
        return got, "phrase"
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    if lines:
        m = _LINE_RE.match(lines[-1])
        if m:
            return [m.group(1).upper()], "last_line"
    return None, "none"


def verify_stem(record: Dict[str, Any], response: str) -> Tuple[float, Dict[str, Any]]:
    labels = _labels(record)
    gold = _gold_label(record, labels)
    got, how = extract_choice(response, record)
    parts: Dict[str, Any] = {"extracted": got, "method": how}
    if not got:
        return 0.0, parts
    if len(got) != 1:
        parts["ambiguous"] = True
        return 0.0, parts
    return (1.0 if got[0] == gold else 0.0), parts


register_verifier("stem", verify_stem)
