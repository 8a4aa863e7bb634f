"""CUDA C++ backend of the per-token policy loss (``csrc/policy_loss.cu``, ``csrc/bindings.cpp``).

    policy_loss_cuda(logits, tokens, old_logp, ref_logp, adv, weight, spec, *, tp_group=None,
                     vocab_start_index=0, inplace_backward=False) -> PolicyLossOutput

Same contract as ``megaprorl.kernels.policy_loss``: ``loss = sum(weight * loss_t)`` with autograd to the
[T, V_local] logits; ``logp`` / ``entropy`` / ``kl`` detached fp32 [T] (``kl`` None without ``ref_logp``).

Forward: the ``stats`` kernel streams the logits once (per row, or per vocab chunk when T is small:
max, sum exp, centred sum exp*z, target logit); chunks and then TP ranks are merged here (TP: one
all_reduce MAX and one all_reduce SUM of [T]-sized tensors, as Megatron's vocab-parallel cross
entropy); the per-token loss comes from the reference's own ``per_token_loss`` and its derivatives
``g_lp = d loss / d logp_t``, ``g_h = d loss / d H_t`` from closed forms with the reference's autograd
conventions (all [T]-sized torch ops).  Only [T]-sized statistics are saved (plus the logits tensor itself).
Backward: the ``grad`` kernel streams the logits again and writes ``dlogits`` for this rank's shard.

The extension is ``megaprorl._C_policy_loss`` when setup.py built it, else compiled on first use with
``torch.utils.cpp_extension.load`` (nvcc and ninja needed) into ``$MEGAPRORL_CUDA_BUILD_DIR`` or
``~/.cache/megaprorl/torch_extensions/<torch version>``.  See docs/cuda_kernel.md.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sysconfig
import threading
from collections import namedtuple
from pathlib import Path
from typing import Optional

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("bindings.cpp", "policy_loss.cu")
EXT_NAME = "megaprorl_policy_loss_cuda"  # JIT module name (the setup.py build is megaprorl._C_policy_loss)

# Flags of the real build (setup.py uses the same; torch adds -std=c++20 and COMMON_NVCC_FLAGS itself).
# No --use_fast_math: the kernels call __expf explicitly where its accuracy was checked (the streamed
# elements) and keep precise expf / division / denormals everywhere else.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3"]
# Release architectures: Ampere and Hopper SASS plus compute_90 PTX for newer GPUs.
GENCODE_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                 "-gencode=arch=compute_90,code=compute_90"]

CPU_TORCH_MESSAGE = ("the CUDA policy-loss extension needs a CUDA build of torch; on GPU machines "
                     "`pip install -e .[gpu]` or set MEGAPRORL_BUILD_CUDA=1")

_EXT = None
_EXT_LOCK = threading.Lock()
_SM_COUNT: dict = {}


# --------------------------------------------------------------------------------------------------
# Building / loading


def _build_dir() -> Path:
    env = os.environ.get("MEGAPRORL_CUDA_BUILD_DIR")
    if env:
        return Path(env)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", f"torch{torch.__version__}-cu{torch.version.cuda}")
    return Path.home() / ".cache" / "megaprorl" / "torch_extensions" / tag


def _jit_arch_flags() -> list:
    """TORCH_CUDA_ARCH_LIST when set (torch applies it), else SASS for the local GPU only (fast JIT)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    major, minor = torch.cuda.get_device_capability()
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def load_extension(verbose: Optional[bool] = None):
    """The compiled module (``stats``, ``grad``): prebuilt if installed, else JIT-compiled once per process."""
    global _EXT
    if _EXT is not None:
        return _EXT
    with _EXT_LOCK:
        if _EXT is not None:
            return _EXT
        try:
            from megaprorl import _C_policy_loss as ext  # built by setup.py
        except (ImportError, OSError):
            ext = None
        if ext is None:
            if torch.version.cuda is None:
                raise RuntimeError(CPU_TORCH_MESSAGE)
            from torch.utils.cpp_extension import CUDA_HOME, load

            if CUDA_HOME is None:
                raise RuntimeError("the CUDA policy-loss extension needs nvcc to compile (CUDA_HOME not found); "
                                   "install the CUDA toolkit or `pip install -e .[gpu]` on a machine that has it")
            if not torch.cuda.is_available():
                raise RuntimeError("the CUDA policy-loss extension needs a visible CUDA GPU")
            build = _build_dir()
            build.mkdir(parents=True, exist_ok=True)
            if verbose is None:
                verbose = os.environ.get("MEGAPRORL_CUDA_VERBOSE", "0") == "1"
            ext = load(name=EXT_NAME, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=CXX_FLAGS,
                       extra_cuda_cflags=NVCC_FLAGS + _jit_arch_flags(), extra_include_paths=[str(CSRC)],
                       build_directory=str(build), verbose=verbose)
        _EXT = ext
        return ext


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDA_HOME/bin, PATH, or /usr/local/cuda/bin; None when absent."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def find_cudart() -> Optional[str]:
    """Directory holding libcudart.so of the toolkit (for the CI link check); None when absent."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = find_nvcc()
    if nvcc is not None:
        homes.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (Path(home) / lib / "libcudart.so").exists():
                return str(Path(home) / lib)
    return None


def build_commands(out_dir, archs=("80", "90"), nvcc: Optional[str] = None, cxx: str = "g++",
                   module_name: str = "_C_policy_loss") -> dict:
    """Build commands for CI on machines without a GPU (tests/test_csrc_compile.py), in ``out_dir``.

    ``nvcc``: policy_loss.cu -> policy_loss.o with the release flags (COMMON_NVCC_FLAGS, -O3, -std=c++20,
    one -gencode per arch in ``archs`` plus PTX for the last).  ``cxx``: bindings.cpp -> bindings.o against
    torch's and Python's headers with BuildExtension's defines.  ``link``: both objects -> the Python module
    ``module_name`` against libtorch (CPU wheel is enough: the glue uses no torch CUDA symbol) and libcudart.
    """
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths, library_paths

    out_dir = Path(out_dir)
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    nvcc_cmd = [nvcc or find_nvcc() or "nvcc", "-c", str(CSRC / "policy_loss.cu"), "-o",
                str(out_dir / "policy_loss.o"), *COMMON_NVCC_FLAGS, *NVCC_FLAGS, "-std=c++20",
                "--compiler-options", "-fPIC", abi, *inc, *gencode]
    cxx_cmd = [cxx, "-c", str(CSRC / "bindings.cpp"), "-o", str(out_dir / "bindings.o"), *CXX_FLAGS,
               "-std=c++20", "-fPIC", abi, "-DTORCH_API_INCLUDE_EXTENSION_H",
               f"-DTORCH_EXTENSION_NAME={module_name}", *inc]
    torch_lib = library_paths()[0]
    cudart = find_cudart() or "/usr/local/cuda/lib64"
    link_cmd = [cxx, "-shared", "-o", str(out_dir / (module_name + sysconfig.get_config_var("EXT_SUFFIX"))),
                str(out_dir / "bindings.o"), str(out_dir / "policy_loss.o"), f"-L{torch_lib}", "-lc10", "-ltorch",
                "-ltorch_cpu", "-ltorch_python", f"-L{cudart}", "-lcudart", f"-Wl,-rpath,{torch_lib}",
                f"-Wl,-rpath,{cudart}"]
    return {"nvcc": nvcc_cmd, "cxx": cxx_cmd, "link": link_cmd}


# --------------------------------------------------------------------------------------------------
# Forward / backward


def _current_stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _num_chunks(rows: int, vocab: int, device: torch.device) -> int:
    """Vocab chunks per row so that small T still fills the GPU (one CTA per (row, chunk))."""
    env = os.environ.get("MEGAPRORL_CUDA_VOCAB_CHUNKS")
    if env:
        return max(1, int(env))
    if device.type != "cuda":
        sms = 132
    else:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        sms = _SM_COUNT[idx]
    want = 4 * sms  # 2 resident CTAs per SM, 2 waves
    if rows >= want:
        return 1
    return max(1, min(math.ceil(want / max(rows, 1)), vocab // 4096))


def _merge(m: torch.Tensor, s: torch.Tensor, a: torch.Tensor, new_m: torch.Tensor):
    """Rescale partial (m, s, a) to the reference point new_m >= m (empty partials: s = 0, m = -inf)."""
    d = m - new_m
    e = torch.exp(d)
    a = torch.where(s > 0, e * (a + d * s), torch.zeros_like(a))
    return s * e, a


def _row_stats(ext, logits, tokens, vocab_start, tp_group):
    """(row_max, log_sum, mean_cent, logp, entropy), fp32 [T], over the whole (TP-sharded) vocabulary."""
    from megaprorl.kernels.torch_ref import tp_world_size

    pmax, psum, pcent, target = ext.stats(logits, tokens, int(vocab_start),
                                          _num_chunks(logits.shape[0], logits.shape[1], logits.device),
                                          _current_stream(logits))
    m = pmax.max(dim=1).values
    if pmax.shape[1] > 1:
        s, a = _merge(pmax, psum, pcent, m[:, None])
        s, a = s.sum(1), a.sum(1)
    else:
        s, a = psum[:, 0], pcent[:, 0]
    if tp_world_size(tp_group) > 1:
        import torch.distributed as dist

        local_m = m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        s, a = _merge(local_m, s, a, m)
        red = torch.stack([s, a, target])  # exactly one rank holds each row's target logit
        dist.all_reduce(red, op=dist.ReduceOp.SUM, group=tp_group)
        s, a, target = red.unbind(0)
    log_sum = torch.log(s)
    mean_cent = a / s  # E_p[z] - m
    logp = (target - m) - log_sum
    entropy = log_sum - mean_cent
    return m, log_sum, mean_cent, logp, entropy


def _in_closed(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """1.0 where lo <= x <= hi, else 0.0: the gradient mask of torch.clamp."""
    return ((x >= lo) & (x <= hi)).float()


def _token_terms(logp, entropy, old_logp, ref_logp, adv, weight, spec, need_grad: bool):
    """(loss, kl, g_lp, g_h) from fp32 [T] logp and entropy.

    Values come from the reference's own ``per_token_loss``.  The derivatives of ``sum(weight * loss_t)``
    w.r.t. logp_t (g_lp) and H_t (g_h, None when entropy_coef == 0) are written out in closed form with
    the reference's autograd conventions (tests/test_kernels_cuda_gpu.py checks them against autograd):
    torch.clamp passes gradient on its closed range; torch.where only to the branch taken, and the
    clipped branch is taken only where strictly larger; dual-clipped tokens and tokens outside the KL
    output clamp get none.
    """
    from megaprorl.algo.loss import per_token_loss

    parts = per_token_loss(logp, entropy, old_logp, ref_logp, adv, spec)
    loss = (parts["loss_t"] * weight).sum()
    kl = parts["kl"]
    if not need_grad:
        return loss, kl, None, None

    # Clipped surrogate.
    raw = logp - old_logp
    ratio = torch.exp(torch.clamp(raw, -spec.ratio_log_clamp, spec.ratio_log_clamp))
    lo, hi = 1.0 - spec.eps_low, 1.0 + spec.eps_high
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, lo, hi)
    take_clipped = clipped > unclipped
    pg = torch.where(take_clipped, clipped, unclipped)
    # d ratio / d logp = ratio on the closed log-ratio range; the clipped branch adds clamp's mask.
    d_pg = -adv * ratio * _in_closed(raw, -spec.ratio_log_clamp, spec.ratio_log_clamp)
    d_pg = torch.where(take_clipped, d_pg * _in_closed(ratio, lo, hi), d_pg)
    if spec.dual_clip is not None:
        dual = (adv < 0) & (pg > -adv * spec.dual_clip)
        d_pg = torch.where(dual, torch.zeros_like(d_pg), d_pg)
    d_loss = d_pg

    # KL penalty: d = clamp(ref - logp), so dd/dlogp = -1 on the closed range.
    if ref_logp is not None and spec.kl_coef != 0.0:
        c, oc = spec.kl_log_ratio_clamp, spec.kl_output_clamp
        raw_d = ref_logp - logp
        d = torch.clamp(raw_d, -c, c)
        if spec.kl_estimator == "k1":
            k, dk = -d, -torch.ones_like(d)
        elif spec.kl_estimator == "k2":
            k, dk = 0.5 * d * d, d
        else:  # k3
            e = torch.exp(d)
            k, dk = e - 1.0 - d, e - 1.0
        d_kl = -dk * _in_closed(raw_d, -c, c) * _in_closed(k, -oc, oc)
        d_loss = d_loss + spec.kl_coef * d_kl

    g_lp = weight * d_loss
    g_h = -spec.entropy_coef * weight if spec.entropy_coef != 0.0 else None
    return loss, kl, g_lp, g_h


class _PolicyLossCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, old_logp, ref_logp, adv, weight, spec, tp_group, vocab_start, ext,
                inplace_backward):
        m, log_sum, mean_cent, logp, entropy = _row_stats(ext, logits, tokens, vocab_start, tp_group)
        loss, kl, g_lp, g_h = _token_terms(logp, entropy, old_logp, ref_logp, adv, weight, spec, need_grad=True)
        ctx.save_for_backward(logits, tokens, m, log_sum, mean_cent, g_lp, g_h)
        ctx.ext, ctx.vocab_start, ctx.inplace = ext, vocab_start, inplace_backward
        kl_out = kl if kl is not None else logp.new_empty(0)
        ctx.mark_non_differentiable(logp, entropy, kl_out)
        return loss, logp, entropy, kl_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _glogp, _gent, _gkl):
        logits, tokens, m, log_sum, mean_cent, g_lp, g_h = ctx.saved_tensors
        dlogits = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            scale = grad_loss.float()  # 0-dim, stays on device: no sync
            g_lp = g_lp * scale
            g_h = None if g_h is None else g_h * scale
            dlogits = logits if ctx.inplace else torch.empty_like(logits)
            ctx.ext.grad(logits, dlogits, tokens, int(ctx.vocab_start), m, log_sum, mean_cent, g_lp, g_h,
                         _num_chunks(logits.shape[0], logits.shape[1], logits.device), _current_stream(logits))
        return dlogits, None, None, None, None, None, None, None, None, None, None


def _output_type():
    try:
        from megaprorl.kernels import PolicyLossOutput
    except ImportError:  # standalone use before megaprorl.kernels exists
        PolicyLossOutput = namedtuple("PolicyLossOutput", ["loss", "logp", "entropy", "kl"])
    return PolicyLossOutput


def policy_loss_cuda(logits: torch.Tensor, tokens: torch.Tensor, old_logp: torch.Tensor,
                     ref_logp: Optional[torch.Tensor], adv: torch.Tensor, weight: torch.Tensor, spec, *,
                     tp_group=None, vocab_start_index: int = 0, inplace_backward: bool = False):
    """Fused per-token policy loss on CUDA logits [T, V_local] (fp32 / fp16 / bf16).

    Returns ``PolicyLossOutput(loss, logp, entropy, kl)``, the semantics of
    ``megaprorl.algo.loss.policy_loss_from_logits``.  Under tensor parallelism pass the TP group and
    this rank's ``vocab_start_index``: results equal TP=1 and backward writes this rank's shard.
    ``inplace_backward=True`` writes the gradient over the logits buffer in backward (saves a [T, V]
    buffer; the logits must not be used afterwards).  Tokens outside [0, V) are not checked (no
    device sync): their target logit counts as 0.
    """
    out_type = _output_type()
    if logits.dim() != 2:
        raise ValueError(f"policy_loss_cuda: logits must be [T, V_local], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"policy_loss_cuda: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    n = logits.shape[0]

    def vec(t, name, dtype=torch.float32):
        t = t.detach().reshape(-1)
        if t.numel() != n:
            raise ValueError(f"policy_loss_cuda: {name} has {t.numel()} elements, logits have {n} rows")
        return t.to(device=logits.device, dtype=dtype).contiguous()

    tokens = vec(tokens, "tokens", torch.int64)
    old_logp, adv, weight = vec(old_logp, "old_logp"), vec(adv, "adv"), vec(weight, "weight")
    ref_logp = None if ref_logp is None else vec(ref_logp, "ref_logp")
    logits = logits.contiguous()
    ext = load_extension()

    if logits.requires_grad and torch.is_grad_enabled():
        loss, logp, entropy, kl = _PolicyLossCuda.apply(logits, tokens, old_logp, ref_logp, adv, weight, spec,
                                                        tp_group, int(vocab_start_index), ext, inplace_backward)
        kl = kl if ref_logp is not None else None
    else:  # no autograd graph wanted (e.g. evaluation, inference mode): values only
        with torch.no_grad():
            _, _, _, logp, entropy = _row_stats(ext, logits, tokens, vocab_start_index, tp_group)
            loss, kl, _, _ = _token_terms(logp, entropy, old_logp, ref_logp, adv, weight, spec, need_grad=False)
    return out_type(loss, logp, entropy, kl)


__all__ = ["policy_loss_cuda", "load_extension", "build_commands", "find_nvcc", "find_cudart",
           "CPU_TORCH_MESSAGE", "NVCC_FLAGS", "GENCODE_FLAGS", "CXX_FLAGS"]
