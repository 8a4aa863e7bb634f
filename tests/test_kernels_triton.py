"""Triton policy-loss kernels against the torch reference in megaprorl.algo.loss.

Without CUDA the kernels run on CPU tensors under the Triton interpreter: TRITON_INTERPRET=1 must be
set before triton is first imported in the process (triton 3.x jits its own standard library at
import), so it is set here at import time; if triton was already imported without it, the module is
skipped with that reason (tests/conftest.py may set it first).  With CUDA the same awkward cases run
compiled on the GPU.  Small vocab blocks (MEGAPRORL_TRITON_BLOCK_V=128) make every row span several
chunks, with V not a multiple of the block.  The TP=2 test runs gloo children on CPU (interpreter).
"""

import os
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_FORCE = os.environ.get("MEGAPRORL_TEST_FORCE_INTERPRET") == "1"  # set for the gloo children
_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if DEVICE == "cpu" or _FORCE:
    DEVICE = "cpu"
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from megaprorl.algo.loss import LossSpec, per_token_loss, policy_loss_from_logits  # noqa: E402
from megaprorl.kernels import policy_loss, policy_loss_lm_head  # noqa: E402
from megaprorl.kernels.torch_ref import vocab_parallel_logp_entropy  # noqa: E402

from dist_utils import run_distributed  # noqa: E402

if DEVICE == "cpu" and _LATE:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set (run this file on its own, or set "
                "TRITON_INTERPRET=1 in tests/conftest.py when there is no CUDA)", allow_module_level=True)

CHILD_ENV = {"TRITON_INTERPRET": "1", "MEGAPRORL_TRITON_BLOCK_V": "128", "MEGAPRORL_TEST_FORCE_INTERPRET": "1"}


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setenv("MEGAPRORL_TRITON_BLOCK_V", "128")


F32 = dict(atol=2e-5, rtol=1e-5)  # fp32 values and gradients vs the fp32 reference


