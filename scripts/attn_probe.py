"""Which attention path should packed sequences take?  Times causal GQA attention, forward + backward,
for one pack of sequences laid end to end (the layout of ``train.pack_tokens``), through each path that
``megaprorl.models.attention.SDPAttention`` can take:

* ``per_sequence:<backend>`` — one SDPA call per sequence, SDPA restricted to one backend (flash,
  cudnn, efficient) or left to choose (default);
* ``varlen`` — ``torch.nn.attention.varlen.varlen_attn`` (one launch for the whole pack);
* ``padded`` — the same sequences as right-padded rows, one SDPA call (what the padded layout does).

Two regimes per pack shape: ``fresh`` draws new sequence lengths for every call (RL rollouts: lengths
rarely repeat, so a backend that compiles a plan per shape pays for it every time), ``repeat`` reuses
one set of lengths (what a benchmark with fixed shapes sees).  Prints a table and writes JSON.

    PYTHONPATH=. python3 scripts/attn_probe.py --out attn_probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def _lengths(g, total, n):
    if n == 1:
        return [total]
    cuts = sorted(torch.randperm(total - 1, generator=g)[: n - 1].add(1).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


def _per_sequence(q, k, v, lengths, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    from megaprorl.models.attention import packed_per_sequence

    ctx = sdpa_kernel([backends[backend]]) if backend != "default" else torch.enable_grad()
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
    with ctx:  # the model's own per-sequence path
        return packed_per_sequence(q, k, v, bounds)[0]


def _varlen(q, k, v, lengths):
    from megaprorl.models.attention import _accepts, _varlen_attn

    fn = _varlen_attn()
    if fn is None:
        raise RuntimeError("this torch has no torch.nn.attention.varlen")
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=q.device)
    kw = {"window_size": (-1, 0)} if _accepts(fn, "window_size") else {"is_causal": True}
    if _accepts(fn, "enable_gqa"):
        kw["enable_gqa"] = True
    else:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, max(lengths), max(lengths), **kw)


def _padded(q, k, v, lengths):
    L = max(lengths)
    rows = []
    for x in (q, k, v):
        parts = torch.split(x, lengths)
        rows.append(torch.stack([F.pad(p, (0, 0, 0, 0, 0, L - p.shape[0])) for p in parts]).transpose(1, 2))
    o = F.scaled_dot_product_attention(*rows, is_causal=True, enable_gqa=True)  # [b, h, L, d]
    return torch.cat([o[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per pack")
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 2, 4, 12], help="sequences per pack")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--paths", nargs="+", default=["per_sequence:default", "per_sequence:flash", "per_sequence:cudnn",
                                                   "per_sequence:efficient", "varlen", "padded"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="attn_probe.json")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    T, H, KV, D = args.tokens, args.heads, args.kv_heads, args.head_dim
    q, k, v = (torch.randn(T, h, D, device=dev, dtype=dtype, requires_grad=True) for h in (H, KV, KV))
    go = torch.randn(T, H, D, device=dev, dtype=dtype)

    def run(path, lengths):
        if path == "varlen":
            out = _varlen(q, k, v, lengths)
        elif path == "padded":
            out = _padded(q, k, v, lengths)
        else:
            out = _per_sequence(q, k, v, lengths, path.split(":", 1)[1])
        torch.autograd.grad(out, (q, k, v), go)

    rows = []
    for n in args.seqs:
        for path in args.paths:
            for regime in ("repeat", "fresh"):
                fixed = _lengths(g, T, n)
                try:
                    run(path, fixed)  # warm-up (kernels, autotuning; for "repeat" also this shape's plans)
                    sync()
                    times = []
                    for _ in range(args.iters):
                        lengths = fixed if regime == "repeat" else _lengths(g, T, n)
                        t0 = time.perf_counter()
                        run(path, lengths)
                        sync()
                        times.append(time.perf_counter() - t0)
                    ms, err = 1e3 * sorted(times)[len(times) // 2], ""
                except Exception as e:  # a backend that cannot run this case: record why
                    ms, err = None, f"{type(e).__name__}: {e}"[:100]
                rows.append(dict(seqs=n, path=path, regime=regime, ms=ms, error=err))
                shown = f"{ms:9.2f}" if ms is not None else "        -"
                print(f"{n:5d} seqs  {path:<24} {regime:<7} {shown} ms  {err}", flush=True)
    res = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
               tokens=T, heads=H, kv_heads=KV, head_dim=D, dtype=str(dtype), iters=args.iters, rows=rows)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
