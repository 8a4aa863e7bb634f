"""``megaprorl status RUN_DIR``: where a run stands, read from its directory alone (no process to ask).

For the long runs this trainer is for, checked on from a login node: how far it got and how fast it goes,
its newest complete checkpoint, its evaluations and reference resets, the training signals now against the
run's first steps, the errors it counted, and a few warnings about the ways a prolonged RL run goes wrong
(its entropy collapsing, its prompts solved or failed by every sample, its responses cut at the budget).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

from . import checkpoint as ckpt
from .runlog import read_metrics

WINDOW = 10  # steps at each end of the run compared
SIGNALS = ("reward", "accuracy", "entropy", "kl_ref", "response_length", "truncated_frac",
           "dynamic_sampling/discarded_frac", "clip_frac_low", "clip_frac_high", "grad_norm")
TREND_SIGNALS = ("entropy", "dynamic_sampling/discarded_frac", "truncated_frac")
# the warnings: the last WINDOW steps' mean against a bound (or against the first WINDOW steps' mean)
ENTROPY_FALL = 0.2  # entropy below this share of its start
NO_SIGNAL = 0.8  # share of groups whose samples all got the same reward
TRUNCATED = 0.2  # share of responses cut at rollout.max_new_tokens
REWARD_ERRORS = 0.01  # share of scored samples
RUNNING_S = 900  # a run without summary.json whose last row is younger than this (or 5 step times) is running


def _mean(rows: List[Dict], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def status(run_dir: str, now: Optional[float] = None) -> Dict:
    """The run's state as a dict (what ``megaprorl status --json`` prints)."""
    rows = read_metrics(run_dir)
    steps = [r for r in rows if not r.get("final_eval") and "reward" in r]
    now = time.time() if now is None else now
    out: Dict = {"run_dir": run_dir, "step": steps[-1]["step"] if steps else 0, "total_steps": _total_steps(run_dir)}
    step_times = [r["time/step_s"] for r in steps[-2 * WINDOW:] if isinstance(r.get("time/step_s"), (int, float))]
    out["step_s"] = statistics.median(step_times) if step_times else None
    age = now - os.path.getmtime(os.path.join(run_dir, "metrics.jsonl"))
    out["last_row_age_s"] = age
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        out["state"] = "finished"
    elif age < max(RUNNING_S, 5 * (out["step_s"] or 0)):
        out["state"] = "running"
    else:
        out["state"] = "stopped"  # preempted and waiting for its requeue, killed, or failed
    if out["total_steps"] and out["step_s"] and out["state"] == "running":
        out["eta_s"] = max(out["total_steps"] - out["step"], 0) * out["step_s"]
    logs = glob.glob(os.path.join(run_dir, "slurm", "*.out"))  # megaprorl launch slurm: one log per job id
    out["slurm_log"] = max(logs, key=os.path.getmtime) if logs else None
    complete = ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints"), verbose=False)
    out["checkpoints"] = [s for s, _ in complete]
    out["evaluations"] = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    out["resets"] = [(r["step"], r.get("reference_reset_trigger", "")) for r in steps if r.get("reference_reset")]
    first, last = steps[:WINDOW], steps[-WINDOW:]
    out["signals"] = {k: (_mean(first, k), _mean(last, k)) for k in SIGNALS if _mean(steps, k) is not None}
    samples = sum(v for r in steps for k, v in r.items() if k.startswith("samples/") and isinstance(v, (int, float)))
    out["reward_errors"] = int(sum(r.get("reward_errors", 0) for r in steps))
    out["samples"] = int(samples)
    out["skipped_updates"] = int(sum(r.get("skipped_updates", 0) for r in steps))
    out["write_errors"] = int(max((r.get("log/write_errors", 0) for r in rows), default=0))
    out["save_errors"] = int(max((r.get("checkpoint/save_errors", 0) for r in rows), default=0))
    out["warnings"] = _warnings(out, len(steps))
    return out


def trends(signals: Dict[str, tuple]) -> Dict[str, str]:
    """The trend warnings, by kind, from ``{signal: (mean of the first WINDOW steps, of the last WINDOW)}``."""
    out: Dict[str, str] = {}
    first, last = signals.get("entropy", (None, None))
    if first and last is not None and last < ENTROPY_FALL * first:
        out["entropy"] = (f"entropy collapsing: {last:.3g} over the last {WINDOW} steps, {last / first:.0%} of the "
                          f"first {WINDOW} steps' {first:.3g} (raise algo.loss.eps_high, set "
                          "algo.entropy_control.target, reset the reference)")
    last = signals.get("dynamic_sampling/discarded_frac", (None, None))[1]
    if last is not None and last > NO_SIGNAL:
        out["no_signal"] = (f"{last:.0%} of the groups had no signal over the last {WINDOW} steps (every sample "
                            "solved or every one failed): retire solved prompts (data.retire_solved_after), harder "
                            "data, or more samples (rollout.n_samples)")
    last = signals.get("truncated_frac", (None, None))[1]
    if last is not None and last > TRUNCATED:
        out["truncated"] = (f"{last:.0%} of the responses were cut at rollout.max_new_tokens over the last {WINDOW} "
                            "steps: a longer budget, or the length penalty (algo.length_penalty / "
                            "algo.overlong_penalty)")
    return out


