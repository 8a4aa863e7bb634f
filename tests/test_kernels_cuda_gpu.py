"""The CUDA C++ policy-loss backend (megaprorl/kernels/cuda_ext.py, csrc/) against the torch reference.

GPU tests (marked ``gpu``, skipped without CUDA by conftest) JIT-build the real extension
(torch.utils.cpp_extension.load: nvcc + ninja) and compare it with ``megaprorl.algo.loss``:
  fp32 logits: loss / logp / entropy / kl ``atol 2e-5, rtol 1e-5``; dlogits ``atol 1e-5 * max|g|,
    rtol 1e-4`` (the stats kernel uses __expf, ~2 ulp near 0);
  fp16 / bf16 logits (the reference sees the same rounded logits in fp32): stats as fp32, dlogits
    (rounded to the logits dtype) ``rtol 1e-2`` / ``8e-3`` elementwise plus a small absolute floor;
  logits of +-1e4 against an fp64 evaluation of the reference (the fp32 reference's entropy cancels);
  T=4096, V=151936 bf16 with the tolerances of tests/test_kernels_gpu.py.

CPU tests (unmarked) check the host side without a GPU: the closed-form per-token derivatives against
autograd of the reference, and the whole autograd.Function, chunk merge, TP=2 merge (gloo) and
in-place backward with the two kernels emulated in torch (``EmulatedExt``, same interface and
semantics as csrc/bindings.cpp).
"""

import math
from types import SimpleNamespace

import pytest
import torch

from megaprorl.algo.loss import LossSpec, per_token_loss, policy_loss_from_logits
from megaprorl.kernels import cuda_ext

from dist_utils import run_distributed

