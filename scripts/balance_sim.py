"""Simulations of an RL step's data-parallel work, no model: (1) how evenly the ranks are loaded in the update,
as drawn, with whole groups balanced and with responses balanced (``parallel.balance_batch``); (2) how many
dynamic-sampling rounds a step takes, per rank or pooled over the ranks, drawing the missing groups or
oversampling them, the first draw too (``algo.dynamic_sampling.share_over_dp`` / ``oversample`` /
``first_draw_oversample``), with the trainer's own functions;
(3) how long a round's generation takes when each rank decodes the prompts it drew, or when the ranks claim
prompts from one pool as their rows free up (``rollout.share_prompts_over_dp``).

Generation model (3): each rank's engine has ``--rows`` KV-cache rows; a rollout holds a row for as many decode
steps as it has response tokens, and a free row takes the next waiting rollout at once (continuous batching, no
prefill cost, no admission threshold).  A rank that shares claims the next whole prompt of the pool whenever one
of its rows is free and none of its rollouts waits, as the engine does.  The round ends when every rank is done.

Length model (an assumption, not measured): each prompt has a typical response length drawn log-uniformly
between 300 tokens and the budget; its samples spread around it by a log-normal factor (sigma 0.5), capped at
the budget; each sequence adds a 200-token prompt.  A rank's load is the tokens it trains.  Signal model: each
group has signal with a fixed probability, independently.

    python scripts/balance_sim.py [--prompts 256] [--samples 16] [--mini-batches 4] [--budget 8192] [--rows 128]
                                  [--parts 1 2 3]
"""

import argparse
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megaprorl.algo.dynamic_sampling import draw_size, first_draw_size, running_signal_rate  # noqa: E402
from megaprorl.parallel.balance import mini_batch_loads, plan, step_imbalance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--mini-batches", type=int, default=4)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--rows", type=int, default=128, help="(3) KV-cache rows of each rank's engine")
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], help="which simulations to run")
    a = ap.parse_args()
    rng = random.Random(0)
    n = a.samples

    def group():
        typical = math.exp(rng.uniform(math.log(300), math.log(a.budget)))
        return [min(a.budget, int(typical * math.exp(rng.gauss(0, 0.5)))) + 200 for _ in range(n)]

    if 1 in a.parts:
        print(f"{a.prompts} prompts x {n} samples, {a.mini_batches} mini-batches, budget {a.budget}; the update's time "
              f"over an even split's (mean of {a.steps} steps)")
        print(f"{'DP ranks':>9} {'as drawn':>9} {'groups':>9} {'responses':>10} {'plan s':>7}")
        for world in a.worlds:
            b = a.prompts // world
            rows = []
            for step in range(a.steps):
                seq = [[x for _ in range(b) for x in group()] for _ in range(world)]
                grp = [[sum(c[k * n:(k + 1) * n]) for k in range(b)] for c in seq]
                drawn = step_imbalance([mini_batch_loads(grp[r], b, a.mini_batches) for r in range(world)])
                lay = plan(grp, a.mini_batches, step)
                whole = step_imbalance([mini_batch_loads([grp[x][i] for x, i in lay[r]], b, a.mini_batches)
                                        for r in range(world)])
                t = time.perf_counter()
                lay = plan(seq, a.mini_batches, step, group_size=n)
                t = time.perf_counter() - t
                resp = step_imbalance([mini_batch_loads([seq[x][i] for x, i in lay[r]], b, a.mini_batches, n)
                                       for r in range(world)])
                rows.append((drawn, whole, resp, t))
            mean = [sum(r[k] for r in rows) / len(rows) for k in range(3)]
            print(f"{world:>9} {mean[0]:>9.3f} {mean[1]:>9.3f} {mean[2]:>10.3f} {max(r[3] for r in rows):>7.2f}")

    if 2 in a.parts:
        sampling(a, rng)
    if 3 in a.parts:
        generation(a, rng, group)


