"""Kernel benchmark: forward + backward of the per-token policy loss at long-context shapes.

    python -m megaprorl.bench.kernels [--tokens 4096 8192 16384] [--vocab 151936] [--hidden 1536]
                                      [--out bench_kernels.json] [--quick] [--only NAME ...]

Rows (each fwd+bwd of ``sum(weight * loss_t)``, bf16 inputs on CUDA):
  torch-eager        megaprorl.algo.loss reference on logits [T, V]
  torch-compile      torch.compile of the reference
  triton             Triton logits kernel, gradient recomputed in backward (new dlogits buffer)
  triton-inplace     Triton logits kernel, gradient written over the logits in the forward call
  triton-inplace-defer  the same with the entropy deferred to the gradient pass (DEFER_ENTROPY: the
                     statistics pass keeps only max and sum of exp; the loss has entropy_coef 0)
  cuda               megaprorl.kernels.cuda_ext (skipped with a note when it does not import)
  lmhead-triton      fused LM head (hidden [T, H] + weight [V, H], 2K-token chunks)
  lmhead-torch       hidden @ W^T then the torch reference
  liger-*            Liger-Kernel GRPO / fused-linear GRPO / fused-linear CE, when installed
  verl-linear-entropy  verl's fused linear log-prob + entropy kernel (hidden + weight, no [T, V] logits)
                     with the same clipped-ratio + k3 loss on top in torch; from an installed ``verl``, or
                     from ``MEGAPRORL_VERL_SRC`` = a verl wheel or source tree (its kernel files are loaded
                     alone: importing the ``verl`` package needs ray and tensordict)
Time: median of triton.testing.do_bench.  Memory: peak allocated during one fwd+bwd minus what was
allocated before it (inputs excluded, gradients included).  Bandwidth for the logits kernels counts
the logits read twice and the gradient written once (3 * T * V * 2 bytes), against the device's
measured copy bandwidth and its nominal peak.  Timings never decide pass/fail anywhere.
Needs CUDA (``--quick`` with TRITON_INTERPRET=1 runs tiny shapes on the CPU as a smoke test).
Imports no config / omegaconf, so it runs from a source checkout with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from . import write_report

NOMINAL_BW_GBS = {"H100 SXM": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0,
                  "H20": 4000.0, "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100 80GB PCIe": 1935.0,
                  "A100": 1555.0, "L40S": 864.0, "B200": 8000.0, "GB200": 8000.0}

ALL_ROWS = ("torch-eager", "torch-compile", "triton", "triton-inplace", "triton-inplace-defer", "cuda",
            "lmhead-triton", "lmhead-torch", "liger-grpo", "liger-fused-linear-grpo", "liger-flce", "verl-linear-entropy")
LM_ROWS = ("lmhead-triton", "lmhead-torch", "liger-fused-linear-grpo", "liger-flce", "verl-linear-entropy")


def _nominal_bw(name: str) -> Optional[float]:
    for key in sorted(NOMINAL_BW_GBS, key=len, reverse=True):
        if key.lower() in name.lower():
            return NOMINAL_BW_GBS[key]
    return None


def _is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom_type) or "out of memory" in str(e).lower()


class Bencher:
    def __init__(self, device: torch.device, warmup_ms: int, rep_ms: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable, grad_to_none) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grad_to_none,
                                                 return_mode="median"))
        times = []
        for i in range(4):
            for t in grad_to_none:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            if i:
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_extra_gb(self, fn: Callable, grad_to_none) -> Optional[float]:
        if not self.cuda:
            return None
        for t in grad_to_none:
            t.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        for t in grad_to_none:
            t.grad = None
        return peak / 2**30

    def copy_bw_gbs(self) -> Optional[float]:
        if not self.cuda:
            return None
        n = 1 << 30  # 1 GiB each way
        src = torch.empty(n, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src), [])
        del src, dst
        return 2 * n / (ms * 1e-3) / 1e9


def _inputs(T, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(T, V, generator=g, device=device, dtype=torch.float32) * 2.0).to(dtype)
    tokens = torch.randint(0, V, (T,), generator=g, device=device)
    with torch.no_grad():  # log-probs near the policy's, in chunks (no fp32 [T, V] copy)
        logp = torch.empty(T, device=device)
        for s in range(0, T, 1024):
            z = logits[s:s + 1024].float()
            logp[s:s + 1024] = z.gather(-1, tokens[s:s + 1024, None]).squeeze(-1) - torch.logsumexp(z, -1)
            del z
    old = logp + 0.1 * torch.randn(T, generator=g, device=device)
    ref = logp + 0.1 * torch.randn(T, generator=g, device=device)
    adv = torch.randn(T, generator=g, device=device)
    w = torch.full((T,), 1.0 / T, device=device)
    return logits, tokens, old, ref, adv, w


def _spec():
    from megaprorl.algo.loss import LossSpec

    return LossSpec(eps_low=0.2, eps_high=0.28, kl_coef=1e-4, kl_estimator="k3", entropy_coef=0.0)


def run(args) -> Dict:
    from megaprorl.kernels import policy_loss, policy_loss_lm_head

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu":
        dtype = torch.float32
    bench = Bencher(device, args.warmup_ms, args.rep_ms)
    spec = _spec()
    rows = [r for r in ALL_ROWS if not args.only or r in args.only]
    if device.type == "cpu":
        rows = [r for r in rows if r in ("torch-eager", "triton", "triton-inplace", "triton-inplace-defer",
                                         "lmhead-triton", "lmhead-torch")]
    info = {"device": torch.cuda.get_device_name() if bench.cuda else "cpu", "torch": torch.__version__,
            "dtype": str(dtype).replace("torch.", ""), "vocab": args.vocab, "hidden": args.hidden,
            "token_chunk": args.token_chunk}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    info["copy_bw_GBs"] = bench.copy_bw_gbs()
    info["nominal_bw_GBs"] = _nominal_bw(info["device"]) if bench.cuda else None
    peak_bw = info["nominal_bw_GBs"] or info["copy_bw_GBs"]
    results: List[Dict] = []

    def record(name, T, fn, grads, kind, note=""):
        res = {"name": name, "T": T, "V": args.vocab, "H": args.hidden, "ms": None, "peak_extra_GiB": None,
               "GBs": None, "pct_peak_bw": None, "TFLOPs": None, "note": note}
        try:
            fn()  # warm / compile once outside the timer
            bench.sync()
            res["ms"] = bench.time_ms(fn, grads)
            res["peak_extra_GiB"] = bench.peak_extra_gb(fn, grads)
            if kind == "logits":
                nbytes = 3 * T * args.vocab * torch.empty((), dtype=dtype).element_size()
                res["GBs"] = nbytes / (res["ms"] * 1e-3) / 1e9
                if peak_bw:
                    res["pct_peak_bw"] = 100.0 * res["GBs"] / peak_bw
            else:
                res["TFLOPs"] = 6.0 * T * args.vocab * args.hidden / (res["ms"] * 1e-3) / 1e12
        except Exception as e:  # OOM or a missing optional dependency: report it in the row
            res["note"] = "OOM" if _is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        for t in grads:
            t.grad = None
        gc.collect()
        if bench.cuda:
            torch.cuda.empty_cache()
        results.append(res)
        _print_row(res)

    for T in args.tokens:
        logit_rows = [r for r in rows if r not in LM_ROWS]
        if logit_rows:
            logits, tokens, old, ref, adv, w = _inputs(T, args.vocab, dtype, device)
            x = logits.detach().requires_grad_(True)

            def mk(backend, grad_mode="recompute"):
                # the gradient is returned, not accumulated into x.grad: in a model the logits are not a
                # leaf, and accumulating into a leaf would copy an in-place gradient that aliases x
                def fn():
                    out = policy_loss(x, tokens, old, ref, adv, w, spec, backend=backend, grad_mode=grad_mode)
                    return torch.autograd.grad(out.loss, x)[0]
                return fn

            for r in logit_rows:
                if r == "torch-eager":
                    record(r, T, mk("torch"), [x], "logits")
                elif r == "torch-compile":
                    record(r, T, mk("torch_compile"), [x], "logits")
                elif r == "triton":
                    record(r, T, mk("triton"), [x], "logits")
                elif r == "triton-inplace":
                    # overwrites x with its gradient each call; timing is unaffected by the values
                    with _entropy_deferral(False):
                        record(r, T, mk("triton", "inplace"), [x], "logits", note="logits buffer reused for the grad")
                elif r == "triton-inplace-defer":
                    with _entropy_deferral(True):
                        record(r, T, mk("triton", "inplace"), [x], "logits", note="entropy in the gradient pass")
                elif r == "cuda":
                    try:
                        import importlib

                        importlib.import_module("megaprorl.kernels.cuda_ext")
                    except Exception as e:
                        results.append({"name": r, "T": T, "ms": None, "note": f"skipped: cuda_ext does not import "
                                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"})
                        _print_row(results[-1])
                        continue
                    record(r, T, mk("cuda"), [x], "logits")
                elif r == "liger-grpo":
                    _liger_grpo(record, T, x, tokens, old, ref, adv, args)
            del logits, x
            gc.collect()
            if bench.cuda:
                torch.cuda.empty_cache()
        lm_rows = [r for r in rows if r in LM_ROWS]
        if lm_rows:
            g = torch.Generator(device=device).manual_seed(1)
            hidden = (torch.randn(T, args.hidden, generator=g, device=device) * 0.5).to(dtype).requires_grad_(True)
            W = (torch.randn(args.vocab, args.hidden, generator=g, device=device) * 0.02).to(dtype).requires_grad_(True)
            tokens = torch.randint(0, args.vocab, (T,), generator=g, device=device)
            old = torch.full((T,), -math.log(args.vocab), device=device) + 0.1 * torch.randn(T, generator=g,
                                                                                            device=device)
            ref = old + 0.05 * torch.randn(T, generator=g, device=device)
            adv = torch.randn(T, generator=g, device=device)
            w = torch.full((T,), 1.0 / T, device=device)
            for r in lm_rows:
                if r in ("lmhead-triton", "lmhead-torch"):
                    backend = "triton" if r == "lmhead-triton" else "torch"

                    def fn(backend=backend):
                        out = policy_loss_lm_head(hidden, W, tokens, old, ref, adv, w, spec, backend=backend,
                                                  token_chunk=args.token_chunk)
                        out.loss.backward()

                    record(r, T, fn, [hidden, W], "lmhead")
                elif r == "verl-linear-entropy":
                    _verl_lm(record, T, hidden, W, tokens, old, ref, adv, w, spec)
                else:
                    _liger_lm(record, r, T, hidden, W, tokens, old, ref, adv, args)
            del hidden, W
            gc.collect()
            if bench.cuda:
                torch.cuda.empty_cache()
    return {"info": info, "results": results}


def _missing(record, name, T, e):
    record(name, T, lambda: (_ for _ in ()).throw(RuntimeError(f"not installed ({e})")), [], "logits")


def _liger_grpo(record, T, x, tokens, old, ref, adv, args):
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as e:
        return _missing(record, "liger-grpo", T, f"{type(e).__name__}")
    L = min(1024, T)
    B = T // L
    # Liger wants logits [B, L + 1, V] (last position dropped), advantages per sequence
    logits = x.detach()[: B * L].view(B, L, -1)
    logits = torch.cat([logits, logits[:, -1:]], 1).requires_grad_(True)
    ids, o, r = tokens[: B * L].view(B, L), old[: B * L].view(B, L), ref[: B * L].view(B, L)
    a = adv[: B * L].view(B, L)[:, 0].contiguous()
    mask = torch.ones(B, L, device=x.device, dtype=torch.int32)

    def fn():
        out = triton_grpo_loss(logits, o, r, ids, a, mask, 1.0, 1e-4, 0.2, 0.28, True)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return torch.autograd.grad(loss.sum() if loss.dim() else loss, logits)[0]

    record("liger-grpo", B * L, fn, [logits], "logits", note="inplace=True")
    del logits


def _liger_lm(record, name, T, hidden, W, tokens, old, ref, adv, args):
    L = min(1024, T)
    B = T // L
    try:
        if name == "liger-flce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            mod = LigerFusedLinearCrossEntropyLoss()

            def fn():
                mod(W, hidden, tokens).backward()
        else:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            try:
                mod = LigerFusedLinearGRPOLoss(beta=1e-4, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28)
            except TypeError:
                mod = LigerFusedLinearGRPOLoss(beta=1e-4, use_ref_model=False)
            h3 = hidden
            mask = torch.ones(B, L, device=hidden.device)
            a = adv[: B * L].view(B, L)[:, 0].contiguous()

            def fn():
                out = mod(h3[: B * L].view(B, L, -1), W, tokens[: B * L].view(B, L), mask, a,
                          ref_per_token_logps=ref[: B * L].view(B, L), old_per_token_logps=old[: B * L].view(B, L))
                (out[0] if isinstance(out, (tuple, list)) else out).backward()
    except Exception as e:
        return _missing(record, name, T, f"{type(e).__name__}")
    record(name, T, fn, [hidden, W], "lmhead")


def load_verl_linear_entropy():
    """verl's ``linear_cross_entropy(hidden, weight, labels, temperature, reduction, group)`` -> (logp, entropy),
    and where it came from.  Falls back to ``MEGAPRORL_VERL_SRC`` (a verl wheel, or a directory holding
    ``verl/utils/kernel/``): its two kernel modules are loaded under stand-in ``verl`` / ``verl.utils.device``
    modules that answer the four device questions they ask, so ray and tensordict are not needed."""
    try:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

        import verl

        return linear_cross_entropy, f"verl {getattr(verl, '__version__', '?')}"
    except Exception as e:
        src = os.environ.get("MEGAPRORL_VERL_SRC")
        if not src:
            raise ImportError(f"verl does not import ({type(e).__name__}) and MEGAPRORL_VERL_SRC is not set") from e
    import importlib.util
    import types
    import zipfile

    if os.path.isfile(src):  # a wheel: unpack the kernel files next to it
        dest = os.path.join(os.path.dirname(os.path.abspath(src)), "verl_kernel_src")
        with zipfile.ZipFile(src) as z:
            members = [m for m in z.namelist() if m.startswith("verl/utils/kernel/")]
            if not members:
                raise ImportError(f"{src}: no verl/utils/kernel/ in this wheel")
            z.extractall(dest, members)
        src = dest
    kdir = os.path.join(src, "verl", "utils", "kernel")
    for f in ("kernels.py", "linear_cross_entropy.py"):
        if not os.path.isfile(os.path.join(kdir, f)):
            raise ImportError(f"MEGAPRORL_VERL_SRC={src}: {os.path.join(kdir, f)} is missing")
    dev = types.ModuleType("verl.utils.device")
    dev.is_cuda_available = torch.cuda.is_available()
    dev.get_device_name = lambda: "cuda" if torch.cuda.is_available() else "cpu"
    dev.get_torch_device = lambda: torch.cuda
    dev.get_device_capability = lambda device_id=0: (torch.cuda.get_device_capability(device_id)
                                                     if torch.cuda.is_available() else (None, None))
    for name in ("verl", "verl.utils", "verl.utils.kernel"):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [os.path.join(src, *name.split("."))]
            sys.modules[name] = mod
    sys.modules["verl.utils.device"] = dev
    for sub in ("kernels", "linear_cross_entropy"):
        name = f"verl.utils.kernel.{sub}"
        spec = importlib.util.spec_from_file_location(name, os.path.join(kdir, sub + ".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy, f"verl kernels from {src}"


def _verl_lm(record, T, hidden, W, tokens, old, ref, adv, w, spec):
    """verl's fused kernel gives log-prob and entropy per token; the clipped-ratio + k3 loss (the same spec as
    ours, ``megaprorl.algo``'s torch reference on [T] vectors) goes on top, as verl's actor does."""
    from megaprorl.algo.loss import per_token_loss

    try:
        lce, origin = load_verl_linear_entropy()
    except Exception as e:
        return _missing(record, "verl-linear-entropy", T, f"{type(e).__name__}: {e}")

    def fn():
        logp, ent = lce(hidden, W, tokens, 1.0, "none", None)
        parts = per_token_loss(logp.float(), ent.float(), old, ref, adv, spec)
        (parts["loss_t"] * w).sum().backward()

    record("verl-linear-entropy", T, fn, [hidden, W], "lmhead", note=origin)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


@contextlib.contextmanager
def _entropy_deferral(on: bool):
    """The Triton loss with the entropy deferred to the gradient pass (or not) for the duration, whatever
    MEGAPRORL_TRITON_DEFER_ENTROPY says (it would otherwise override the flag and make both rows one)."""
    import triton_kernels.policy_loss as tpl

    saved_flag = tpl.DEFER_ENTROPY["on"]
    saved_env = os.environ.pop("MEGAPRORL_TRITON_DEFER_ENTROPY", None)
    tpl.DEFER_ENTROPY["on"] = on
    try:
        yield
    finally:
        tpl.DEFER_ENTROPY["on"] = saved_flag
        if saved_env is not None:
            os.environ["MEGAPRORL_TRITON_DEFER_ENTROPY"] = saved_env


def _print_row(r):
    print(f"{r['name']:<24} T={r['T']:<6} ms={_fmt(r.get('ms'), '9.3f')}  extra={_fmt(r.get('peak_extra_GiB'), '7.3f')} GiB"
          f"  GB/s={_fmt(r.get('GBs'), '7.0f')} ({_fmt(r.get('pct_peak_bw'), '5.1f')}%)"
          f"  TFLOP/s={_fmt(r.get('TFLOPs'), '6.1f')}  {r.get('note') or ''}", flush=True)


def print_table(report):
    info, rows = report["info"], report["results"]
    title = (f"policy-loss kernels on {info['device']} ({info['dtype']}, V={info['vocab']}, H={info['hidden']}); "
             f"copy bw {_fmt(info['copy_bw_GBs'], '.0f')} GB/s, nominal {_fmt(info['nominal_bw_GBs'], '.0f')} GB/s")
    head = ["kernel", "T", "fwd+bwd ms", "extra GiB", "GB/s", "% peak", "TFLOP/s", "note"]
    body = [[r["name"], str(r["T"]), _fmt(r.get("ms"), ".3f"), _fmt(r.get("peak_extra_GiB"), ".3f"),
             _fmt(r.get("GBs"), ".0f"), _fmt(r.get("pct_peak_bw"), ".1f"), _fmt(r.get("TFLOPs"), ".1f"),
             r.get("note") or ""] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in head:
            t.add_column(h, justify="left" if h in ("kernel", "note") else "right")
        for b in body:
            t.add_row(*b)
        Console(width=max(140, Console().width)).print(t)
    except Exception:
        print(title)
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        print("  ".join(h.ljust(wd) for h, wd in zip(head, widths)))
        for b in body:
            print("  ".join(c.ljust(wd) for c, wd in zip(b, widths)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megaprorl bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--token-chunk", type=int, default=2048, help="token chunk of the fused LM head")
    ap.add_argument("--only", nargs="+", choices=ALL_ROWS, help="run only these rows")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--out", default="bench_kernels.json", help="JSON report path")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test; CPU needs TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.hidden, args.token_chunk = [32], 500, 16, 16
        args.warmup_ms, args.rep_ms = 5, 20
    if not torch.cuda.is_available():
        if not args.quick:
            print("megaprorl bench kernels needs a CUDA GPU (bf16 at T=4K-16K, V=152K). On a CPU only "
                  "`--quick` runs, as a smoke test of tiny shapes (set TRITON_INTERPRET=1 for the Triton rows).",
                  file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("note: no CUDA and TRITON_INTERPRET!=1: only the torch rows run", file=sys.stderr)
            args.only = [r for r in (args.only or ALL_ROWS) if r in ("torch-eager", "lmhead-torch")]
        print("note: CPU smoke test; timings are meaningless", file=sys.stderr)
    report = run(args)
    report["args"] = {k: v for k, v in vars(args).items()}
    print_table(report)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
