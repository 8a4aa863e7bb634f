"""Compile / link check of the CUDA extension sources (csrc/) on machines without a GPU.

What is checked (see docs/cuda_kernel.md):
  * csrc/policy_loss.cu (the kernels; CUDA headers only) is compiled by nvcc to an object with the
    release flags (torch's COMMON_NVCC_FLAGS, -O3, -std=c++20) for sm_80 and sm_90 SASS plus
    compute_90 PTX (MEGAPRORL_CI_CUDA_ARCHS=90 narrows it); a register spill fails the test.
  * csrc/bindings.cpp (the torch glue; no CUDA headers) is compiled by g++ to an object against torch's
    and Python's headers with the defines BuildExtension adds (concurrently with nvcc).
  * both objects link into a Python module against the CPU wheel's libtorch and the toolkit's libcudart;
    a fresh interpreter imports it, sees the documented signatures and gets the clear "must be a CUDA
    tensor" error for CPU tensors (this catches header / launcher mismatches as undefined symbols).
Skipped with a reason when nvcc / g++ / libcudart is missing.  Running the kernels needs a GPU:
tests/test_kernels_cuda_gpu.py.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from megaprorl.kernels import cuda_ext

LIMIT_S = 120.0
MODULE = "_C_policy_loss_ci"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs nvcc and g++ in parallel; returns {tool: (returncode, output, seconds, command) or None, ...}."""
    out = tmp_path_factory.mktemp("csrc")
    archs = tuple(a.strip() for a in os.environ.get("MEGAPRORL_CI_CUDA_ARCHS", "80,90").split(",") if a.strip())
    nvcc = cuda_ext.find_nvcc()
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    cmds = cuda_ext.build_commands(out, archs=archs, nvcc=nvcc, cxx=cxx or "g++", module_name=MODULE)
    cmds["nvcc"] += ["-Xptxas", "-warn-spills"]
    procs, results = {}, {"nvcc": None, "cxx": None, "out": out, "cmds": cmds}
    t0 = time.monotonic()
    for tool, present in (("nvcc", nvcc), ("cxx", cxx)):
        if present:
            procs[tool] = subprocess.Popen(cmds[tool], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for tool, p in procs.items():
        try:
            text, _ = p.communicate(timeout=2 * LIMIT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        results[tool] = (p.returncode, text, time.monotonic() - t0, " ".join(cmds[tool]))
    return results


@pytest.mark.slow
def test_kernels_compile_with_nvcc(compiled):
    if compiled["nvcc"] is None:
        pytest.skip("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda/bin): kernel compile check skipped")
    rc, text, secs, cmd = compiled["nvcc"]
    assert rc == 0, f"nvcc failed ({cmd}):\n{text}"
    assert (compiled["out"] / "policy_loss.o").stat().st_size > 0
    assert not re.search(r"spill", text, re.I), f"register spills:\n{text}"
    assert secs < LIMIT_S, f"nvcc took {secs:.0f} s"


@pytest.mark.slow
def test_bindings_compile_with_torch_headers(compiled):
    if compiled["cxx"] is None:
        pytest.skip("g++ not found: bindings compile check skipped")
    rc, text, secs, cmd = compiled["cxx"]
    assert rc == 0, f"g++ failed ({cmd}):\n{text}"
    assert secs < LIMIT_S, f"g++ took {secs:.0f} s"


_IMPORT_CHECK = f"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import {MODULE} as m
assert m.BLOCK == 512
assert "g_h: torch.Tensor | None" in m.grad.__doc__ or "Optional[torch.Tensor]" in m.grad.__doc__, m.grad.__doc__
x, t = torch.zeros(2, 10), torch.zeros(2, dtype=torch.long)
v = x[:, 0].contiguous()
for call in (lambda: m.stats(x, t, 0, 1, 0), lambda: m.grad(x, x, t, 0, v, v, v, v, None, 1, 0)):
    try:
        call()
    except RuntimeError as e:
        assert "logits must be a CUDA tensor" in str(e), e
    else:
        raise AssertionError("CPU tensors accepted")
print("ok")
"""


@pytest.mark.slow
def test_extension_links_and_imports(compiled):
    if compiled["nvcc"] is None or compiled["cxx"] is None:
        pytest.skip("nvcc or g++ not found")
    if compiled["nvcc"][0] != 0 or compiled["cxx"][0] != 0:
        pytest.skip("compilation failed (reported by the tests above)")
    if cuda_ext.find_cudart() is None:
        pytest.skip("libcudart.so not found next to nvcc: link check skipped")
    link = compiled["cmds"]["link"]
    r = subprocess.run(link, capture_output=True, text=True)
    assert r.returncode == 0, f"link failed ({' '.join(link)}):\n{r.stdout}{r.stderr}"
    r = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, str(compiled["out"])], capture_output=True, text=True,
                       timeout=LIMIT_S)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_header_is_plain_cpp():
    """policy_loss.h must stay free of CUDA / torch includes (both compilers include it), bindings.cpp of
    CUDA ones (a CPU wheel of torch cannot compile ATen/cuda or c10/cuda headers)."""
    text = (cuda_ext.CSRC / "policy_loss.h").read_text()
    includes = re.findall(r"#include\s*[<\"]([^>\"]+)", text)
    assert all(not re.match(r"(cuda|torch|ATen|c10)", i) for i in includes), includes
    glue = (cuda_ext.CSRC / "bindings.cpp").read_text()
    assert not re.search(r"#include\s*[<\"](cuda|ATen/cuda|c10/cuda)", glue)
