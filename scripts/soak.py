"""A long CPU run that watches what the trainer holds on its host, and a report of any run's host metrics.

    python scripts/soak.py run [--steps 400] [--out /tmp/soak]    # the run, then its report
    python scripts/soak.py report RUN_DIR [--skip 0.1]              # the report of a run's metrics.jsonl

The run is the demo's model on a three-domain mixture (the built-in addition, Reasoning Gym's
basic_arithmetic, and addition scored through the code sandbox: scripts/soak_verifiers.py runs a program
in it for every sample), with two reward workers recycled every 300 samples, an evaluation every 10
steps, a checkpoint every 20 (two kept), a reference reset every 25 and rollouts logged: every path a
long run takes over and over.  The report fits a line to each host metric (megaprorl/host.py) over the
steps after the first ``--skip`` fraction, and compares the medians and peaks of the first and the last
quarter of them: a leak raises the last quarter's.
"""
import argparse
import json
import os
import random
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = ("memory/host_rss_gib", "memory/reward_workers_rss_gib", "host/open_fds", "host/threads",
        "host/descendants")

CONFIG = """\
name: soak
output_dir: {out}/runs
seed: 7
model: {{num_layers: 2, hidden_size: 128, ffn_hidden_size: 512, num_attention_heads: 4, num_query_groups: 2,
        max_position_embeddings: 256, rotary_base: 10000, make_vocab_divisible_by: 8, tokenizer: builtin-ascii}}
data:
  builtin_min_digits: 1
  builtin_max_digits: 2
  sources:
    - {{name: addition, type: builtin, weight: 2, kwargs: {{min_digits: 1, max_digits: 2}}}}
    - {{name: arithmetic, type: reasoning_gym, task: basic_arithmetic, size: 5000, weight: 1,
       kwargs: {{min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 2}}}}
    - {{name: sandboxed, type: jsonl, path: {out}/code.jsonl, weight: 0.5}}
warmstart: {{steps: 300, batch_size: 64, lr: 2.0e-3}}
rollout: {{n_samples: 8, temperature: 1.0, max_new_tokens: 24, batch_size: 512}}
algo:
  kl: {{coef: 1.0e-3}}
  dynamic_sampling: {{max_extra_draws: 2, first_draw_oversample: true}}
  reference_reset: {{interval: 25}}
train: {{steps: {steps}, prompts_per_step: 32, mini_batch_prompts: 16, micro_batch_size: 128,
        logprob_micro_batch_size: 256, optim: {{lr: 3.0e-4, weight_decay: 0.0}}}}
eval: {{n_prompts: 64, greedy: true, interval: 10}}
checkpoint: {{interval: 20, keep_last: 2}}
logging: {{rollouts: 2, progress: false}}
rewards: {{num_workers: 2, max_tasks_per_worker: 300, extra_verifier_modules: [soak_verifiers]}}
"""


def _fit(xs, ys):
    """Least-squares slope and intercept."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def report(run_dir: str, skip: float = 0.1) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    rows = [r for r in rows if "memory/host_rss_gib" in r]
    if len(rows) < 4:
        raise SystemExit(f"{run_dir}/metrics.jsonl: {len(rows)} rows with host metrics; need 4 or more")
    rows = rows[int(len(rows) * skip):]
    out = {"run_dir": run_dir, "steps": [rows[0]["step"], rows[-1]["step"]], "keys": {}}
    print(f"{run_dir}: steps {rows[0]['step']}..{rows[-1]['step']} ({len(rows)} rows)")
    # the resident memory bounces with the allocator's arenas from step to step, so besides a fitted slope the
    # report compares the median and the peak of the first and the last quarter: a leak raises the second's
    print(f"{'metric':32s} {'min':>8s} {'max':>8s} {'1st quarter: median':>20s} {'max':>8s}"
          f" {'last quarter: median':>21s} {'max':>8s} {'slope/1000 steps':>16s}")
    for key in KEYS:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if not pts:
            continue
        xs, ys = zip(*pts)
        slope = _fit(xs, ys)[0] * 1000
        q = max(1, len(ys) // 4)
        first_q, last_q = sorted(ys[:q]), sorted(ys[-q:])
        res = {"min": min(ys), "max": max(ys), "median_first_quarter": first_q[q // 2],
               "max_first_quarter": first_q[-1], "median_last_quarter": last_q[q // 2],
               "max_last_quarter": last_q[-1], "slope_per_1000_steps": slope}
        out["keys"][key] = res
        print(f"{key:32s} {res['min']:8.3f} {res['max']:8.3f} {res['median_first_quarter']:20.3f}"
              f" {res['max_first_quarter']:8.3f} {res['median_last_quarter']:21.3f} {res['max_last_quarter']:8.3f}"
              f" {slope:16.3f}")
    with open(os.path.join(run_dir, "soak_report.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def run(steps: int, out: str) -> int:
    os.makedirs(out, exist_ok=True)
    rng = random.Random(0)
    with open(os.path.join(out, "code.jsonl"), "w") as f:
        for i in range(3000):
            a, b = rng.randrange(100), rng.randrange(100)
            f.write(json.dumps({"domain": "soak_code", "prompt": f"{a}+{b}=", "answer": str(a + b), "id": f"c{i}"})
                    + "\n")
    cfg = os.path.join(out, "soak.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(out=out, steps=steps))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.setdefault("OMP_NUM_THREADS", "2")
    rc = subprocess.call([sys.executable, "-m", "megaprorl.cli", "train", cfg], env=env)
    if rc == 0:
        report(os.path.join(out, "runs", "soak"))
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--steps", type=int, default=400)
    r.add_argument("--out", default="/tmp/soak")
    p = sub.add_parser("report")
    p.add_argument("run_dir")
    p.add_argument("--skip", type=float, default=0.1, help="fraction of the first rows left out (warm-up)")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        return run(a.steps, a.out)
    report(a.run_dir, a.skip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
