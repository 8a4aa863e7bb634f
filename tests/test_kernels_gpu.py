"""Policy-loss kernels on CUDA at realistic shapes (T=4096, V=151936 bf16; fused LM head H=1536),
compared with the fp32 torch reference of megaprorl.algo.loss.  Skipped without a GPU (conftest).

Stated tolerances (bf16 inputs, fp32 statistics):
  logits kernels (same bf16 logits as the reference): loss rel 1e-4; logp / entropy / kl abs 2e-3
    (fp32 summation order over 152K terms); dlogits (bf16 output) relative Frobenius error < 1e-2 and
    elementwise |err| <= 1e-2 * max|g| + 2^-7 |g|.
  fused LM head (bf16 matmul, logits rounded to bf16, vs fp32 hidden @ W^T): loss rel 2e-2; logp abs 0.1;
    d_hidden / d_weight relative Frobenius error < 4e-2 (H100, 2026-11-22: 3.03e-2 for d_hidden; the
    logits chunks are bf16 matmul outputs, as in any bf16 LM head, so p carries ~1e-2 relative error); extra memory < 1.5 GiB at T=4096.
"""

import math
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

T, V, H = 4096, 151936, 1536


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process (run the GPU tests in their own pytest process)")
    monkeypatch.delenv("MEGAPRORL_TRITON_BLOCK_V", raising=False)


def _spec(**kw):
    from megaprorl.algo.loss import LossSpec

    base = dict(eps_low=0.2, eps_high=0.28, kl_coef=1e-3, kl_estimator="k3", entropy_coef=1e-3, dual_clip=3.0)
    base.update(kw)
    return LossSpec(**base)


def _inputs(Tn=T, Vn=V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(Tn, Vn, generator=g, device="cuda") * 2.0).to(torch.bfloat16)
    tokens = torch.randint(0, Vn, (Tn,), generator=g, device="cuda")
    with torch.no_grad():
        z = logits.float()
        logp = z.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
        del z
    old = logp + 0.5 * torch.randn(Tn, generator=g, device="cuda")
    ref = logp + 0.5 * torch.randn(Tn, generator=g, device="cuda")
    adv = torch.randn(Tn, generator=g, device="cuda")
    w = (torch.rand(Tn, generator=g, device="cuda") > 0.1).float() / Tn  # ~10% masked tokens
    return logits, tokens, old, ref, adv, w


def _reference(logits, tokens, old, ref, adv, w, spec):
    from megaprorl.algo.loss import policy_loss_from_logits

    x = logits.detach().float().requires_grad_(True)
    loss, logp, ent, kl = policy_loss_from_logits(x, tokens, old, ref, adv, w, spec)
    loss.backward()
    return loss.detach(), logp.detach(), ent.detach(), kl.detach() if kl is not None else None, x.grad


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _check_logits_out(out, grad, r):
    loss, logp, ent, kl, rg = r
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.logp, logp, rtol=0, atol=2e-3)
    torch.testing.assert_close(out.entropy, ent, rtol=0, atol=2e-3)
    if kl is not None:
        torch.testing.assert_close(out.kl, kl, rtol=0, atol=2e-3)
    assert grad.dtype == torch.bfloat16
    assert _rel(grad, rg) < 1e-2
    err = (grad.float() - rg).abs()
    assert bool((err <= 1e-2 * rg.abs().max() + 2 ** -7 * rg.abs()).all())


@pytest.mark.parametrize("grad_mode", ["recompute", "forward", "inplace"])
def test_triton_logits_bf16_realistic(grad_mode):
    from megaprorl.kernels import policy_loss

    spec = _spec()
    inp = _inputs()
    r = _reference(*inp, spec)
    x = inp[0].detach().clone().requires_grad_(True)
    src = x * 1 if grad_mode == "inplace" else x
    out = policy_loss(src, *inp[1:], spec, backend="triton", grad_mode=grad_mode)
    out.loss.backward()
    _check_logits_out(out, x.grad, r)