F32 = dict(atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# helpers


def chunk_geometry(vocab, requested):
    """Mirror of policy_loss_chunk_geometry in csrc/policy_loss.h."""
    requested = min(max(int(requested), 1), 65535)
    n = -(-vocab // requested)
    n = max(8, -(-n // 8) * 8)
    return n, -(-vocab // n)


class EmulatedExt:
    """The ``stats`` / ``grad`` kernels of csrc/ written in torch (fp32), for CPU tests of the host side."""

    def stats(self, logits, tokens, vocab_start, num_chunks, stream):
        T, V = logits.shape
        n, C = chunk_geometry(V, num_chunks)
        z = logits.float()
        pm = torch.full((T, C), -math.inf)
        ps, pa = torch.zeros(T, C), torch.zeros(T, C)
        for c in range(C):
            zc = z[:, c * n:(c + 1) * n]
            m = zc.max(1).values
            d = zc - m[:, None]
            e = torch.exp(d)
            pm[:, c], ps[:, c], pa[:, c] = m, e.sum(1), (e * d).sum(1)
        local = tokens - vocab_start
        ok = (local >= 0) & (local < V)
        target = torch.where(ok, z.gather(1, local.clamp(0, V - 1)[:, None])[:, 0], torch.zeros(T))
        return [pm, ps, pa, target]

    def grad(self, logits, dlogits, tokens, vocab_start, row_max, log_sum, mean_cent, g_lp, g_h, num_chunks,
             stream):
        T, V = logits.shape
        z = logits.float()
        zc = z - row_max[:, None]
        p = torch.exp(zc - log_sum[:, None])
        gh = torch.zeros_like(g_lp) if g_h is None else g_h
        g = -p * (g_lp[:, None] + gh[:, None] * (zc - mean_cent[:, None]))
        local = tokens - vocab_start
        rows = torch.nonzero((local >= 0) & (local < V)).squeeze(-1)
        g[rows, local[rows]] += g_lp[rows]
        g[(g_lp == 0) & (gh == 0)] = 0.0
        dlogits.copy_(g.to(dlogits.dtype))


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_EXT", EmulatedExt())


def make_inputs(T=37, V=203, seed=0, device="cpu", dtype=torch.float32, scale=2.0, spread=0.5):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(T, V, generator=g, device=device) * scale).to(dtype)
    tokens = torch.randint(0, V, (T,), generator=g, device=device)
    with torch.no_grad():
        z = logits.float()
        logp = z.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
        del z
    old = logp + spread * torch.randn(T, generator=g, device=device)
    ref = logp + spread * torch.randn(T, generator=g, device=device)
    adv = torch.randn(T, generator=g, device=device)
    w = (torch.rand(T, generator=g, device=device) > 0.15).float() / T  # ~15% masked
    return logits, tokens, old, ref, adv, w


def reference(logits, tokens, old, ref, adv, w, spec, dtype=torch.float32):
    x = logits.detach().to(dtype).requires_grad_(True)
    loss, logp, ent, kl = policy_loss_from_logits(x, tokens, old.to(dtype), None if ref is None else ref.to(dtype),
                                                  adv.to(dtype), w.to(dtype), spec)
    loss.backward()
    return (loss.detach().float(), logp.detach().float(), ent.detach().float(),
            None if kl is None else kl.detach().float(), x.grad.float())


def run_cuda_backend(logits, tokens, old, ref, adv, w, spec, scale=1.0, **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = cuda_ext.policy_loss_cuda(x, tokens, old, ref, adv, w, spec, **kw)
    (out.loss * scale).backward()
    return out, x.grad


def assert_stats(out, r, **tol):
    tol = tol or F32
    torch.testing.assert_close(out.loss, r[0], **tol)
    torch.testing.assert_close(out.logp, r[1], **tol)
    torch.testing.assert_close(out.entropy, r[2], **tol)
    if r[3] is None:
        assert out.kl is None
    else:
        torch.testing.assert_close(out.kl, r[3], **tol)


def assert_grad(grad, ref_grad, rtol=1e-4, atol_rel=1e-5):
    torch.testing.assert_close(grad.float(), ref_grad, rtol=rtol, atol=atol_rel * ref_grad.abs().max().item() + 1e-30)


SPECS = {
    "default-k3-dual-ent": LossSpec(eps_low=0.2, eps_high=0.28, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
                                    dual_clip=3.0),
    "k1": LossSpec(eps_low=0.2, eps_high=0.4, kl_coef=0.05, kl_estimator="k1"),
    "k2-tight-clamps": LossSpec(kl_coef=0.2, kl_estimator="k2", kl_log_ratio_clamp=0.3, kl_output_clamp=0.02,
                                ratio_log_clamp=0.5, entropy_coef=-0.02),
    "pg-only": LossSpec(),
}


# --------------------------------------------------------------------------------------------------
# CPU: host-side math and plumbing (kernels emulated)


@pytest.mark.parametrize("name", list(SPECS))
def test_closed_form_token_grads_match_autograd(name):
    spec = SPECS[name]
    T = 4000
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(T, generator=g) * 8
    old = logp + torch.randn(T, generator=g) * 0.6
    old[:200] = logp[:200]  # ratio exactly 1
    old[200:400] = logp[200:400] + 40 * torch.randn(200, generator=g)  # beyond the log-ratio clamp
    ref = logp + torch.randn(T, generator=g) * 0.8
    ref[400:500] = logp[400:500]
    ref[500:600] = logp[500:600] + 30.0  # beyond the KL clamps
    adv = torch.randn(T, generator=g)
    adv[600:700] = 0.0
    adv[700:900] = -3.0  # dual clip active for large ratios
    w = torch.rand(T, generator=g) / T
    ent = torch.rand(T, generator=g) * 3

    lp = logp.clone().requires_grad_(True)
    h = ent.clone().requires_grad_(True)
    parts = per_token_loss(lp, h, old, ref, adv, spec)
    loss = (parts["loss_t"] * w).sum()
    loss.backward()
    got_loss, got_kl, g_lp, g_h = cuda_ext._token_terms(logp, ent, old, ref, adv, w, spec, need_grad=True)
    torch.testing.assert_close(got_loss, loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(got_kl, parts["kl"].detach(), rtol=0, atol=0)
    # rounding differs where the clip and KL terms nearly cancel: absolute floor relative to the largest
    torch.testing.assert_close(g_lp, lp.grad, rtol=1e-6, atol=1e-6 * lp.grad.abs().max().item())
    if spec.entropy_coef == 0:
        assert g_h is None
    else:
        torch.testing.assert_close(g_h, h.grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("chunks", ["1", "5"])
@pytest.mark.parametrize("name", list(SPECS))
def test_function_with_emulated_kernels(name, chunks, emulated, monkeypatch):
    monkeypatch.setenv("MEGAPRORL_CUDA_VOCAB_CHUNKS", chunks)
    spec = SPECS[name]
    inp = make_inputs(seed=3)
    out, grad = run_cuda_backend(*inp, spec, scale=2.5)
    r = reference(*inp, spec)
    assert_stats(out, r)
    assert_grad(grad, 2.5 * r[4])
    assert torch.all(grad[inp[5] == 0] == 0)
    # no ref_logp: kl is None
    out2, grad2 = run_cuda_backend(*inp[:3], None, *inp[4:], LossSpec(entropy_coef=0.01))
    r2 = reference(*inp[:3], None, *inp[4:], LossSpec(entropy_coef=0.01))
    assert_stats(out2, r2)
    assert_grad(grad2, r2[4])


def test_function_inplace_no_grad_and_dispatch(emulated):
    from megaprorl.kernels import policy_loss

    spec = SPECS["default-k3-dual-ent"]
    inp = make_inputs(seed=5)
    r = reference(*inp, spec)
    x = inp[0].clone().requires_grad_(True)
    src = x * 1.0  # the in-place backward overwrites this intermediate buffer
    out = cuda_ext.policy_loss_cuda(src, *inp[1:], spec, inplace_backward=True)
    out.loss.backward()
    assert_stats(out, r)
    assert_grad(x.grad, r[4])
    with torch.no_grad():
        out = cuda_ext.policy_loss_cuda(inp[0], *inp[1:], spec)
    assert_stats(out, r)
    out = policy_loss(inp[0].clone().requires_grad_(True), *inp[1:], spec, backend="cuda")
    assert_stats(out, r)
    assert type(out).__name__ == "PolicyLossOutput"
    # the entry point's grad_mode='inplace' (the trainer's default) is the in-place backward here
    x = inp[0].clone().requires_grad_(True)
    src = x * 1.0
    out = policy_loss(src, *inp[1:], spec, backend="cuda", grad_mode="inplace")
    out.loss.backward()
    assert_grad(x.grad, r[4])
    assert torch.equal(src.detach(), x.grad)  # the gradient was written over the logits buffer


def test_load_extension_needs_cuda_torch(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_EXT", None)
    if torch.version.cuda is not None:
        pytest.skip("CUDA build of torch: the extension can build here")
    with pytest.raises(RuntimeError, match="needs a CUDA build of torch"):
        cuda_ext.load_extension()


def _tp_worker(rank, world, splits, inputs, spec, chunks):
    import os

    import torch.distributed as dist

    os.environ["MEGAPRORL_CUDA_VOCAB_CHUNKS"] = chunks
    cuda_ext._EXT = EmulatedExt()
    group = dist.new_group(list(range(world)))
    logits, tokens, old, ref, adv, w = inputs
    lo, hi = splits[rank], splits[rank + 1]
    x = logits[:, lo:hi].clone().requires_grad_(True)
    out = cuda_ext.policy_loss_cuda(x, tokens, old, ref, adv, w, spec, tp_group=group, vocab_start_index=lo)
    out.loss.backward()
    return {"loss": out.loss.detach(), "logp": out.logp, "entropy": out.entropy, "kl": out.kl, "grad": x.grad}


def test_tensor_parallel_tp2_equals_tp1_emulated():
    spec = SPECS["default-k3-dual-ent"]
    T, V = 14, 257
    inputs = make_inputs(T=T, V=V, seed=31)
    inputs[1][:4] = torch.tensor([0, 127, 128, 256])  # targets at both shard edges
    splits = [0, 128, V]
    res = run_distributed(_tp_worker, 2, (splits, inputs, spec, "3"))
    r = reference(*inputs, spec)
    for rr in res:
        assert_stats(SimpleNamespace(**rr), r)
    assert_grad(torch.cat([rr["grad"] for rr in res], 1), r[4])


# --------------------------------------------------------------------------------------------------
# GPU: the real extension (JIT-built on first use)


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return cuda_ext.load_extension(verbose=False)


def _aligned_copy(x, offset):
    """A contiguous copy of x whose data starts `offset` elements past a 16-byte boundary."""
    buf = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    y = buf[offset:].view_as(x)
    y.copy_(x)
    return y


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("chunks", [None, "7"])
def test_gpu_fp32_awkward(ext, name, chunks, monkeypatch):
    if chunks:
        monkeypatch.setenv("MEGAPRORL_CUDA_VOCAB_CHUNKS", chunks)
    spec = SPECS[name]
    T, V = 300, 50000 + 17  # V not a multiple of 8: every row has a different 16-byte phase
    logits, tokens, old, ref, adv, w = make_inputs(T=T, V=V, seed=11, device="cuda")
    old[:64] += torch.linspace(-30, 30, 64, device="cuda")  # ratios far outside the clip range
    ref[64:128] += 5.0  # KL clamps active
    adv[128:160] = -2.0  # dual clip (with large ratios below)
    old[128:160] -= 3.0
    w[160:200] = 0  # masked
    tokens[200] = 0
    tokens[201] = V - 1  # first / last vocabulary entries
    inp = (logits, tokens, old, ref, adv, w)
    r = reference(*inp, spec)
    out, grad = run_cuda_backend(*inp, spec, scale=3.0)
    assert_stats(out, r)
    assert_grad(grad, 3.0 * r[4])
    assert torch.all(grad[160:200] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [1, 3])
def test_gpu_misaligned_rows_and_inplace(ext, offset):
    spec = SPECS["default-k3-dual-ent"]
    logits, tokens, old, ref, adv, w = make_inputs(T=64, V=4096 + 8, seed=12, device="cuda")
    r = reference(logits, tokens, old, ref, adv, w, spec)
    # in place: misaligned logits, gradient written over them (same 16-byte phase: vector path + head)
    leaf = logits.clone().requires_grad_(True)
    src = _aligned_copy(leaf * 1.0, offset)  # non-leaf misaligned buffer, overwritten in backward
    assert src.data_ptr() % 16 != 0
    out = cuda_ext.policy_loss_cuda(src, tokens, old, ref, adv, w, spec, inplace_backward=True)
    out.loss.backward()
    assert_stats(out, r)
    assert_grad(leaf.grad, r[4])
    # misaligned logits, fresh (aligned) gradient buffer: different phases, scalar path
    x = _aligned_copy(logits, offset).requires_grad_(True)
    out = cuda_ext.policy_loss_cuda(x, tokens, old, ref, adv, w, spec)
    out.loss.backward()
    assert_stats(out, r)
    assert_grad(x.grad, r[4])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,grad_rtol", [(torch.float16, 1e-2), (torch.bfloat16, 8e-3)])
def test_gpu_half_precision(ext, dtype, grad_rtol):
    spec = SPECS["default-k3-dual-ent"]
    logits, tokens, old, ref, adv, w = make_inputs(T=256, V=32000 + 5, seed=13, device="cuda", dtype=dtype)
    r = reference(logits, tokens, old, ref, adv, w, spec)
    out, grad = run_cuda_backend(logits, tokens, old, ref, adv, w, spec)
    assert grad.dtype == dtype
    assert_stats(out, r)
    err = (grad.float() - r[4]).abs()
    assert bool((err <= grad_rtol * r[4].abs() + 1e-3 * r[4].abs().max()).all())


@pytest.mark.gpu
def test_gpu_huge_logits_against_fp64(ext):
    spec = SPECS["default-k3-dual-ent"]
    logits, tokens, old, ref, adv, w = make_inputs(T=128, V=20000 + 3, seed=14, device="cuda",
                                                   dtype=torch.bfloat16)
    logits[:16] = (1e4 * torch.sign(logits[:16].float())).to(torch.bfloat16)
    logits[16:32] = (logits[16:32].float() * 5e3).to(torch.bfloat16)
    r = reference(logits, tokens, old.double(), ref.double(), adv.double(), w.double(), spec, dtype=torch.float64)
    out, grad = run_cuda_backend(logits, tokens, old, ref, adv, w, spec)
    torch.testing.assert_close(out.logp, r[1], rtol=1e-5, atol=2e-3)
    # |z| = 1e4 rows: __expf on the streamed elements; H100 measured 3.7e-3 (relative 4e-4) at entropy ~9
    torch.testing.assert_close(out.entropy, r[2], rtol=0, atol=5e-3)
    torch.testing.assert_close(out.loss, r[0], rtol=1e-4, atol=1e-6)
    rel = ((grad.float() - r[4]).norm() / r[4].norm()).item()
    assert rel < 1e-2


@pytest.mark.gpu
def test_gpu_small_t_dispatch_and_no_grad(ext):
    from megaprorl.kernels import policy_loss

    spec = SPECS["k2-tight-clamps"]
    inp = make_inputs(T=3, V=151936, seed=15, device="cuda")  # few rows: many vocab chunks per row
    r = reference(*inp, spec)
    x = inp[0].clone().requires_grad_(True)
    out = policy_loss(x, *inp[1:], spec, backend="cuda")
    out.loss.backward()
    assert_stats(out, r)
    assert_grad(x.grad, r[4])
    with torch.inference_mode():
        out = cuda_ext.policy_loss_cuda(inp[0], *inp[1:], spec)
    assert_stats(out, r)
    empty = cuda_ext.policy_loss_cuda(inp[0][:0], *(t[:0] for t in inp[1:]), spec)
    assert empty.loss.item() == 0 and empty.logp.numel() == 0


@pytest.mark.gpu
def test_gpu_realistic_bf16(ext):
    """T=4096, V=151936 bf16 against the fp32 reference (tolerances of tests/test_kernels_gpu.py)."""
    spec = LossSpec(eps_low=0.2, eps_high=0.28, kl_coef=1e-3, kl_estimator="k3", entropy_coef=1e-3, dual_clip=3.0)
    T, V = 4096, 151936
    inp = make_inputs(T=T, V=V, seed=0, device="cuda", dtype=torch.bfloat16)
    r = reference(*inp, spec)
    out, grad = run_cuda_backend(*inp, spec)
    torch.testing.assert_close(out.loss, r[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.logp, r[1], rtol=0, atol=2e-3)
    torch.testing.assert_close(out.entropy, r[2], rtol=0, atol=2e-3)
    torch.testing.assert_close(out.kl, r[3], rtol=0, atol=2e-3)
    assert grad.dtype == torch.bfloat16
    rg = r[4]
    assert ((grad.float() - rg).norm() / rg.norm()).item() < 1e-2
    err = (grad.float() - rg).abs()
    assert bool((err <= 1e-2 * rg.abs().max() + 2 ** -7 * rg.abs()).all())
