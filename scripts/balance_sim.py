"""How evenly the data-parallel ranks are loaded in an RL step's update, as drawn, with whole groups balanced,
and with responses balanced (``parallel.balance_batch``): a simulation on made-up lengths, no model.

Length model (an assumption, not measured): each prompt has a typical response length drawn log-uniformly
between 300 tokens and the budget; its samples spread around it by a log-normal factor (sigma 0.5), capped at
the budget; each sequence adds a 200-token prompt.  A rank's load is the tokens it trains.

    python scripts/balance_sim.py [--prompts 256] [--samples 16] [--mini-batches 4] [--budget 8192]
"""

import argparse
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megaprorl.parallel.balance import mini_batch_sizes, plan, step_imbalance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--mini-batches", type=int, default=4)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 16, 32, 64])
    a = ap.parse_args()
    rng = random.Random(0)
    n = a.samples

    def group():
        typical = math.exp(rng.uniform(math.log(300), math.log(a.budget)))
        return [min(a.budget, int(typical * math.exp(rng.gauss(0, 0.5)))) + 200 for _ in range(n)]

    print(f"{a.prompts} prompts x {n} samples, {a.mini_batches} mini-batches, budget {a.budget}; the update's time "
          f"over an even split's (mean of {a.steps} steps)")
    print(f"{'DP ranks':>9} {'as drawn':>9} {'groups':>9} {'responses':>10} {'plan s':>7}")
    for world in a.worlds:
        b = a.prompts // world
        sizes = mini_batch_sizes(b, a.mini_batches)
        bd = [sum(sizes[:m]) for m in range(a.mini_batches + 1)]
        rows = []
        for step in range(a.steps):
            seq = [[x for _ in range(b) for x in group()] for _ in range(world)]
            grp = [[sum(c[k * n:(k + 1) * n]) for k in range(b)] for c in seq]
            drawn = step_imbalance([[sum(grp[r][bd[m]:bd[m + 1]]) for m in range(a.mini_batches)]
                                    for r in range(world)])
            lay = plan(grp, a.mini_batches, step)
            whole = step_imbalance([[sum(grp[x][i] for x, i in lay[r][bd[m]:bd[m + 1]])
                                     for m in range(a.mini_batches)] for r in range(world)])
            t = time.perf_counter()
            lay = plan(seq, a.mini_batches, step, group_size=n)
            t = time.perf_counter() - t
            resp = step_imbalance([[sum(seq[x][i] for x, i in lay[r][bd[m] * n:bd[m + 1] * n])
                                    for m in range(a.mini_batches)] for r in range(world)])
            rows.append((drawn, whole, resp, t))
        mean = [sum(r[k] for r in rows) / len(rows) for k in range(3)]
        print(f"{world:>9} {mean[0]:>9.3f} {mean[1]:>9.3f} {mean[2]:>10.3f} {max(r[3] for r in rows):>7.2f}")


if __name__ == "__main__":
    main()
