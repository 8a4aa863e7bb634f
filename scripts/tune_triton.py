"""Sweep BLOCK_V x num_warps of the two Triton vocabulary-pass kernels on a GPU.

    PYTHONPATH=. python3 scripts/tune_triton.py [--tokens 16384] [--vocab 151936] [--out tune_triton.json]

Times the statistics pass (reads the logits) and the gradient pass (reads them, writes dlogits)
separately for each configuration (median of triton.testing.do_bench, bf16), then the whole
forward+backward per grad_mode with each kernel at its best.  The defaults in
triton_kernels/policy_loss.py (CUDA_LAUNCH) come from this script's output.
"""

import argparse
import json
import os

import torch
import triton.testing

from megaprorl.bench.kernels import _inputs, _spec
from megaprorl.kernels import policy_loss
from triton_kernels import policy_loss as tpl


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=120, return_mode="median"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--out", default="tune_triton.json")
    args = ap.parse_args()
    T, V = args.tokens, args.vocab
    logits, tokens, old, ref, adv, w = _inputs(T, V, torch.bfloat16, torch.device("cuda"))
    spec = _spec()
    stats = tpl.row_statistics(logits, tokens)
    tstats = tpl.token_loss(stats, old, ref, adv, w, spec)
    gbuf = torch.empty_like(logits)
    one = torch.ones(1, device="cuda")
    rows = []
    for bv in (1024, 2048, 4096, 8192):
        for nw in (2, 4, 8, 16):
            os.environ["MEGAPRORL_TRITON_NUM_WARPS"] = str(nw)
            r = {"block_v": bv, "num_warps": nw}
            r["stats_ms"] = bench(lambda: tpl.row_statistics(logits, tokens, block_v=bv))
            r["grad_ms"] = bench(lambda: tpl.logits_grad(logits, tokens, tstats, one, out=gbuf, block_v=bv))
            r["stats_GBs"] = T * V * 2 / r["stats_ms"] / 1e6
            r["grad_GBs"] = 2 * T * V * 2 / r["grad_ms"] / 1e6
            rows.append(r)
            print(r, flush=True)
    # statistics pass with the next chunk's load issued before this chunk's reduction
    os.environ["MEGAPRORL_TRITON_PREFETCH"] = "1"
    for bv, nw in [(512, 2), (1024, 2), (1024, 4), (2048, 2), (2048, 4), (2048, 8), (4096, 8)]:
        os.environ["MEGAPRORL_TRITON_NUM_WARPS"] = str(nw)
        ms = bench(lambda: tpl.row_statistics(logits, tokens, block_v=bv))
        r = {"block_v": bv, "num_warps": nw, "prefetch": True, "stats_ms": ms, "stats_GBs": T * V * 2 / ms / 1e6,
             "grad_ms": float("inf")}
        rows.append(r)
        print(r, flush=True)
    os.environ.pop("MEGAPRORL_TRITON_PREFETCH")
    os.environ.pop("MEGAPRORL_TRITON_NUM_WARPS")
    best_s = min(rows, key=lambda r: r["stats_ms"])
    best_g = min(rows, key=lambda r: r["grad_ms"])
    tpl.STATS_PREFETCH["on"] = bool(best_s.get("prefetch"))
    tpl.CUDA_LAUNCH.update(stats=(best_s["block_v"], best_s["num_warps"]), grad=(best_g["block_v"], best_g["num_warps"]))
    print("best stats:", best_s, "\nbest grad:", best_g)
    x = logits.requires_grad_(True)
    total = {}
    for mode in ("recompute", "forward", "inplace"):
        def fn(mode=mode):
            out = policy_loss(x, tokens, old, ref, adv, w, spec, backend="triton", grad_mode=mode)
            return torch.autograd.grad(out.loss, x)[0]
        total[mode] = bench(fn)
        print(f"fwd+bwd {mode}: {total[mode]:.3f} ms", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "T": T, "V": V, "rows": rows,
                   "best": {"stats": best_s, "grad": best_g}, "fwd_bwd_ms": total}, f, indent=1)


if __name__ == "__main__":
    main()
