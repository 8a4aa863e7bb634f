"""``megaprorl score``: score a JSONL file of responses offline.

Input: one JSON object per line: a prompt record of any domain (``domain`` and its verifier
fields, see docs/data.md) plus ``response`` (the model's text). Output: the same objects with
``reward`` (float), ``reward_parts`` (the verifier's details) and ``reward_error`` (null or the
message) added, in input order. A line that is not a JSON object or has no ``response`` or ``domain``
stops the run before anything is scored, with an error naming the file and line. A summary (mean reward
and error count per domain) is printed at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import time
from typing import List, Optional

from .base import THINK_MODES, RewardConfig
from .pool import RewardPool


def _parser() -> argparse.ArgumentParser:
    d = RewardConfig()
    p = argparse.ArgumentParser(prog="megaprorl score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", "-i", required=True, help="responses JSONL (records + 'response')")
    p.add_argument("--output", "-o", required=True, help="scored JSONL to write ('-' = stdout)")
    p.add_argument("--workers", type=int, default=d.num_workers, help="worker processes (0 = inline)")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="per-sample limit in seconds")
    p.add_argument("--code-timeout", type=float, default=d.code_timeout_s, help="code: total seconds per response")
    p.add_argument("--code-memory-mb", type=int, default=d.code_memory_mb)
    p.add_argument("--sandbox", default=d.sandbox, choices=["auto", "unshare", "bwrap", "none"])
    p.add_argument("--allow-unsandboxed", action="store_true",
                   help="run model code without isolation if no sandbox works (unsafe)")
    p.add_argument("--seccomp", default=d.sandbox_seccomp, choices=["auto", "require", "off"],
                   help="seccomp filter of sandboxed code (auto: when libseccomp + pyseccomp are installed)")
    p.add_argument("--ifeval-mode", default=d.ifeval_mode, choices=["strict", "loose"])
    p.add_argument("--think-mode", default=d.think_mode, choices=list(THINK_MODES),
                   help="score the text after --think-end (auto: when present; require: else reward 0; off: all)")
    p.add_argument("--think-end", default=d.think_end, help="the marker that ends a reasoning model's thought")
    p.add_argument("--verifier-module", action="append", default=[],
                   help="module to import that registers extra verifiers (repeatable)")
    p.add_argument("--batch", type=int, default=256, help="records submitted to the pool at a time")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "score":
        argv = argv[1:]
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for m in args.verifier_module:
        __import__(m)
    cfg = RewardConfig(num_workers=args.workers, timeout_s=args.timeout, code_timeout_s=args.code_timeout,
                       code_memory_mb=args.code_memory_mb, sandbox=args.sandbox,
                       allow_unsandboxed=args.allow_unsandboxed, ifeval_mode=args.ifeval_mode,
                       sandbox_seccomp=args.seccomp, extra_verifier_modules=list(args.verifier_module),
                       think_mode=args.think_mode, think_end=args.think_end)
    rows = []
    try:
        with open(args.input, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{args.input}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    print(f"error: {where}: invalid JSON: {e.msg} (column {e.colno})", file=sys.stderr)
                    return 2
                if not isinstance(rec, dict):
                    print(f"error: {where}: a line must be a JSON object", file=sys.stderr)
                    return 2
                if not isinstance(rec.get("response"), str):
                    print(f"error: {where}: no 'response' string", file=sys.stderr)
                    return 2
                if not rec.get("domain"):  # (a record nested under another key: every sample would score 0)
                    print(f"error: {where}: no 'domain' (the record's fields and 'response' side by side, one "
                          "object per line)", file=sys.stderr)
                    return 2
                rows.append(rec)
    except OSError as e:
        print(f"error: cannot read {args.input}: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    summary = collections.defaultdict(lambda: [0, 0.0, 0])  # n, reward sum, errors
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        with RewardPool(cfg) as pool:
            futures = []
            for s in range(0, len(rows), args.batch):
                chunk = rows[s:s + args.batch]
                records = [{k: v for k, v in r.items() if k != "response"} for r in chunk]
                futures.append((chunk, pool.submit(records, [r["response"] for r in chunk])))
            for chunk, fut in futures:
                for rec, res in zip(chunk, fut.result()):
                    rec = dict(rec, reward=res.reward, reward_parts=res.parts, reward_error=res.error)
                    out.write(json.dumps(rec, default=repr) + "\n")
                    st = summary[str(rec.get("domain"))]
                    st[0] += 1
                    st[1] += res.reward
                    st[2] += res.error is not None
            stats = pool.stats()
    finally:
        if out is not sys.stdout:
            out.close()
    dt = time.monotonic() - t0
    print(f"scored {len(rows)} responses in {dt:.1f} s -> {args.output}", file=sys.stderr)
    print(f"{'domain':<12}{'n':>8}{'mean reward':>14}{'errors':>8}", file=sys.stderr)
    for dom, (n, tot, err) in sorted(summary.items()):
        print(f"{dom:<12}{n:>8}{tot / max(n, 1):>14.4f}{err:>8}", file=sys.stderr)
    print(f"pool: {stats}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
