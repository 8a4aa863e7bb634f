"""``megaprorl bench rewards``: responses scored per second, per domain, through the RewardPool.

Builds synthetic but realistic workloads (half correct, half wrong answers; code responses with
several stdin/stdout tests each, run in the sandbox), scores them with ``RewardPool`` and prints a
table; ``--output`` writes the numbers as JSON. A timing never decides anything in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

DOMAINS = ("math", "code", "stem", "logic", "ifeval")


def _math(n: int) -> Tuple[List[dict], List[str]]:
    golds = [("\\frac{3}{4}", "0.75"), ("2\\sqrt{2}", "\\sqrt{8}"), ("[0, 1)", "[0,1)"), ("x^2+2x+1", "(x+1)^2"),
             ("\\{1, 2, 3\\}", "\\{3,2,1\\}"), ("42", "42.0"), ("\\pi/2", "\\frac{\\pi}{2}"), ("-7", "-7")]
    recs, resps = [], []
    for i in range(n):
        g, eq = golds[i % len(golds)]
        recs.append({"domain": "math", "id": f"m{i}", "answer": g})
        body = "Let me think step by step. " * 20
        ans = eq if i % 2 == 0 else "13"
        resps.append(f"{body}\nTherefore the final answer is $\\boxed{{{ans}}}$.")
    return recs, resps


def _code(n: int, tests_per: int = 5) -> Tuple[List[dict], List[str]]:
    recs, resps = [], []
    tests = [{"input": f"{a} {a + 3}\n", "output": f"{2 * a + 3}\n"} for a in range(tests_per)]
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    bad = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"
    for i in range(n):
        recs.append({"domain": "code", "id": f"c{i}", "tests": tests})
        resps.append("Here is my solution.\n" + (good if i % 2 == 0 else bad))
    return recs, resps


def _stem(n: int) -> Tuple[List[dict], List[str]]:
    recs, resps = [], []
    for i in range(n):
        recs.append({"domain": "stem", "id": f"s{i}", "answer": "B", "choices": ["w", "x", "y", "z"]})
        letter = "B" if i % 2 == 0 else "D"
        resps.append("Option A is unlikely because ... Option C fails since ... " * 10 +
                     f"\nThe answer is ({letter}).")
    return recs, resps


def _logic(n: int) -> Tuple[List[dict], List[str]]:
    from megaprorl.data.sources import ReasoningGymSource

    tasks = ["leg_counting", "basic_arithmetic", "word_sorting", "letter_counting"]
    recs, resps = [], []
    srcs = [ReasoningGymSource(t, size=max(1, n // len(tasks) + 1), seed=1) for t in tasks]
    i = 0
    while len(recs) < n:
        src = srcs[i % len(srcs)]
        rec = src.record((i // len(srcs)) % src.size)
        recs.append(rec)
        ans = rec["entry"]["answer"] if i % 2 == 0 else "nonsense"
        resps.append("Reasoning... " * 20 + f"<answer>{ans}</answer>")
        i += 1
    return recs, resps


def _ifeval(n: int) -> Tuple[List[dict], List[str]]:
    recs, resps = [], []
    rec = {"domain": "ifeval", "prompt": "Write about cats.",
           "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words",
                                   "detectable_format:title", "keywords:existence", "change_case:english_lowercase"],
           "kwargs": [{}, {"num_words": 50, "relation": "at least"}, {}, {"keywords": ["cat"]}, {}]}
    good = "<<ode to the cat>>\n" + "the cat sleeps in the sun and dreams of fish all day long. " * 6
    bad = "Cats, Cats, Cats. They are great."
    for i in range(n):
        recs.append(dict(rec, id=f"i{i}"))
        resps.append(good if i % 2 == 0 else bad)
    return recs, resps


BUILDERS = {"math": _math, "code": _code, "stem": _stem, "logic": _logic, "ifeval": _ifeval}


def bench_domain(domain: str, n: int, workers: int, repeats: int = 1) -> Dict[str, Any]:
    from megaprorl.rewards import RewardConfig, RewardPool

    recs, resps = BUILDERS[domain](n)
    cfg = RewardConfig(num_workers=workers)
    with RewardPool(cfg) as pool:
        pool.score(recs[: min(len(recs), max(2, workers * 2))], resps[: min(len(recs), max(2, workers * 2))])  # warm-up
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = pool.score(recs, resps)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        stats = pool.stats()
    mean = sum(r.reward for r in res) / max(1, len(res))
    errors = sum(r.error is not None for r in res)
    return {"domain": domain, "n": len(recs), "workers": workers, "seconds": round(best, 4),
            "responses_per_s": round(len(recs) / best, 2), "mean_reward": round(mean, 4), "errors": errors,
            "pool_stats": stats}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "rewards":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="megaprorl bench rewards", description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset of " + ",".join(DOMAINS))
    p.add_argument("--n", type=int, default=400, help="responses per domain (code: n/4)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--output", default="bench_rewards.json", help="JSON file to write ('' = none)")
    args = p.parse_args(argv)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    bad = [d for d in domains if d not in BUILDERS]
    if bad:
        p.error(f"unknown domain(s) {bad}; choose from {list(BUILDERS)}")
    rows = []
    for d in domains:
        n = max(4, args.n // 4) if d == "code" else args.n
        rows.append(bench_domain(d, n, args.workers, args.repeats))
        r = rows[-1]
    print(f"{'domain':<8}{'n':>6}{'workers':>9}{'seconds':>10}{'resp/s':>10}{'mean reward':>13}{'errors':>8}")
    for r in rows:
        print(f"{r['domain']:<8}{r['n']:>6}{r['workers']:>9}{r['seconds']:>10.3f}{r['responses_per_s']:>10.1f}"
              f"{r['mean_reward']:>13.3f}{r['errors']:>8}")
    if args.output:
        meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(args.output, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