def test_auto_is_triton_on_cuda_and_handles_awkward_rows():
    from megaprorl.kernels import policy_loss

    spec = _spec(kl_estimator="k2", kl_log_ratio_clamp=1.0, kl_output_clamp=0.3, ratio_log_clamp=2.0)
    logits, tokens, old, ref, adv, w = _inputs(Tn=512, Vn=50000 + 17, seed=3)
    logits[:8] = 1e4 * torch.sign(logits[:8].float()).to(logits.dtype)  # huge logits
    old[8:64] += torch.linspace(-30, 30, 56, device="cuda")  # ratios far outside the clip range
    ref[64:128] += 5.0  # KL clamps active
    w[128:192] = 0  # masked
    r = _reference(logits, tokens, old, ref, adv, w, spec)
    x = logits.detach().clone().requires_grad_(True)
    out = policy_loss(x, tokens, old, ref, adv, w, spec)  # auto -> triton on CUDA
    out.loss.backward()
    ok = torch.ones(512, dtype=torch.bool, device="cuda")
    ok[:8] = False  # the fp32 reference's entropy cancels at |z| = 1e4; compare those rows' logp only
    torch.testing.assert_close(out.loss, r[0], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(out.logp, r[1], rtol=1e-6, atol=2e-3)
    torch.testing.assert_close(out.entropy[ok], r[2][ok], rtol=0, atol=2e-3)
    assert torch.all(x.grad[128:192] == 0)
    assert _rel(x.grad[ok], r[4][ok]) < 1e-2


def test_fused_lm_head_realistic():
    from megaprorl.algo.loss import policy_loss_from_logits
    from megaprorl.kernels import policy_loss_lm_head

    spec = _spec()
    g = torch.Generator(device="cuda").manual_seed(7)
    hidden = (torch.randn(T, H, generator=g, device="cuda")).to(torch.bfloat16)
    W = (torch.randn(V, H, generator=g, device="cuda") / math.sqrt(H) * 2).to(torch.bfloat16)
    tokens = torch.randint(0, V, (T,), generator=g, device="cuda")
    with torch.no_grad():
        z = hidden.float() @ W.float().t()
        logp = z.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
        del z
    old = logp + 0.3 * torch.randn(T, generator=g, device="cuda")
    ref = logp + 0.3 * torch.randn(T, generator=g, device="cuda")
    adv = torch.randn(T, generator=g, device="cuda")
    w = torch.full((T,), 1.0 / T, device="cuda")

    h1, W1 = hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = policy_loss_lm_head(h1, W1, tokens, old, ref, adv, w, spec, backend="triton", token_chunk=2048)
    out.loss.backward()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    assert extra < 1.5, f"fused LM head used {extra:.2f} GiB extra"

    h2, W2 = hidden.float().requires_grad_(True), W.float().requires_grad_(True)
    loss, logp_r, ent_r, kl_r = policy_loss_from_logits(h2 @ W2.t(), tokens, old, ref, adv, w, spec)
    loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(out.logp, logp_r.detach(), rtol=0, atol=0.1)
    assert _rel(out.logp, logp_r.detach()) < 1e-2
    assert _rel(h1.grad, h2.grad) < 4e-2
    assert _rel(W1.grad, W2.grad) < 4e-2


def test_cuda_extension_backend():
    from megaprorl.kernels import policy_loss

    try:
        import megaprorl.kernels.cuda_ext  # noqa: F401
    except Exception as e:  # not silently passing: the skip carries the reason
        pytest.skip(f"CUDA extension unavailable ({type(e).__name__}: {e}); build with MEGAPRORL_BUILD_CUDA=1 "
                    "pip install -e .[gpu]")
    spec = _spec()
    inp = _inputs(seed=5)
    r = _reference(*inp, spec)
    x = inp[0].detach().clone().requires_grad_(True)
    out = policy_loss(x, *inp[1:], spec, backend="cuda")
    out.loss.backward()
    _check_logits_out(out, x.grad, r)
