"""Evaluation sets and their metrics.

A run evaluates one or more sets of prompts.  ``eval.sets`` names benchmarks (AIME, MATH-500, a code set, a
held-out Reasoning Gym task...), each read in full or as a seeded subset, with its own sample count, k of
pass@k and response budget; their metrics are ``eval/<set>/...`` and ``eval/accuracy`` is the greedy accuracy
over all their prompts (``eval/mean_pass@1``: the mean of the sets' pass@1).  Without ``eval.sets`` there is
one unnamed set (``eval.source`` or the built-in task's held-out split) whose metrics sit directly under
``eval/``, as before sets existed.

Per set, from every prompt's greedy response and, when ``samples_per_prompt`` > 1, its sampled ones:

    accuracy            greedy responses with reward >= 1, over the set's prompts
    n_prompts           prompts evaluated
    response_tokens     mean greedy response length (tokens, the end token included)
    truncated           fraction of greedy responses that hit the budget without an end token
    pass@k, mean_reward, n_problems, n_samples, by_domain/...      over the samples (algo/passk.py)
    sample_response_tokens, sample_truncated                       the same two over the samples
    reward_errors       responses (greedy and sampled) whose verifier failed (crashed, timed out): scored 0

The trainer gathers one row per prompt over the data-parallel ranks (``PromptResult``); these rows are what
``RUN/eval/step_XXXXXXXX.jsonl`` holds (``eval.write_results``) and ``megaprorl eval --per-prompt`` writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .algo.passk import summarize_eval

SOLVED = 1.0  # a response whose verifier reward reaches this is correct (summarize_eval's default threshold)


@dataclass
class EvalSet:
    name: str  # "" = the one unnamed set: its metrics sit directly under eval/
    records: List[Dict[str, Any]]
    samples_per_prompt: int
    ks: List[int]
    max_new_tokens: int

    @property
    def prefix(self) -> str:
        return f"eval/{self.name}/" if self.name else "eval/"


@dataclass
class PromptResult:
    """One prompt's evaluation: the greedy response's reward, length and end, and the sampled ones'."""

    set: str
    id: Any
    domain: str
    greedy_reward: float
    greedy_tokens: int
    greedy_finished: bool
    rewards: List[float] = field(default_factory=list)  # the sampled responses' rewards
    tokens: List[int] = field(default_factory=list)
    finished: List[bool] = field(default_factory=list)
    greedy_response: Optional[str] = None  # with eval.write_responses
    greedy_error: Optional[str] = None  # the verifier's error on the greedy response (it then scored 0)
    errors: List[str] = field(default_factory=list)  # the verifier's errors on the sampled responses

    @property
    def n_errors(self) -> int:
        return len(self.errors) + (self.greedy_error is not None)

    def to_json(self) -> Dict[str, Any]:
        d = {"set": self.set, "id": self.id, "domain": self.domain, "greedy_reward": self.greedy_reward,
             "greedy_tokens": self.greedy_tokens, "greedy_finished": self.greedy_finished}
        if self.rewards:
            d.update(rewards=self.rewards, tokens=self.tokens, finished=self.finished,
                     pass_rate=sum(1 for r in self.rewards if r >= SOLVED) / len(self.rewards))
        if self.greedy_error is not None:
            d["greedy_error"] = self.greedy_error
        if self.errors:
            d["errors"] = self.errors
        if self.greedy_response is not None:
            d["greedy_response"] = self.greedy_response
        return d


def build_eval_sets(cfg, unnamed_records) -> List[EvalSet]:
    """The run's evaluation sets from ``cfg`` (a :class:`~megaprorl.config.Config`); ``unnamed_records()``
    gives the records of the unnamed set when ``eval.sets`` is empty."""
    from .data.sources import load_eval_set

    e = cfg.eval
    budget = e.max_new_tokens or cfg.rollout.max_new_tokens
    if not e.sets:
        return [EvalSet("", unnamed_records(), e.samples_per_prompt, list(e.ks), budget)]
    return [EvalSet(s.name, load_eval_set(s, f"eval.sets[{i}]", cfg.data.builtin_min_digits,
                                          cfg.data.builtin_max_digits),
                    s.samples_per_prompt or e.samples_per_prompt, list(s.ks or e.ks), s.max_new_tokens or budget)
            for i, s in enumerate(e.sets)]


def set_metrics(es: EvalSet, rows: Sequence[PromptResult]) -> Dict[str, float]:
    """The metrics of one set from all of its prompts' rows (gathered over ranks), keys prefixed."""
    n = len(rows)
    out: Dict[str, float] = {"accuracy": _greedy_accuracy(rows),
                             "n_prompts": n,
                             "response_tokens": sum(r.greedy_tokens for r in rows) / max(1, n),
                             "truncated": sum(1.0 for r in rows if not r.greedy_finished) / max(1, n),
                             "reward_errors": sum(r.n_errors for r in rows)}
    sampled = [r for r in rows if r.rewards]
    if sampled:
        summary = summarize_eval([(r.id, r.domain, r.rewards) for r in sampled], ks=tuple(es.ks),
                                 correct_threshold=SOLVED)
        out.update(_flatten(summary))
        m = sum(len(r.tokens) for r in sampled)
        out["sample_response_tokens"] = sum(sum(r.tokens) for r in sampled) / m
        out["sample_truncated"] = sum(sum(1 for f in r.finished if not f) for r in sampled) / m
    return {es.prefix + k: v for k, v in out.items()}


def overall_metrics(sets: Sequence[EvalSet], rows: Sequence[PromptResult],
                    per_set: Dict[str, float]) -> Dict[str, float]:
    """Over the named sets (the unnamed set has its own): ``eval/accuracy`` and ``eval/n_prompts`` over every
    prompt, ``eval/mean_pass@1``, the mean over the sets of each one's pass@1 (its greedy accuracy when it
    does not sample), as papers average benchmarks, and ``eval/reward_errors`` over every response."""
    if len(sets) == 1 and not sets[0].name:
        return {}
    n = len(rows)
    means = [per_set.get(f"{es.prefix}pass@1", per_set[f"{es.prefix}accuracy"]) for es in sets]
    return {"eval/accuracy": _greedy_accuracy(rows), "eval/n_prompts": n,
            "eval/mean_pass@1": sum(means) / len(means), "eval/reward_errors": sum(r.n_errors for r in rows)}


def write_rows(path: str, rows: Sequence[PromptResult]) -> str:
    """The per-prompt rows as JSONL."""
    return write_jsonl(path, [r.to_json() for r in rows])


def write_jsonl(path: str, rows: Sequence[Dict[str, Any]]) -> str:
    """``rows`` as JSON lines."""
    return _write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def write_json(path: str, obj: Any) -> str:
    """``obj`` as indented JSON."""
    return _write_atomic(path, json.dumps(obj, indent=2, default=str))


def _write_atomic(path: str, text: str) -> str:
    """``text`` written to a temporary name and renamed, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _greedy_accuracy(rows: Sequence[PromptResult]) -> float:
    return sum(1.0 for r in rows if r.greedy_reward >= SOLVED) / max(1, len(rows))


def _flatten(d: Dict, prefix: str = "") -> Dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)):
            out[key] = v
    return out
