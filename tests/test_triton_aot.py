"""Every Triton kernel variant (policy loss, decode attention) compiles to a cubin for sm_90 (H100/H200) and sm_80 without a GPU, so
code that only the compiler rejects (the CPU interpreter runs it) fails here in CI."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_variant_compiles_for_sm90_and_sm80(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real kernels, not the interpreter
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "triton_kernels.aot_check", "--arch", "90", "80", "--dtype", "bf16",
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    kernels = {(row["arch"], row["kernel"]) for row in rows}
    assert kernels == {(a, k) for a in ("sm_90", "sm_80")
                       for k in ("_row_stats", "_token_loss", "_grad", "_partial", "_combine")}
    # stats: prefetch x entropy; loss: 4 estimator/ref/dual sets; grad: 2; decode attention: 2 head shapes x
    # (one split, several) and the combine
    assert len(rows) == 2 * (4 + 4 + 2 + 4 + 1)
    for row in rows:
        assert row["cubin_bytes"] > 0, row
        assert row["registers"] is None or 0 < row["registers"] <= 255, row
    print("\n".join(r.stdout.splitlines()[-len(rows):]))


def test_refuses_the_interpreter(monkeypatch):
    from triton_kernels.aot_check import compile_all

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        compile_all([90], ["bf16"])
