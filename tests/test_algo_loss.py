"""Hand-worked numbers for megaprorl/algo/loss.py, and the invariance of the token-mean loss to how
the global batch is split (micro-batches, data-parallel ranks)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megaprorl.algo.loss import (LossSpec, aggregation_weights, clipped_pg_loss, kl_estimate,
                                 logprob_entropy_from_logits, per_token_loss, policy_loss_from_logits)
from tests.dist_utils import run_distributed

LN = math.log


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def _pg(logratio, adv, eps_low=0.2, eps_high=0.28, dual=None, clamp=20.0):
    logp = _t(*logratio).requires_grad_(True)
    old = torch.zeros_like(logp)
    pg, lo, hi = clipped_pg_loss(logp, old, _t(*adv), eps_low, eps_high, dual, clamp)
    pg.sum().backward()
    return pg.detach(), lo, hi, logp.grad


# ------------------------------------------------------------------------------ clipped loss
def test_clipped_loss_four_quadrants():
    # eps_low = 0.2 -> lower bound 0.8; eps_high = 0.28 -> upper bound 1.28.
    # A=+1, r=1.5 : -A r = -1.5, -A clip(r) = -1.28; max = -1.28 (clipped high), grad 0
    # A=+1, r=0.5 : -0.5 vs -0.8 -> -0.5 (unclipped), grad = -A r = -0.5
    # A=-1, r=1.5 : 1.5 vs 1.28 -> 1.5 (unclipped), grad = -A r = +1.5
    # A=-1, r=0.5 : 0.5 vs 0.8 -> 0.8 (clipped low), grad 0
    pg, lo, hi, g = _pg([LN(1.5), LN(0.5), LN(1.5), LN(0.5)], [1, 1, -1, -1])
    torch.testing.assert_close(pg, _t(-1.28, -0.5, 1.5, 0.8))
    assert hi.tolist() == [True, False, False, False]
    assert lo.tolist() == [False, False, False, True]
    torch.testing.assert_close(g, _t(0.0, -0.5, 1.5, 0.0))


def test_clip_higher_asymmetry():
    # r = 1.25, A = +1: with eps_high = 0.28 the bound is 1.28 > 1.25 -> unclipped: pg = -1.25, grad -1.25.
    # With symmetric eps = 0.2 the bound is 1.2 -> pg = -1.2, grad 0.
    pg, lo, hi, g = _pg([LN(1.25)], [1.0], eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(pg, _t(-1.25))
    torch.testing.assert_close(g, _t(-1.25))
    assert not hi.any()
    pg, lo, hi, g = _pg([LN(1.25)], [1.0], eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(pg, _t(-1.2))
    torch.testing.assert_close(g, _t(0.0))
    assert hi.all()
    # The lower side is unaffected by eps_high: r = 0.75, A = -1: 0.75 vs 0.8 -> 0.8 (clipped low).
    pg, lo, hi, g = _pg([LN(0.75)], [-1.0], eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(pg, _t(0.8))
    assert lo.all() and not hi.any()


def test_ratio_exactly_at_bound_is_not_clipped():
    # r = 1.28 exactly, A = +1: clipped == unclipped -> the unclipped branch (gradient -A r = -1.28)
    logp = torch.tensor([math.log(1.28)], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, dtype=torch.float64)
    pg, lo, hi = clipped_pg_loss(logp, old, _t(1.0), 0.2, 0.28)
    pg.sum().backward()
    torch.testing.assert_close(logp.grad, _t(-1.28))
    assert not hi.any()


def test_dual_clip():
    # c = 3, applied only where A < 0:
    # A=-1, r=5 : pg = max(5, 1.28) = 5 > cap 3 -> 3; grad 0, flagged in clipped_low
    # A=-1, r=2 : pg = 2 < 3 -> 2; grad = -A r = 2
    # A=+1, r=5 : pg = max(-5, -1.28) = -1.28 (clipped high), dual clip not applied
    # A=-2, r=0.5 : pg = max(1.0, 1.6) = 1.6 (clipped low) < cap 6 -> 1.6
    pg, lo, hi, g = _pg([LN(5), LN(2), LN(5), LN(0.5)], [-1, -1, 1, -2], dual=3.0)
    torch.testing.assert_close(pg, _t(3.0, 2.0, -1.28, 1.6))
    torch.testing.assert_close(g, _t(0.0, 2.0, 0.0, 0.0))
    assert lo.tolist() == [True, False, False, True]
    assert hi.tolist() == [False, False, True, False]
    # without dual clip the first token is unbounded: pg = 5, grad -A r = 5
    pg, lo, hi, g = _pg([LN(5)], [-1])
    torch.testing.assert_close(pg, _t(5.0))
    torch.testing.assert_close(g, _t(5.0))


def test_extreme_log_ratio_is_clamped():
    # logp - old_logp = 50 -> clamped to 20 -> r = e^20 = 485165195.4; A = -1 -> pg = e^20 (finite)
    # logp - old_logp = -50 -> clamped to -20 -> r = e^-20; A = +1 -> pg = max(-e^-20, -0.8) = -e^-20
    logp = torch.tensor([0.0, -50.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-50.0, 0.0], dtype=torch.float64)
    pg, lo, hi = clipped_pg_loss(logp, old, _t(-1.0, 1.0), 0.2, 0.28)
    torch.testing.assert_close(pg.detach(), _t(math.exp(20.0), -math.exp(-20.0)))
    assert torch.isfinite(pg).all()
    pg.sum().backward()
    # outside the clamp the log-ratio does not depend on logp: zero gradient
    torch.testing.assert_close(logp.grad, _t(0.0, 0.0))
    # float32 as well: e^20 fits, no inf / nan
    pg32, _, _ = clipped_pg_loss(torch.tensor([0.0]), torch.tensor([-1000.0]), torch.tensor([-1.0]), 0.2, 0.28)
    assert torch.isfinite(pg32).all()
    # a smaller ratio clamp: log-ratio 50 -> 5 -> pg = e^5 for A = -1
    pg, _, _ = clipped_pg_loss(_t(0.0), _t(-50.0), _t(-1.0), 0.2, 0.28, None, 5.0)
    torch.testing.assert_close(pg, _t(math.exp(5.0)))


def test_zero_advantage_gives_zero_loss_and_grad():
    pg, lo, hi, g = _pg([LN(3.0), LN(0.1), 0.0], [0, 0, 0])
    torch.testing.assert_close(pg, _t(0.0, 0.0, 0.0))
    torch.testing.assert_close(g, _t(0.0, 0.0, 0.0))
    assert not lo.any() and not hi.any()


# ------------------------------------------------------------------------------ KL estimators
def test_kl_estimators_by_hand():
    # d = ref - logp = ln 2 = 0.693147:  k1 = -0.693147, k2 = 0.5 * 0.480453 = 0.240227,
    #                                    k3 = 2 - 1 - 0.693147 = 0.306853
    # d = -ln 2:                         k1 = 0.693147,  k2 = 0.240227, k3 = 0.5 - 1 + 0.693147 = 0.193147
    logp = _t(0.0, 0.0)
    ref = _t(LN(2), -LN(2))
    d = LN(2)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), _t(-d, d))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), _t(0.5 * d * d, 0.5 * d * d))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), _t(1 - d, -0.5 + d))
    # identical policies: all three are 0
    for k in ("k1", "k2", "k3"):
        torch.testing.assert_close(kl_estimate(_t(-1.3), _t(-1.3), k), _t(0.0))


def test_kl_clamps():
    logp = _t(0.0, 0.0)
    ref = _t(30.0, -30.0)  # d = +-30
    # default clamps: d -> +-20, output -> [-10, 10]
    # k1: -20 -> -10, +20 -> 10
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), _t(-10.0, 10.0))
    # k2: 200 -> 10 (both)
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), _t(10.0, 10.0))
    # k3: e^20 - 21 -> 10;  e^-20 - 1 + 20 = 19.000000002 -> 10
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), _t(10.0, 10.0))
    # v2-style log-ratio clamp 10, wide output clamp: k2 = 0.5 * 100 = 50; k3(-10) = e^-10 + 9
    torch.testing.assert_close(kl_estimate(logp, ref, "k2", log_ratio_clamp=10.0, output_clamp=1e9), _t(50.0, 50.0))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3", log_ratio_clamp=10.0, output_clamp=1e9),
                               _t(math.exp(10) - 11, math.exp(-10) + 9))
    # output clamp alone: d = 3 (inside the log-ratio clamp), k2 = 4.5 -> clamp 2
    torch.testing.assert_close(kl_estimate(_t(0.0), _t(3.0), "k2", output_clamp=2.0), _t(2.0))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_kl_gradients():
    # d = ref - logp; dk1/dlogp = 1; dk2/dlogp = -d; dk3/dlogp = 1 - e^d.  At ref = ln2, logp = 0:
    # 1, -0.693147, 1 - 2 = -1
    for est, want in (("k1", 1.0), ("k2", -LN(2)), ("k3", -1.0)):
        logp = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        kl_estimate(logp, _t(LN(2)), est).sum().backward()
        torch.testing.assert_close(logp.grad, _t(want))
    # clamped log-ratio -> zero gradient
    logp = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    kl_estimate(logp, _t(30.0), "k3").sum().backward()
    torch.testing.assert_close(logp.grad, _t(0.0))


# ------------------------------------------------------------------------------ per-token loss, logits
def test_logprob_entropy_from_logits():
    # row 0: logits (0, 0): p = (.5, .5), logp(token 1) = -ln 2, H = ln 2
    # row 1: logits (0, ln 3): p = (.25, .75), logp(token 0) = ln .25, H = -(.25 ln .25 + .75 ln .75) = 0.562335
    logits = torch.tensor([[0.0, 0.0], [0.0, LN(3)]])
    logp, ent = logprob_entropy_from_logits(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(logp, torch.tensor([-LN(2), LN(0.25)]))
    torch.testing.assert_close(ent, torch.tensor([LN(2), -(0.25 * LN(0.25) + 0.75 * LN(0.75))]))
    # bf16 logits are computed in fp32
    logp16, _ = logprob_entropy_from_logits(logits.bfloat16(), torch.tensor([1, 0]))
    assert logp16.dtype == torch.float32


def test_per_token_loss_combines_terms():
    # logp = old = 0 (r = 1), A = 2 -> pg = -2; ref = ln 2 -> k3 = 0.306853; H = 0.5
    # loss = -2 + 0.1 * 0.306853 - 0.01 * 0.5 = -1.974315
    spec = LossSpec(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    out = per_token_loss(_t(0.0), _t(0.5), _t(0.0), _t(LN(2)), _t(2.0), spec)
    torch.testing.assert_close(out["loss_t"], _t(-2 + 0.1 * (1 - LN(2)) - 0.005))
    torch.testing.assert_close(out["kl"], _t(1 - LN(2)))
    # the KL is reported even when beta = 0, but not added
    out = per_token_loss(_t(0.0), None, _t(0.0), _t(LN(2)), _t(2.0), LossSpec(kl_coef=0.0))
    torch.testing.assert_close(out["loss_t"], _t(-2.0))
    assert out["kl"] is not None
    out = per_token_loss(_t(0.0), None, _t(0.0), None, _t(2.0), LossSpec(kl_coef=0.1))
    assert out["kl"] is None
    with pytest.raises(ValueError):
        per_token_loss(_t(0.0), None, _t(0.0), None, _t(2.0), LossSpec(entropy_coef=0.1))


def test_loss_spec_validation():
    with pytest.raises(ValueError):
        LossSpec(kl_estimator="k5")
    with pytest.raises(ValueError):
        LossSpec(eps_low=-0.1)
    with pytest.raises(ValueError):
        LossSpec(dual_clip=1.0)


def test_policy_loss_gradient_wrt_logits():
    # one token, V = 2, logits (0, 0), token 1: p = (.5, .5), logp = -ln 2.  old_logp = logp -> r = 1,
    # A = 3, weight 0.5: loss = 0.5 * (-3) = -1.5; dloss/dlogp = 0.5 * (-A r) = -1.5;
    # dlogp/dlogits = onehot - p = (-.5, .5) -> grad = (0.75, -0.75)
    logits = torch.zeros(1, 2, requires_grad=True)
    loss, logp, ent, kl = policy_loss_from_logits(logits, torch.tensor([1]), torch.tensor([-LN(2)]), None,
                                                  torch.tensor([3.0]), torch.tensor([0.5]), LossSpec())
    loss.backward()
    torch.testing.assert_close(loss.detach(), torch.tensor(-1.5))
    torch.testing.assert_close(logits.grad, torch.tensor([[0.75, -0.75]]))
    assert kl is None


# ------------------------------------------------------------------------------ aggregation weights
def test_aggregation_weights_by_hand():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    # token-mean, 5 valid tokens in the global batch: 1/5 on every valid token, the all-masked row is 0
    w = aggregation_weights(mask, "token-mean", 5, 3)
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.2, 0], [0, 0, 0], [0.2, 0.2, 0.2]]))
    # sequence-mean over 3 sequences: row 0: 1/2/3, row 2: 1/3/3, all-masked row: 0 (no division by 0)
    w = aggregation_weights(mask, "sequence-mean", 5, 3)
    torch.testing.assert_close(w, torch.tensor([[1 / 6, 1 / 6, 0], [0, 0, 0], [1 / 9, 1 / 9, 1 / 9]]))
    # token-sum-norm (Dr. GRPO) with a budget of 4 tokens over 3 sequences: 1/4/3 on every valid token
    w = aggregation_weights(mask, "token-sum-norm", 5, 3, norm_length=4)
    torch.testing.assert_close(w, torch.tensor([[1 / 12, 1 / 12, 0], [0, 0, 0], [1 / 12, 1 / 12, 1 / 12]]))
    # nothing valid anywhere: zeros, not nan
    z = torch.zeros(2, 3)
    assert torch.equal(aggregation_weights(z, "token-mean", 0, 0), z)
    assert torch.equal(aggregation_weights(z, "sequence-mean", 0, 0), z)
    assert torch.equal(aggregation_weights(z, "token-sum-norm", 0, 0, norm_length=4), z)
    with pytest.raises(ValueError, match="expected one of token-mean, sequence-mean, token-sum-norm"):
        aggregation_weights(mask, "sum", 5, 3)
    with pytest.raises(ValueError, match="needs norm_length > 0"):
        aggregation_weights(mask, "token-sum-norm", 5, 3)


# ------------------------------------------------------------------------------ batch-split invariance
def _random_batch(seed, b, length, v):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, v, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, v, (b, length), generator=g)
    old = torch.log_softmax(logits + 0.3 * torch.randn(b, length, v, generator=g, dtype=torch.float64), -1)
    old = old.gather(-1, tokens[..., None]).squeeze(-1)
    ref = old + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64)
    adv = torch.randn(b, length, generator=g, dtype=torch.float64)
    lens = torch.randint(0, length + 1, (b,), generator=g)  # zero-length rows included
    mask = (torch.arange(length)[None, :] < lens[:, None]).long()
    return logits, tokens, old, ref, adv, mask


def _loss_and_grad(logits, tokens, old, ref, adv, mask, spec, mode, n_tok, n_seq):
    x = logits.detach().clone().requires_grad_(True)
    w = aggregation_weights(mask, mode, n_tok, n_seq, norm_length=mask.shape[-1])
    v = x.shape[-1]
    loss, *_ = policy_loss_from_logits(x.reshape(-1, v), tokens.reshape(-1), old.reshape(-1), ref.reshape(-1),
                                       adv.reshape(-1), w.reshape(-1), spec)
    loss.backward()
    return loss.detach(), x.grad


SPEC = LossSpec(eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6), length=st.integers(1, 5),
       mode=st.sampled_from(["token-mean", "sequence-mean", "token-sum-norm"]), data=st.data())
def test_loss_invariant_to_micro_batching(seed, b, length, mode, data):
    logits, tokens, old, ref, adv, mask = _random_batch(seed, b, length, 7)
    n_tok, n_seq = float(mask.sum()), float(b)  # global counts
    full_loss, full_grad = _loss_and_grad(logits, tokens, old, ref, adv, mask, SPEC, mode, n_tok, n_seq)
    # split the rows into random contiguous micro-batches; sum losses, concatenate gradients
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(b - 1, 1)), max_size=3)))) if b > 1 else []
    bounds = [0] + [c for c in cuts if 0 < c < b] + [b]
    tot, grads = 0.0, []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sl = slice(lo, hi)
        l, g = _loss_and_grad(logits[sl], tokens[sl], old[sl], ref[sl], adv[sl], mask[sl], SPEC, mode, n_tok, n_seq)
        tot = tot + l
        grads.append(g)
    torch.testing.assert_close(tot, full_loss)
    torch.testing.assert_close(torch.cat(grads), full_grad)
    if n_tok > 0 and mode == "token-mean":
        # the token-mean really is a mean: equal to the plain average of loss_t over valid tokens
        lp, ent = logprob_entropy_from_logits(logits.reshape(-1, 7), tokens.reshape(-1))
        lt = per_token_loss(lp, ent, old.reshape(-1), ref.reshape(-1), adv.reshape(-1), SPEC)["loss_t"]
        torch.testing.assert_close(full_loss, lt[mask.reshape(-1).bool()].mean().float())


def _dp_loss_worker(rank, world, seed, mode, zero_row):
    import torch.distributed as dist

    logits, tokens, old, ref, adv, mask = _random_batch(seed, 6, 4, 5)
    mask[zero_row] = 0
    rows = slice(rank * 3, (rank + 1) * 3)
    local_mask = mask[rows]
    counts = torch.tensor([float(local_mask.sum()), float(local_mask.shape[0])], dtype=torch.float64)
    dist.all_reduce(counts)  # global token / sequence counts
    loss, grad = _loss_and_grad(logits[rows], tokens[rows], old[rows], ref[rows], adv[rows], local_mask, SPEC, mode,
                                float(counts[0]), float(counts[1]))
    total = loss.clone()
    dist.all_reduce(total)  # sum of rank losses = the global loss (weights carry the global normaliser)
    return total, grad


@pytest.mark.parametrize("mode", ["token-mean", "sequence-mean", "token-sum-norm"])
def test_loss_invariant_over_two_dp_ranks(mode):
    logits, tokens, old, ref, adv, mask = _random_batch(7, 6, 4, 5)
    mask[2] = 0  # an all-masked row on rank 0
    full_loss, full_grad = _loss_and_grad(logits, tokens, old, ref, adv, mask, SPEC, mode, float(mask.sum()), 6.0)
    out = run_distributed(_dp_loss_worker, 2, (7, mode, 2))  # rebuilds the same batch from the seed
    torch.testing.assert_close(out[0][0], full_loss)
    torch.testing.assert_close(out[1][0], full_loss)
    # per-rank gradients are slices of the full one: a SUM over ranks (not a mean) reproduces it
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), full_grad)


# ------------------------------------------------------------------ sequence-level ratios (GSPO-token)
def test_sequence_level_ratio_by_hand():
    """Two sequences (eps 0.2 both ways).  Sequence 0's log-ratios 0.1 and 0.3 average 0.2: s = e^0.2 = 1.2214 >
    1.2, so with A = 1 both its tokens are clipped high (pg = -1.2, no gradient), token 0 too, whose own ratio
    e^0.1 is inside the range.  Sequence 1's -0.05 and +0.05 average 0: s = 1, and with A = -2 each token has
    pg = 2 and gradient -A s = 2 (at token level token 3's is -A e^0.05).  A masked token with a log-ratio of 5
    in sequence 1 changes nothing."""
    import math

    from megaprorl.algo.loss import sequence_level_pg_loss, sequence_log_ratio, sequence_ratio_old_logp

    old = torch.zeros(5, dtype=torch.float64)
    logp = torch.tensor([0.1, 0.3, -0.05, 0.05, 5.0], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    seg = torch.tensor([0, 0, 1, 1, 1])
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0, -2.0], dtype=torch.float64)
    log_s = sequence_log_ratio(logp, old, mask, seg)
    torch.testing.assert_close(log_s, torch.tensor([0.2, 0.2, 0.0, 0.0, 0.0], dtype=torch.float64))
    pg, clo, chi = sequence_level_pg_loss(logp, old, adv, mask, seg, 0.2, 0.2)
    torch.testing.assert_close(pg[:4], torch.tensor([-1.2, -1.2, 2.0, 2.0], dtype=torch.float64))
    assert chi[:4].tolist() == [True, True, False, False] and not clo[:4].any()
    g, = torch.autograd.grad((pg * mask).sum(), logp)
    torch.testing.assert_close(g[:4], torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=torch.float64))
    # the token-level loss at the sequence-level old log-probs is the same, value and gradient
    spec = LossSpec(eps_low=0.2, eps_high=0.2, ratio_level="sequence")
    parts = per_token_loss(logp, None, sequence_ratio_old_logp(logp, old, mask, seg), None, adv, spec)
    torch.testing.assert_close(parts["pg"][:4], pg[:4])
    g2, = torch.autograd.grad((parts["pg"] * mask).sum(), logp)
    torch.testing.assert_close(g2, g)
    # token level differs: token 0 (e^0.1 < 1.2) is not clipped, token 1 (e^0.3) is; token 3's gradient is 2 e^0.05
    tok, _, chi_t = clipped_pg_loss(logp, old, adv, 0.2, 0.2)
    assert chi_t[:4].tolist() == [False, True, False, False]
    gt, = torch.autograd.grad((tok * mask).sum(), logp)
    assert gt[0] == pytest.approx(-math.exp(0.1)) and gt[3] == pytest.approx(2 * math.exp(0.05))
    with pytest.raises(ValueError, match="ratio_level"):
        LossSpec(ratio_level="sentence")


def test_ratio_level_and_aggregation_config():
    import os

    from megaprorl.config import ConfigError, load_config

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.yaml")
    assert load_config(demo, ["algo.loss.ratio_level=sequence"]).algo.loss.ratio_level == "sequence"
    with pytest.raises(ConfigError, match="'algo.loss.ratio_level': must be token or sequence"):
        load_config(demo, ["algo.loss.ratio_level=sentence"])
    assert load_config(demo, ["algo.loss.aggregation=token-sum-norm"]).algo.loss.aggregation == "token-sum-norm"
    with pytest.raises(ConfigError, match="'algo.loss.aggregation': must be one of token-mean, sequence-mean, "
                                          "token-sum-norm"):
        load_config(demo, ["algo.loss.aggregation=seq-mean-token-sum"])
