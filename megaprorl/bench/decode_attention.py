"""Decode-step attention over the embedded engine's KV cache: masked SDPA (every row over the furthest row's
span) against the Triton kernel (each row its own extent, K/V read once per query group).

    python -m megaprorl.bench.decode_attention [--rows 64] [--max-len 2048 8192 17408] [--shapes qwen2-1.5b qwen3-1.7b]
                                               [--out bench_decode_attention.json] [--quick]

One layer's attention of one decode step, bf16 on CUDA, the cache laid out as Megatron's static inference
context holds it ([seq, rows, groups, head dim]).  Extents: ``spread``, row lengths uniform in [1, max-len]
(what continuous batching leaves in the cache: rows refilled at different times), and ``equal``, every row
at max-len (a lock-step batch whose prompts are all of one length).  The SDPA row is the engine's
``rollout.decode_attention=sdpa`` call (SDPAttention: the cache's first span positions permuted to
[rows, groups, span, d], a boolean mask [rows, 1, 1, span], GQA through ``enable_gqa``).  Bytes count
the K and V a path must read at least: rows x span for SDPA, the sum of the extents for Triton; GB/s is
those bytes over the time.  Time: median of ``triton.testing.do_bench``.  Timings never decide pass/fail
anywhere.  Needs CUDA (``--quick`` with TRITON_INTERPRET=1 runs one tiny case on the CPU as a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import write_report

SHAPES = {"qwen2-1.5b": (12, 2, 128), "qwen3-1.7b": (16, 8, 128), "llama3-8b": (32, 8, 128)}  # heads, groups, d


def _time_ms(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        fn()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _case(rows, heads, groups, d, max_len, extents, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = max_len
    q = torch.randn(rows, heads, d, generator=g).to(device, dtype)
    k = torch.randn(S, rows, groups, d, generator=g).to(device, dtype)
    v = torch.randn(S, rows, groups, d, generator=g).to(device, dtype)
    if extents == "spread":
        length = torch.randint(1, max_len + 1, (rows,), generator=g)
        length[0] = max_len  # the furthest row sets SDPA's span
    else:
        length = torch.full((rows,), max_len)
    start = torch.zeros(rows, dtype=torch.long)
    return q, k, v, start.to(device), length.to(device), int(length.max()), int(length.sum())


def run_case(rows, shape, max_len, extents, dtype, device, cuda):
    from triton_kernels.decode_attention import decode_attention

    heads, groups, d = SHAPES[shape]
    q, k, v, start, end, span, own = _case(rows, heads, groups, d, max_len, extents, dtype, device)
    pos = torch.arange(span, device=device)[None]
    masked = ~((pos >= start[:, None]) & (pos < end[:, None]))[:, None, None, :]  # Megatron's: True = masked
    scale = d ** -0.5

    def sdpa():  # SDPAttention.forward on the engine's arguments (the mask inverted once per step)
        qq = q[None].permute(1, 2, 0, 3)
        kk, vv = (x[:span].permute(1, 2, 0, 3) for x in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=~masked, scale=scale,
                                                                enable_gqa=groups != heads)

    def triton_():
        return decode_attention(q, k, v, start, end, scale, max_len=span)

    err = (triton_().float() - sdpa()[:, :, 0].float()).abs().max().item()
    per_pos = 2 * groups * d * q.element_size()  # K and V bytes of one position of one row
    out = {"rows": rows, "shape": shape, "heads": heads, "groups": groups, "head_dim": d, "max_len": max_len,
           "extents": extents, "dtype": str(dtype).replace("torch.", ""), "own_positions": own,
           "span_positions": rows * span, "max_abs_diff": err}
    for name, fn, positions in (("sdpa", sdpa, rows * span), ("triton", triton_, own)):
        try:
            ms = _time_ms(fn, cuda)
            out[f"{name}_ms"] = ms
            out[f"{name}_gbs"] = positions * per_pos / (ms * 1e-3) / 1e9
        except RuntimeError as e:  # an SDPA backend that refuses the shape, out of memory
            out[f"{name}_ms"], out[f"{name}_error"] = None, f"{type(e).__name__}: {str(e)[:200]}"
        if cuda:
            torch.cuda.empty_cache()
    if out.get("sdpa_ms") and out.get("triton_ms"):
        out["speedup"] = out["sdpa_ms"] / out["triton_ms"]
    return out


def print_table(report):
    print(f"device: {report['device']}  torch {report['torch']}  triton {report['triton']}")
    head = f"{'shape':12} {'rows':>4} {'max len':>7} {'extents':8} {'sdpa ms':>8} {'GB/s':>7} {'triton ms':>9} {'GB/s':>7} {'x':>5} {'max |diff|':>10}"
    print(head)
    print("-" * len(head))
    for r in report["rows"]:
        f = lambda k, w, p: (f"{r[k]:{w}.{p}f}" if r.get(k) is not None else f"{'-':>{w}}")  # noqa: E731
        print(f"{r['shape']:12} {r['rows']:4d} {r['max_len']:7d} {r['extents']:8} {f('sdpa_ms', 8, 3)} {f('sdpa_gbs', 7, 0)} "
              f"{f('triton_ms', 9, 3)} {f('triton_gbs', 7, 0)} {f('speedup', 5, 2)} {r['max_abs_diff']:10.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[64])
    ap.add_argument("--max-len", type=int, nargs="+", default=[2048, 8192, 17408])
    ap.add_argument("--shapes", nargs="+", default=["qwen2-1.5b", "qwen3-1.7b"], choices=sorted(SHAPES))
    ap.add_argument("--extents", nargs="+", default=["spread", "equal"], choices=["spread", "equal"])
    ap.add_argument("--out", default="bench_decode_attention.json", help="JSON report path")
    ap.add_argument("--quick", action="store_true", help="one tiny case (a CPU smoke test under TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    from triton_kernels.policy_loss import interpreting

    if not cuda and not (args.quick and interpreting()):
        print("megaprorl bench decode-attention needs a CUDA GPU; on a CPU only --quick under TRITON_INTERPRET=1 "
              "(a smoke test, timings meaningless)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.quick:
        args.rows, args.max_len, args.shapes, args.extents = [4], [40], ["qwen2-1.5b"], ["spread"]
    import triton

    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)", "torch": torch.__version__,
              "triton": triton.__version__, "rows": []}
    for shape in args.shapes:
        for rows in args.rows:
            for max_len in args.max_len:
                for extents in args.extents:
                    report["rows"].append(run_case(rows, shape, max_len, extents, dtype, device, cuda))
    print_table(report)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
