"""Compile every Triton kernel variant for a CUDA architecture without a GPU (ahead of time, to cubin).

    python -m triton_kernels.aot_check [--arch 90 80] [--dtype bf16 fp32] [--json out.json]

Catches what the CPU interpreter cannot: code the compiler rejects (types changing across branches,
constexpr misuse), and reports each variant's registers per thread and local memory (spills), read
from the cubin with the ``cuobjdump`` that ships with triton: the static side of occupancy.  Must run
in a process where triton was imported without TRITON_INTERPRET=1 (the interpreter replaces
triton.language's own jitted helpers); the test suite runs it in a subprocess.  Launch configurations are those of ``policy_loss.CUDA_LAUNCH``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _variants(dtype: str):
    """(kernel name, signature, constexprs, num_warps) for each compiled variant."""
    from . import decode_attention as da
    from . import policy_loss as pl

    lp = _PTR[dtype]
    bv_s, warps_s = pl.CUDA_LAUNCH["stats"]
    bv_g, warps_g = pl.CUDA_LAUNCH["grad"]
    stats_sig = {"logits_ptr": lp, "stride_row": "i64", "tokens_ptr": "*i64", "stats_ptr": "*fp32", "T": "i32",
                 "V": "i32", "vocab_start": "i32", "BLOCK_V": "constexpr", "PREFETCH": "constexpr",
                 "ENTROPY": "constexpr"}
    for prefetch, entropy in itertools.product((True, False), (True, False)):
        yield ("_row_stats", stats_sig, {"BLOCK_V": bv_s, "PREFETCH": prefetch, "ENTROPY": entropy}, warps_s)
    loss_sig = {"stats_ptr": "*fp32", "out_ptr": "*fp32", "old_ptr": "*fp32", "ref_ptr": "*fp32", "adv_ptr": "*fp32",
                "w_ptr": "*fp32", "T": "i32", **{k: "fp32" for k in ("eps_low", "eps_high", "dual_c", "ratio_clamp",
                                                                      "kl_coef", "kl_lclamp", "kl_oclamp", "ent_coef")},
                "HAS_REF": "constexpr", "KL_EST": "constexpr", "HAS_DUAL": "constexpr", "USE_KL": "constexpr",
                "BLOCK": "constexpr"}
    for has_ref, est, dual in ((True, 1, False), (True, 2, True), (True, 3, True), (False, 3, False)):
        yield ("_token_loss", loss_sig, {"HAS_REF": has_ref, "KL_EST": est, "HAS_DUAL": dual, "USE_KL": has_ref,
                                         "BLOCK": 1024}, 4)
    grad_sig = {"logits_ptr": lp, "stride_row": "i64", "grad_ptr": lp, "stride_grow": "i64", "tokens_ptr": "*i64",
                "tstats_ptr": "*fp32", "scale_ptr": "*fp32", "ent_ptr": "*fp32", "T": "i32", "V": "i32",
                "vocab_start": "i32", "skip_zero_rows": "i32", "BLOCK_V": "constexpr", "ACC_ENT": "constexpr"}
    for acc in (False, True):
        yield ("_grad", grad_sig, {"BLOCK_V": bv_g, "ACC_ENT": acc}, warps_g)
    # decode attention at the head shapes of Qwen2-1.5B (12 heads / 2 groups) and Qwen3-1.7B (16 / 8), head dim 128
    strides = ("sq_b", "sq_h", "sk_s", "sk_b", "sk_h", "sv_s", "sv_b", "sv_h", "so_b", "so_h", "so_s",
               "sml_b", "sml_h", "sml_s", "sout_b", "sout_h")
    for group, direct in itertools.product((6, 2), (True, False)):
        part = "*fp32" if not direct else lp  # with one split the partial buffers are not used (the output is passed)
        sig = {"q_ptr": lp, "k_ptr": lp, "v_ptr": lp, "start_ptr": "*i64", "end_ptr": "*i64", "o_ptr": part,
               "ml_ptr": part, "out_ptr": lp, **{k: "i32" for k in strides}, "scale": "fp32", "split_len": "i32",
               **{k: "constexpr" for k in ("GROUP", "D", "BLOCK_H", "BLOCK_N", "BLOCK_D", "PRECISION", "DIRECT", "WIDE",
                                                 "DOT_F32")}}
        yield ("_partial", sig, {"GROUP": group, "D": 128, "BLOCK_H": 16, "BLOCK_N": 32, "BLOCK_D": 128,
                                 "PRECISION": "ieee" if dtype == "fp32" else "tf32", "DIRECT": direct, "WIDE": False,
                                 "DOT_F32": False}, 4)
    comb_sig = {"o_ptr": "*fp32", "ml_ptr": "*fp32", "out_ptr": lp,
                **{k: "i32" for k in ("so_b", "so_h", "so_s", "sml_b", "sml_h", "sml_s", "sout_b", "sout_h", "splits")},
                "D": "constexpr", "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"}
    yield ("_combine", comb_sig, {"D": 128, "BLOCK_S": da.MAX_SPLITS, "BLOCK_D": 128}, 4)


def compile_all(archs: List[int], dtypes: List[str]) -> List[Dict]:
    if os.environ.get("TRITON_INTERPRET") == "1" or "triton" in sys.modules and _interpreted():
        raise RuntimeError("aot_check compiles real kernels: run it without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from . import decode_attention as da
    from . import policy_loss as pl

    fns = {name: JITFunction(getattr(mod, name)) for mod, names in ((pl, ("_row_stats", "_token_loss", "_grad")),
                                                                     (da, ("_partial", "_combine"))) for name in names}
    rows = []
    for arch, dtype in itertools.product(archs, dtypes):
        for name, sig, consts, warps in _variants(dtype):
            k = triton.compile(ASTSource(fn=fns[name], signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", int(arch), 32), options={"num_warps": warps})
            cubin = k.asm.get("cubin", b"")
            rows.append({"arch": f"sm_{arch}", "dtype": dtype, "kernel": name, "num_warps": warps,
                         **{k_: (v if isinstance(v, (int, bool)) else str(v)) for k_, v in consts.items()},
                         "cubin_bytes": len(cubin), **resource_usage(cubin)})
    return rows


def resource_usage(cubin: bytes) -> Dict:
    """Registers per thread and local-memory bytes per thread (spills) of a one-kernel cubin, from
    ``cuobjdump --dump-resource-usage`` (triton's copy, else one on PATH); None where unavailable."""
    import shutil

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    out = {"registers": None, "local_bytes": None}
    if not cubin or not tool:
        return out
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    out["registers"] = int(reg.group(1)) if reg else None
    out["local_bytes"] = int(local.group(1)) if local else None
    return out


def _interpreted() -> bool:
    from .policy_loss import _lang_interpreted

    return _lang_interpreted()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = H100/H200)")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(_PTR))
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args(argv)
    rows = compile_all(args.arch, args.dtype)
    for r in rows:
        flags = " ".join(f"{k}={v}" for k, v in r.items()
                         if k not in ("arch", "dtype", "kernel", "cubin_bytes", "registers", "local_bytes"))
        print(f"{r['arch']:6} {r['dtype']:5} {r['kernel']:12} {flags:60} cubin {r['cubin_bytes']:6} B"
              f"  registers {r['registers']}  local (spill) bytes {r['local_bytes']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