def _warnings(st: Dict, n_steps: int) -> List[str]:
    out = list(trends(st["signals"]).values()) if n_steps >= 2 * WINDOW else []  # (too few steps for a trend)
    if st["samples"] and st["reward_errors"] > REWARD_ERRORS * st["samples"]:
        out.append(f"{st['reward_errors']} reward errors in {st['samples']} scored samples: see the verifiers' "
                   "errors (logging.rollouts writes samples with their rewards)")
    if st["save_errors"]:
        out.append(f"{st['save_errors']} checkpoint(s) could not be written (checkpoint/save_errors): its disk? the "
                   "newest complete one is above")
    if st["write_errors"]:
        out.append(f"{st['write_errors']} failed writes to the run directory (log/write_errors): its disk?")
    return out


class HealthWatch:
    """The trend warnings of :func:`trends` as a run goes (the trainer's log): each is said when it starts and
    again only after it has cleared.  The first WINDOW steps' means are its state (kept in checkpoints)."""

    def __init__(self):
        self.first: List[Dict] = []
        self.last: List[Dict] = []
        self.active: set = set()

    def observe(self, stats: Dict) -> List[str]:
        row = {k: stats[k] for k in TREND_SIGNALS if isinstance(stats.get(k), (int, float))}
        (self.first if len(self.first) < WINDOW else self.last).append(row)
        self.last = self.last[-WINDOW:]
        if len(self.last) < WINDOW:
            return []
        now = trends({k: (_mean(self.first, k), _mean(self.last, k)) for k in TREND_SIGNALS})
        new = [msg for kind, msg in now.items() if kind not in self.active]
        self.active = set(now)
        return new

    def state_dict(self) -> Dict:
        return {"first": self.first, "last": self.last, "active": sorted(self.active)}

    def load_state_dict(self, state: Dict) -> None:
        self.first, self.last = list(state.get("first", [])), list(state.get("last", []))
        self.active = set(state.get("active", []))


def _total_steps(run_dir: str) -> Optional[int]:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    steps = (cfg.get("train") or {}).get("steps")
    return int(steps) if isinstance(steps, int) else None


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def render(st: Dict) -> str:
    total = st["total_steps"]
    lines = [f"run          {st['run_dir']}: {st['state']} (last row {_duration(st['last_row_age_s'])} ago)"]
    pace = f", {st['step_s']:.3g} s a step (median of the last {2 * WINDOW})" if st["step_s"] else ""
    eta = f", about {_duration(st['eta_s'])} to go" if st.get("eta_s") is not None else ""
    lines.append(f"step         {st['step']}" + (f" / {total} ({st['step'] / total:.0%})" if total else "") + pace + eta)
    if st["slurm_log"]:
        lines.append(f"slurm        newest job log {st['slurm_log']}")
    cks = st["checkpoints"]
    lines.append("checkpoint   " + (f"step {cks[-1]} (newest complete; {len(cks)} kept)" if cks else "none complete"))
    if st["evaluations"]:
        best = max(st["evaluations"], key=lambda e: e[1])
        shown = st["evaluations"] if len(st["evaluations"]) <= 8 else st["evaluations"][:2] + st["evaluations"][-5:]
        lines.append("evaluations  " + ", ".join(f"step {s}: {a:.3f}" for s, a in shown)
                     + f"  (eval/accuracy; best {best[1]:.3f} at step {best[0]})")
    if st["resets"]:
        lines.append("resets       " + ", ".join(f"step {s} ({t})" for s, t in st["resets"]))
    if st["signals"]:
        lines.append(f"{'signals':<31}{'first ' + str(WINDOW):>12}{'last ' + str(WINDOW):>12}")
        for k, (a, b) in st["signals"].items():
            lines.append(f"  {k:<29}{_num(a):>12}{_num(b):>12}")
    lines.append(f"errors       {st['reward_errors']} reward errors in {st['samples']} samples, "
                 f"{st['skipped_updates']} updates skipped (non-finite), {st['save_errors']} failed checkpoints, "
                 f"{st['write_errors']} failed writes")
    for w in st["warnings"]:
        lines.append(f"warning      {w}")
    return "\n".join(lines)


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4g}"


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="megaprorl status", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="the same as one JSON object")
    args = p.parse_args(argv)
    try:
        st = status(args.run_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(st, indent=2) if args.json else render(st))
    return 0