def make_inputs(T=24, V=300, seed=0, scale=3.0, dtype=torch.float32, ratio_spread=0.3, ref_spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, V, generator=g) * scale).to(dtype)
    tokens = torch.randint(0, V, (T,), generator=g)
    with torch.no_grad():
        logp, _ = _logp_ent64(logits, tokens)
    old = (logp + ratio_spread * torch.randn(T, generator=g, dtype=torch.float64)).float()
    ref = (logp + ref_spread * torch.randn(T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(T, generator=g)
    w = torch.rand(T, generator=g) / T
    return tuple(t.to(DEVICE) for t in (logits, tokens, old, ref, adv, w))


def _logp_ent64(logits, tokens):
    z = logits.double()
    lse = torch.logsumexp(z, -1)
    lp_all = z - lse[:, None]
    p = lp_all.exp()
    return lp_all.gather(-1, tokens[:, None]).squeeze(-1), -(p * lp_all).sum(-1)


def reference(logits, tokens, old, ref, adv, w, spec, f64=False):
    """(loss, logp, entropy, kl, dlogits) of the algo reference (fp32, or fp64 for extreme logits)."""
    x = logits.detach().clone().requires_grad_(True)
    if f64:
        logp, ent = _logp_ent64(x, tokens)
        parts = per_token_loss(logp, ent, old.double(), None if ref is None else ref.double(), adv.double(), spec)
        loss, kl = (parts["loss_t"] * w.double()).sum(), parts["kl"]
    else:
        loss, logp, ent, kl = policy_loss_from_logits(x, tokens, old, ref, adv, w, spec)
    loss.backward()
    return loss.detach(), logp.detach(), ent.detach(), None if kl is None else kl.detach(), x.grad


def run_triton(logits, tokens, old, ref, adv, w, spec, grad_mode="recompute", grad_scale=1.0):
    x = logits.detach().clone().requires_grad_(True)
    inp = x * 1 if grad_mode == "inplace" else x  # in place overwrites its input: give it a copy
    out = policy_loss(inp, tokens, old, ref, adv, w, spec, backend="triton", grad_mode=grad_mode)
    (out.loss * grad_scale).backward()
    return out, x.grad


def assert_close(out, grad, refres, tol=F32, grad_tol=None):
    loss, logp, ent, kl, rgrad = refres
    torch.testing.assert_close(out.loss.double(), loss.double(), **tol)
    torch.testing.assert_close(out.logp.double(), logp.double(), **tol)
    torch.testing.assert_close(out.entropy.double(), ent.double(), **tol)
    if kl is None:
        assert out.kl is None
    else:
        torch.testing.assert_close(out.kl.double(), kl.double(), **tol)
    for t in (out.logp, out.entropy):
        assert t.dtype == torch.float32 and not t.requires_grad
    torch.testing.assert_close(grad.double(), rgrad.double(), **(grad_tol or tol))


@pytest.mark.parametrize("grad_mode", ["recompute", "forward", "inplace"])
def test_matches_reference_all_terms(grad_mode):
    spec = LossSpec(eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    inp = make_inputs(ratio_spread=0.5)
    out, grad = run_triton(*inp, spec, grad_mode=grad_mode)
    assert grad.dtype == torch.float32
    assert_close(out, grad, reference(*inp, spec))


@pytest.mark.parametrize("grad_mode", ["recompute", "forward"])
def test_grad_output_scaling(grad_mode):
    spec = LossSpec(kl_coef=0.05, entropy_coef=0.02)
    inp = make_inputs(T=9, V=200, seed=3)
    out, grad = run_triton(*inp, spec, grad_mode=grad_mode, grad_scale=-2.5)
    r = reference(*inp, spec)
    torch.testing.assert_close(grad, -2.5 * r[4], **F32)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators_with_active_clamps(est):
    # |ref - logp| up to ~6 > kl_log_ratio_clamp = 2.5; k3 / k2 exceed kl_output_clamp = 1.5 on some tokens
    spec = LossSpec(kl_coef=0.7, kl_estimator=est, kl_log_ratio_clamp=2.5, kl_output_clamp=1.5)
    inp = make_inputs(T=20, V=260, seed=11, ref_spread=3.0)
    logits, tokens, old, ref, adv, w = inp
    with torch.no_grad():
        lp, _ = _logp_ent64(logits, tokens)
    d = (ref.double() - lp)
    assert (d.abs() > 2.5).any() and (d.abs() < 2.5).any()
    out, grad = run_triton(*inp, spec)
    assert_close(out, grad, reference(*inp, spec))


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_ratios_far_outside_clip_range(dual_clip):
    # log-ratios from -30 to +30 (ratio_log_clamp = 4 active on both sides), both advantage signs
    spec = LossSpec(eps_low=0.2, eps_high=0.4, dual_clip=dual_clip, ratio_log_clamp=4.0)
    T = 28
    logits, tokens, _, ref, _, w = make_inputs(T=T, V=230, seed=5)
    with torch.no_grad():
        lp, _ = _logp_ent64(logits, tokens)
    offs = torch.tensor([-30.0, -5.0, -1.0, -0.3, -0.05, 0.0, 0.05, 0.3, 1.0, 5.0, 30.0, 0.5, -0.5, 2.0],
                        dtype=torch.float64)
    old = (lp - offs.to(DEVICE).repeat(2)).float()  # logp - old = offs
    adv = torch.tensor([1.0] * 14 + [-1.5] * 14, device=DEVICE)
    out, grad = run_triton(logits, tokens, old, ref, adv, w, spec)
    assert_close(out, grad, reference(logits, tokens, old, ref, adv, w, spec))


def test_masked_and_all_masked_rows():
    spec = LossSpec(kl_coef=0.1, entropy_coef=0.01)
    logits, tokens, old, ref, adv, w = make_inputs(T=16, V=210, seed=7)
    w[::3] = 0.0
    out, grad = run_triton(logits, tokens, old, ref, adv, w, spec)
    assert_close(out, grad, reference(logits, tokens, old, ref, adv, w, spec))
    assert torch.all(grad[::3] == 0)
    w0 = torch.zeros_like(w)
    out, grad = run_triton(logits, tokens, old, ref, adv, w0, spec, grad_mode="forward")
    assert out.loss.item() == 0.0 and torch.all(grad == 0)
    assert torch.isfinite(out.logp).all() and torch.isfinite(out.entropy).all()


def test_huge_logits_and_no_reference():
    # logits of +-1e4: compared with an fp64 evaluation of the reference (fp32 torch itself cancels in H)
    spec = LossSpec(entropy_coef=0.01, dual_clip=3.0)
    logits, tokens, old, _, adv, w = make_inputs(T=12, V=190, seed=9)
    logits[0::2] = torch.sign(logits[0::2]) * 1e4
    logits[1::4, :50] = 1e4
    logits[3::4] = -1e4
    logits[3::4, 7] = -1e4 + 3.0
    with torch.no_grad():
        lp, _ = _logp_ent64(logits, tokens)
    old = (lp + 0.2 * torch.randn(12, dtype=torch.float64).to(DEVICE)).float()
    out, grad = run_triton(logits, tokens, old, None, adv, w, spec)
    assert out.kl is None
    assert torch.isfinite(grad).all()
    # logp ~ -2e4 on some rows carries fp32 output rounding (~1e-3 absolute, 1e-7 relative), and the
    # ratio exp(logp - old) inherits it, hence rtol 1e-3 on the gradient.  (The fp32 torch reference's
    # entropy is off by up to several nats here: logsumexp - sum(p*z) cancels at |z| ~ 1e4.)
    tol = dict(atol=1e-4, rtol=1e-5)
    assert_close(out, grad, reference(logits, tokens, old, None, adv, w, spec, f64=True), tol=tol,
                 grad_tol=dict(atol=1e-6, rtol=1e-3))


@pytest.mark.parametrize("prefetch", ["0", "1"])
def test_statistics_pass_with_and_without_prefetch(prefetch, monkeypatch):
    """Both forms of the statistics pass (next chunk loaded before or after this chunk's reduction)."""
    from triton_kernels.policy_loss import row_statistics

    monkeypatch.setenv("MEGAPRORL_TRITON_PREFETCH", prefetch)
    logits, tokens = make_inputs(T=9, V=300)[:2]  # 300 = 2 full blocks of 128 and a partial one
    stats = row_statistics(logits, tokens)
    z = logits.double()
    m = z.max(-1).values
    p = torch.softmax(z, -1)
    torch.testing.assert_close(stats[0].double(), m)
    torch.testing.assert_close(stats[1].double(), torch.exp(z - m[:, None]).sum(-1), rtol=1e-5, atol=0)
    torch.testing.assert_close((stats[2] / stats[1]).double(), (p * (z - m[:, None])).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[3].double(), z.gather(-1, tokens[:, None]).squeeze(-1))


@pytest.mark.parametrize("grad_mode", ["forward", "inplace"])
def test_entropy_deferred_to_the_gradient_pass(grad_mode, monkeypatch):
    """DEFER_ENTROPY: the statistics pass skips the p*z moment and the gradient pass accumulates it (only
    when the gradient is made in the forward call and does not need the entropy, entropy_coef == 0);
    entropy and everything else still equal the reference, masked rows included."""
    import triton_kernels.policy_loss as pl

    monkeypatch.setenv("MEGAPRORL_TRITON_DEFER_ENTROPY", "1")
    seen = []
    real = pl.row_statistics
    monkeypatch.setattr(pl, "row_statistics", lambda *a, **k: seen.append(k.get("entropy", True)) or real(*a, **k))
    spec = LossSpec(kl_coef=0.1, kl_estimator="k3", dual_clip=3.0)
    logits, tokens, old, ref, adv, w = make_inputs(T=17, V=300, seed=41, ratio_spread=0.5)
    w[::4] = 0.0  # masked rows: their entropy still comes from the gradient pass
    logits[5] = torch.sign(logits[5]) * 1e4
    inp = (logits, tokens, old, ref, adv, w)
    out, grad = run_triton(*inp, spec, grad_mode=grad_mode)
    assert seen == [False]
    assert_close(out, grad, reference(*inp, spec, f64=True), tol=dict(atol=1e-4, rtol=1e-5),
                 grad_tol=dict(atol=1e-6, rtol=1e-4))
    # not deferred where the gradient needs the entropy, or is made in backward
    seen.clear()
    run_triton(*inp, LossSpec(kl_coef=0.1, entropy_coef=0.01), grad_mode=grad_mode)
    run_triton(*inp, spec, grad_mode="recompute")
    assert seen == [True, True]
    # the fused LM head makes its gradient in the forward call: deferred there too
    seen.clear()
    g = torch.Generator().manual_seed(42)
    hidden = torch.randn(17, 16, generator=g).to(DEVICE)
    W = (torch.randn(300, 16, generator=g) * 0.5).to(DEVICE)
    h1, W1 = hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)
    o = policy_loss_lm_head(h1, W1, tokens, old, ref, adv, w, spec, backend="triton", token_chunk=8)
    o.loss.backward()
    assert seen == [False] * 3
    h2, W2 = hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, logp, ent, _ = policy_loss_from_logits(h2 @ W2.t(), tokens, old, ref, adv, w, spec)
    loss.backward()
    for a, b in ((o.loss, loss), (o.logp, logp), (o.entropy, ent), (h1.grad, h2.grad), (W1.grad, W2.grad)):
        torch.testing.assert_close(a, b.detach(), atol=5e-5, rtol=1e-4)


def test_bf16_logits():
    # bf16 logits: stats accumulate in fp32 (tight); the gradient is rounded to bf16 (rel 2^-8)
    spec = LossSpec(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    inp = make_inputs(T=16, V=300, seed=13, dtype=torch.bfloat16)
    out, grad = run_triton(*inp, spec)
    assert grad.dtype == torch.bfloat16
    r = reference(*inp, spec)
    assert_close(out, grad, r, tol=dict(atol=1e-5, rtol=1e-5),
                 grad_tol=dict(atol=1e-3 * r[4].abs().max().item(), rtol=8e-3))


def test_torch_backends_at_tp1():
    spec = LossSpec(kl_coef=0.1, entropy_coef=0.01)
    inp = make_inputs(T=10, V=100, seed=2)
    r = reference(*inp, spec)
    x = inp[0].clone().requires_grad_(True)
    out = policy_loss(x, *inp[1:], spec, backend="torch")
    out.loss.backward()
    assert_close(out, x.grad, r)
    # the vocab-parallel torch function on a single "shard" equals the reference too
    x = inp[0].clone().requires_grad_(True)
    lp, ent = vocab_parallel_logp_entropy(x, inp[1])
    parts = per_token_loss(lp, ent, inp[2], inp[3], inp[4], spec)
    (parts["loss_t"] * inp[5]).sum().backward()
    torch.testing.assert_close(x.grad, r[4], **F32)
    # auto on CPU tensors = torch
    out2 = policy_loss(inp[0], *inp[1:], spec)
    torch.testing.assert_close(out2.loss, r[0], **F32)


@pytest.mark.parametrize("pack_tokens", [0, 24])
def test_policy_train_step_with_triton_loss_in_each_grad_mode(pack_tokens, monkeypatch):
    """The trainer's loss on the Triton kernels inside Megatron's schedule: ``inplace`` writes the gradient
    over the model's logits (a view of what Megatron returns) in the loss's
    forward; it gives the same gradients as ``recompute`` and the torch loss, padded and packed."""
    import copy

    from test_packing import _batch
    from tiny_models import tiny_policy

    if DEVICE == "cuda":
        pytest.skip("the tiny policy runs on CPU; the GPU trainer path is covered by test_packing's bf16 test")
    pol, tok = tiny_policy(pack_tokens=pack_tokens)
    batch = _batch(tok, seed=4)
    spec = LossSpec(kl_coef=0.1, entropy_coef=0.01)
    state = copy.deepcopy(pol.model.state_dict())
    pol.optimizer.step_with_ready_grads = lambda: True  # compare gradients, not updates
    grads, stats = {}, {}
    for backend, mode, mbs in (("torch", "recompute", 3), ("triton", "recompute", 3), ("triton", "inplace", 3),
                               ("triton", "inplace", 1), ("triton", "forward", 3)):
        pol.model.load_state_dict(state)
        pol.kernel_backend, pol.loss_grad_mode = backend, mode
        stats[backend, mode, mbs] = pol.train_step(batch, spec, micro_batch_size=mbs)
        grads[backend, mode, mbs] = torch.cat([p.grad.reshape(-1) for p in pol.model.parameters()
                                               if p.grad is not None])
    base = ("triton", "recompute", 3)
    assert torch.equal(grads["triton", "inplace", 3], grads[base])  # the same kernel arithmetic
    assert torch.equal(grads["triton", "forward", 3], grads[base])
    torch.testing.assert_close(grads["triton", "inplace", 1], grads[base], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[base], grads["torch", "recompute", 3], rtol=1e-4, atol=1e-7)
    for k in ("loss", "entropy", "kl_ref"):
        assert stats["triton", "inplace", 3][k] == pytest.approx(stats["torch", "recompute", 3][k], rel=1e-5), k
    with pytest.raises(ValueError, match="grad_mode"):
        policy_loss(*make_inputs(T=4, V=20), spec, backend="torch", grad_mode="sideways")


def test_lm_head_fused_matches_reference():
    spec = LossSpec(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    T, H, V = 23, 16, 270
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(T, H, generator=g).to(DEVICE)
    W = (torch.randn(V, H, generator=g) * 0.5).to(DEVICE)
    _, tokens, old, ref, adv, w = make_inputs(T=T, V=V, seed=22)
    h1, W1 = hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)
    out = policy_loss_lm_head(h1, W1, tokens, old, ref, adv, w, spec, backend="triton", token_chunk=10)
    (out.loss * 2.0).backward()
    h2, W2 = hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, logp, ent, kl = policy_loss_from_logits(h2 @ W2.t(), tokens, old, ref, adv, w, spec)
    (loss * 2.0).backward()
    for a, b in ((out.loss, loss), (out.logp, logp), (out.entropy, ent), (out.kl, kl), (h1.grad, h2.grad),
                 (W1.grad, W2.grad)):
        torch.testing.assert_close(a, b.detach(), atol=5e-5, rtol=1e-4)
    # the torch backend of the same entry point is the reference
    h3, W3 = hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)
    out3 = policy_loss_lm_head(h3, W3, tokens, old, ref, adv, w, spec, backend="torch")
    out3.loss.backward()
    torch.testing.assert_close(W3.grad, W2.grad / 2, **F32)


def test_backend_errors(monkeypatch):
    spec = LossSpec()
    inp = make_inputs(T=4, V=50)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        policy_loss(*inp, spec, backend="nope")
    monkeypatch.setitem(sys.modules, "megaprorl.kernels.cuda_ext", None)  # import fails
    with pytest.raises(RuntimeError, match="MEGAPRORL_BUILD_CUDA=1"):
        policy_loss(*inp, spec, backend="cuda")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            policy_loss(*inp, spec, backend="triton")


# ------------------------------------------------------------------------------------------------
# tensor parallelism: TP=2 over gloo equals TP=1
# ------------------------------------------------------------------------------------------------

def _tp_worker(rank, world, backend, splits, inputs, spec, lm_inputs, grad_mode="recompute"):
    os.environ.update(CHILD_ENV)
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    logits, tokens, old, ref, adv, w = inputs
    lo, hi = splits[rank], splits[rank + 1]
    x = logits[:, lo:hi].clone().requires_grad_(True)
    out = policy_loss(x, tokens, old, ref, adv, w, spec, backend=backend, tp_group=group, vocab_start_index=lo,
                      grad_mode=grad_mode)
    out.loss.backward()
    res = {"loss": out.loss.detach(), "logp": out.logp, "entropy": out.entropy, "kl": out.kl, "grad": x.grad}
    if lm_inputs is not None:
        hidden, W, chunk = lm_inputs
        h = hidden.clone().requires_grad_(True)
        Wl = W[lo:hi].clone().requires_grad_(True)
        o = policy_loss_lm_head(h, Wl, tokens, old, ref, adv, w, spec, backend=backend, tp_group=group,
                                vocab_start_index=lo, token_chunk=chunk)
        o.loss.backward()
        res.update(lm_loss=o.loss.detach(), lm_logp=o.logp, lm_entropy=o.entropy, lm_dh=h.grad, lm_dw=Wl.grad)
    return res


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-deferred-entropy"])
def test_tensor_parallel_tp2_equals_tp1(backend, monkeypatch):
    # triton-deferred-entropy: gradient made in the forward call (grad_mode forward, and the fused LM head)
    # with the entropy moment summed in the gradient pass and all-reduced after it
    defer = backend == "triton-deferred-entropy"
    backend = "triton" if defer else backend
    if backend == "triton" and torch.cuda.is_available():
        # The gloo children run the Triton kernels in the CPU interpreter; on the GPU image (triton 3.6,
        # numpy 2.5) the interpreter fails inside numpy ("only 0-dimensional arrays ...").  CI (CPU) runs it.
        import numpy as np
        import triton

        def ver(v):
            return tuple(int(x) for x in v.split(".")[:2])

        if ver(triton.__version__) < (3, 9) and ver(np.__version__) >= (2, 5):
            pytest.skip("triton<3.9 interpreter is incompatible with numpy>=2.5; runs on the CPU CI")
    for k, v in CHILD_ENV.items():  # the gloo children run on CPU under the interpreter
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MEGAPRORL_TRITON_DEFER_ENTROPY", "1" if defer else "0")
    spec = LossSpec(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.0 if defer else 0.01, dual_clip=3.0)
    T, V, H = 14, 257, 8
    inputs = tuple(t.cpu() for t in make_inputs(T=T, V=V, seed=31, ratio_spread=0.5))
    inputs[1][:4] = torch.tensor([0, 127, 128, 256])  # targets at both shard edges
    splits = [0, 128, V]  # uneven shards
    g = torch.Generator().manual_seed(32)
    hidden = torch.randn(T, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.5
    lm = (hidden, W, 6) if backend == "triton" else None
    res = run_distributed(_tp_worker, 2, (backend, splits, inputs, spec, lm, "forward" if defer else "recompute"))
    r = reference(*inputs, spec)
    for rr in res:
        torch.testing.assert_close(rr["loss"], r[0], **F32)
        torch.testing.assert_close(rr["logp"], r[1], **F32)
        torch.testing.assert_close(rr["entropy"], r[2], **F32)
        torch.testing.assert_close(rr["kl"], r[3], **F32)
    torch.testing.assert_close(torch.cat([rr["grad"] for rr in res], 1), r[4], **F32)
    if lm is not None:
        h2, W2 = hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)
        loss, logp, ent, _ = policy_loss_from_logits(h2 @ W2.t(), *inputs[1:], spec)
        loss.backward()
        for rr in res:
            torch.testing.assert_close(rr["lm_loss"], loss.detach(), atol=5e-5, rtol=1e-4)
            torch.testing.assert_close(rr["lm_logp"], logp.detach(), atol=5e-5, rtol=1e-4)
            torch.testing.assert_close(rr["lm_entropy"], ent.detach(), atol=5e-5, rtol=1e-4)
        # d_hidden: each rank holds its shard's partial sum (the TP all-reduce belongs to the caller)
        torch.testing.assert_close(res[0]["lm_dh"] + res[1]["lm_dh"], h2.grad, atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(torch.cat([rr["lm_dw"] for rr in res], 0), W2.grad, atol=5e-5, rtol=1e-4)


def test_bench_quick_smoke(tmp_path, capsys, monkeypatch):
    from megaprorl.bench.kernels import main

    out = tmp_path / "bench.json"
    if torch.cuda.is_available():
        pytest.skip("CPU smoke test of the benchmark")
    import json

    import triton_kernels.policy_loss as tpl

    monkeypatch.setenv("MEGAPRORL_TRITON_DEFER_ENTROPY", "1")  # the rows set deferral themselves
    seen = []
    real_deferred = tpl.entropy_deferred
    monkeypatch.setattr(tpl, "entropy_deferred", lambda *a, **k: seen.append(real_deferred(*a, **k)) or seen[-1])
    assert main(["--quick", "--only", "torch-eager", "triton", "triton-inplace", "triton-inplace-defer",
                 "--out", str(out)]) == 0
    assert True in seen and False in seen, seen  # triton-inplace ran without deferral despite the env
    assert os.environ["MEGAPRORL_TRITON_DEFER_ENTROPY"] == "1"  # restored
    rep = json.loads(out.read_text())
    names = {r["name"]: r for r in rep["results"]}
    for row in ("triton", "torch-eager", "triton-inplace", "triton-inplace-defer"):
        assert names[row]["ms"] is not None, names[row]
    assert tpl.DEFER_ENTROPY["on"] is False  # the row restores the default
    assert main(["--tokens", "8"]) == 2  # full run needs CUDA


@pytest.mark.parametrize("pack_tokens,fused", [(0, False), (24, False), (24, True)],
                         ids=["padded", "packed", "packed-fused-lm-head"])
def test_policy_train_step_with_sequence_level_ratios(pack_tokens, fused):
    """``algo.loss.ratio_level: sequence`` (GSPO-token) through Megatron's schedule on each backend and grad mode
    (the old log-probs rebuilt from a no-gradient pass of the same kernel): the gradients and statistics equal
    autograd through ``sequence_level_pg_loss`` on the model's own logits, padded and packed; they differ from
    the token-level loss's.  With the fused LM head too."""
    import copy

    from megaprorl.algo.loss import kl_estimate, logprob_entropy_from_logits, sequence_level_pg_loss
    from test_packing import _batch
    from tiny_models import tiny_policy

    if DEVICE == "cuda":
        pytest.skip("the tiny policy runs on CPU")
    pol, tok = tiny_policy(pack_tokens=pack_tokens, fused_lm_head=fused)
    batch = _batch(tok, seed=5)
    spec = LossSpec(eps_low=0.02, eps_high=0.03, kl_coef=0.1, entropy_coef=0.01, ratio_level="sequence")
    with torch.no_grad():  # old log-probs near the policy's, so some sequences are clipped and some are not
        now = pol.logprobs(batch, 3)
    g = torch.Generator().manual_seed(1)
    shift = torch.linspace(-0.08, 0.08, len(batch))[:, None]  # each sequence's mean log-ratio, about -shift
    batch.old_logp = (now + shift + 0.03 * torch.randn(now.shape, generator=g)) * batch.loss_mask
    state = copy.deepcopy(pol.model.state_dict())
    pol.optimizer.step_with_ready_grads = lambda: True  # compare gradients, not updates
    for opt in pol.optimizer.chained_optimizers:  # unclipped
        opt.config.clip_grad = 0.0

    # the reference: autograd on the full logits of one forward, one sequence per row
    pol.model.load_state_dict(state)
    pol.ddp.zero_grad_buffer()  # Megatron's DDP accumulates into each parameter's main_grad
    logits = pol.model(batch.tokens, torch.arange(batch.tokens.shape[1])[None].expand_as(batch.tokens), None)
    logits = logits[:, :-1, : tok.vocab_size]
    logits = logits.reshape(-1, logits.shape[-1])
    logp, ent = logprob_entropy_from_logits(logits, batch.tokens[:, 1:].reshape(-1))
    m, old, adv = (x.reshape(-1).double() for x in (batch.loss_mask, batch.old_logp, batch.advantages))
    seg = torch.arange(len(batch)).repeat_interleave(batch.tokens.shape[1] - 1)
    pg, clo, chi = sequence_level_pg_loss(logp.double(), old, adv, m, seg, spec.eps_low, spec.eps_high)
    kl = kl_estimate(logp.double(), batch.ref_logp.reshape(-1).double())
    loss = (batch.weights.reshape(-1).double() * (pg + 0.1 * kl - 0.01 * ent.double())).sum()
    loss.backward()
    loss = loss.detach()
    grads = lambda: torch.cat([p.main_grad.reshape(-1) for p in pol.model.parameters() if p.requires_grad])  # noqa
    want = grads().clone()
    want_chi, want_clo = (float((c.double() * m).sum() / m.sum()) for c in (chi, clo))
    assert 0 < want_chi + want_clo < 1  # some sequences clipped, some not

    for backend, mode in (("torch", "recompute"), ("triton", "recompute"), ("triton", "inplace")):
        pol.model.load_state_dict(state)
        pol.kernel_backend, pol.loss_grad_mode = backend, mode
        stats = pol.train_step(batch, spec, micro_batch_size=3)
        got = grads()
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-7, msg=lambda s: f"{backend} {mode}: {s}")
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
        assert stats["clip_frac_high"] == pytest.approx(want_chi, abs=1e-6)
        assert stats["clip_frac_low"] == pytest.approx(want_clo, abs=1e-6)
    pol.model.load_state_dict(state)
    pol.kernel_backend = "torch"
    pol.train_step(batch, LossSpec(eps_low=0.02, eps_high=0.03, kl_coef=0.1, entropy_coef=0.01), micro_batch_size=3)
    token = grads()
    assert not torch.allclose(token, want.to(token.dtype), rtol=1e-3, atol=1e-6)
