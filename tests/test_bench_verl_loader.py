"""The kernel benchmark's loader for verl's fused linear-entropy kernel (verl itself needs ray to import)."""

import os
import sys
import zipfile

import pytest
import torch

from megaprorl.bench.kernels import load_verl_linear_entropy

KERNELS = """
from verl.utils.device import get_device_capability, get_device_name, is_cuda_available
from verl.utils.device import get_torch_device
TMA = is_cuda_available and get_device_capability()[0] >= 9
def forward(h, w, labels):
    z = (h @ w.T).float().log_softmax(-1)
    return z.gather(-1, labels[:, None])[:, 0], -(z.exp() * z).sum(-1)
"""
LCE = """
from . import kernels
def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", group=None):
    return kernels.forward(hidden / temperature, weight, labels)
"""


@pytest.fixture
def clean_modules():
    saved = {k: v for k, v in sys.modules.items() if k == "verl" or k.startswith("verl.")}
    yield
    for k in [k for k in sys.modules if k == "verl" or k.startswith("verl.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def _tree(root):
    kdir = root / "verl" / "utils" / "kernel"
    kdir.mkdir(parents=True)
    (kdir / "kernels.py").write_text(KERNELS)
    (kdir / "linear_cross_entropy.py").write_text(LCE)
    return kdir


@pytest.mark.parametrize("as_wheel", [False, True])
def test_loads_kernel_files_without_the_verl_package(tmp_path, monkeypatch, clean_modules, as_wheel):
    kdir = _tree(tmp_path / "src")
    src = tmp_path / "src"
    if as_wheel:
        src = tmp_path / "verl-0.0-py3-none-any.whl"
        with zipfile.ZipFile(src, "w") as z:
            for f in kdir.iterdir():
                z.write(f, f"verl/utils/kernel/{f.name}")
    monkeypatch.setenv("MEGAPRORL_VERL_SRC", str(src))
    fn, origin = load_verl_linear_entropy()
    assert str(src) in origin or "verl_kernel_src" in origin
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 4, 2])
    logp, ent = fn(h, w, labels, 1.0, "none", None)
    ref = (h @ w.T).log_softmax(-1)
    torch.testing.assert_close(logp, ref.gather(-1, labels[:, None])[:, 0])
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))


def test_missing_kernel_file_is_named(tmp_path, monkeypatch, clean_modules):
    kdir = _tree(tmp_path)
    os.remove(kdir / "kernels.py")
    monkeypatch.setenv("MEGAPRORL_VERL_SRC", str(tmp_path))
    with pytest.raises(ImportError, match="kernels.py is missing"):
        load_verl_linear_entropy()


def test_without_verl_or_source_says_so(monkeypatch, clean_modules):
    monkeypatch.delenv("MEGAPRORL_VERL_SRC", raising=False)
    monkeypatch.setitem(sys.modules, "verl", None)  # as if not installed
    with pytest.raises(ImportError, match="MEGAPRORL_VERL_SRC"):
        load_verl_linear_entropy()