def sampling(a, rng, rates=(0.8, 0.6, 0.3), world=32, max_draws=5, trials=300) -> None:
    """Dynamic sampling's rounds in a step at ``world`` ranks: the rounds the step waits for (per rank: its
    slowest rank's), the prompts drawn, and the groups without signal that top the batch up at the draw bound."""
    print(f"\ndynamic sampling at {world} ranks, {a.prompts} prompts a step, at most {max_draws} draws "
          f"(mean of {trials} steps)")
    print(f"{'signal':>7} {'draws':>24} {'rounds':>7} {'prompts':>8} {'topped up':>10}")
    b = a.prompts // world
    for p in rates:
        for pooled in (False, True):
            for over in (False, True):
                rounds = drawn = short = 0
                for _ in range(trials):
                    if pooled:
                        kept = gen = k = 0
                        while kept < a.prompts and k < max_draws:
                            w = -(-draw_size(a.prompts - kept, kept, gen, over, a.prompts) // world) * world
                            kept += sum(rng.random() < p for _ in range(w))
                            gen, k = gen + w, k + 1
                        rounds, drawn, short = rounds + k, drawn + gen, short + max(a.prompts - kept, 0)
                        continue
                    slowest = 0
                    for _ in range(world):
                        kept = gen = k = 0
                        while kept < b and k < max_draws:
                            w = draw_size(b - kept, kept, gen, over, b)
                            kept += sum(rng.random() < p for _ in range(w))
                            gen, k = gen + w, k + 1
                        slowest, drawn, short = max(slowest, k), drawn + gen, short + max(b - kept, 0)
                    rounds += slowest
                how = ("pooled" if pooled else "per rank") + (", oversampled" if over else "")
                print(f"{p:>7.1f} {how:>24} {rounds / trials:>7.2f} {drawn / trials:>8.0f} {short / trials:>10.2f}")
        # pooled and oversampled, the first draw sized by the running signal rate of the steps before
        # (algo.dynamic_sampling.first_draw_oversample; the first step of the simulation has no rate yet)
        rounds = drawn = short = 0
        rate = None
        for _ in range(trials):
            kept = gen = k = 0
            while kept < a.prompts and k < max_draws:
                size = (first_draw_size(a.prompts, rate, max_draws * a.prompts) if k == 0
                        else draw_size(a.prompts - kept, kept, gen, True, a.prompts))
                w = -(-size // world) * world
                kept += sum(rng.random() < p for _ in range(w))
                gen, k = gen + w, k + 1
            rate = running_signal_rate(rate, kept, gen)
            rounds, drawn, short = rounds + k, drawn + gen, short + max(a.prompts - kept, 0)
        print(f"{p:>7.1f} {'pooled, oversampled, 1st':>24} {rounds / trials:>7.2f} {drawn / trials:>8.0f} "
              f"{short / trials:>10.2f}")


def generation(a, rng, group, trials: int = 20) -> None:
    """(3): a round of ``--prompts`` prompts; its decode steps (the slowest rank's) when each rank decodes its
    own ``prompts / world`` and when they claim from one pool, and the pool's over the own prompts'."""
    import heapq

    print(f"\ngeneration of {a.prompts} prompts x {a.samples} samples, {a.rows} rows a rank (decode steps of the "
          f"round, mean of {trials})")
    print(f"{'DP ranks':>9} {'own prompts':>12} {'one pool':>9} {'ratio':>6} {'even':>7}")
    for world in a.worlds:
        b = a.prompts // world
        own_t = pool_t = even_t = 0.0
        for _ in range(trials):
            prompts = [[x - 200 for x in group()] for _ in range(a.prompts)]
            own = 0
            for r in range(world):  # each rank alone: its rollouts into its free rows, in order
                free = [0] * a.rows
                for length in (x for p in prompts[r * b:(r + 1) * b] for x in p):
                    heapq.heappush(free, heapq.heappop(free) + length)
                own = max(own, max(free))
            rows = [(0, r, k) for r in range(world) for k in range(a.rows)]  # (free at, rank, row)
            heapq.heapify(rows)
            waiting = [[] for _ in range(world)]
            nxt, end = 0, 0
            while rows:
                t, r, k = heapq.heappop(rows)
                if not waiting[r] and nxt < len(prompts):  # a free row and nothing waiting: claim a prompt
                    waiting[r], nxt = list(prompts[nxt]), nxt + 1
                if waiting[r]:
                    done = t + waiting[r].pop(0)
                    end = max(end, done)
                    heapq.heappush(rows, (done, r, k))
            own_t, pool_t = own_t + own, pool_t + end
            even_t += sum(x for p in prompts for x in p) / (world * a.rows)  # all work spread perfectly
        print(f"{world:>9} {own_t / trials:>12.0f} {pool_t / trials:>9.0f} {pool_t / own_t:>6.2f} "
              f"{even_t / trials:>7.0f}")


if __name__ == "__main__":
    main()
