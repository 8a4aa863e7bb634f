"""Unbiased pass@k and the evaluation summary, by hand."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megaprorl.algo.passk import pass_at_k, pass_at_k_batch, summarize_eval


def test_pass_at_k_by_hand():
    # n = 4, c = 1, k = 2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # k = 1 is c / n
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    # n - c < k: every k-subset holds a correct sample -> 1
    assert pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 4, 4) == 1.0
    # c = 0 -> 0; k = n with c >= 1 -> 1
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 1, 10) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


def test_pass_at_k_large_n_is_stable():
    # n = 1000, c = 10, k = 100: C(990,100)/C(1000,100) = prod_{i=0}^{9} (900 - i)/(1000 - i)
    want = 1 - math.prod((900 - i) / (1000 - i) for i in range(10))
    assert pass_at_k(1000, 10, 100) == pytest.approx(want, rel=1e-12)
    assert 0.0 <= pass_at_k(100000, 1, 50000) <= 1.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), data=st.data())
def test_pass_at_k_matches_binomial_form_and_is_monotone(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    if k < n:
        assert pass_at_k(n, c, k + 1) >= pass_at_k(n, c, k) - 1e-12


def test_pass_at_k_batch():
    out = pass_at_k_batch([4, 5, 8], torch.tensor([1, 2, 3]), 2)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.7, 1 - (10 / 28)], dtype=torch.float64))  # C(5,2)/C(8,2)
    with pytest.raises(ValueError):
        pass_at_k_batch([1, 2], [1], 1)


def test_summarize_eval_by_hand():
    rows = [
        ("p1", "math", [1, 0, 0, 0]),        # c = 1 of 4: pass@1 .25, pass@2 = 0.5, pass@4 = 1
        ("p2", "math", [0, 0, 0, 0]),        # c = 0: 0, 0, 0
        ("p3", "code", [1.0, 0.5, 1.0, 1.0]),  # 0.5 < threshold: c = 3: pass@1 .75, pass@2 1, pass@4 1
        ("p4", "code", [1, 1]),              # n = 2: pass@1 1, pass@2 1, no pass@4
    ]
    s = summarize_eval(rows, ks=(2, 4))
    assert s["n_problems"] == 4 and s["n_samples"] == 14
    assert s["mean_reward"] == pytest.approx((1 + 3.5 + 2) / 14)
    # pass@1 = mean(.25, 0, .75, 1) = .5; pass@2 = mean(.5, 0, 1, 1) = .625; pass@4 over p1..p3 = 2/3
    assert s["pass@1"] == pytest.approx(0.5)
    assert s["pass@2"] == pytest.approx(0.625)
    assert s["pass@4"] == pytest.approx(2 / 3)
    m, c = s["by_domain"]["math"], s["by_domain"]["code"]
    assert (m["pass@1"], m["pass@2"], m["pass@4"]) == pytest.approx((0.125, 0.25, 0.5))
    assert (c["pass@1"], c["pass@2"], c["pass@4"]) == pytest.approx((0.875, 1.0, 1.0))
    assert c["n_problems"] == 2
    # a lower threshold counts partial credit: p3 has c = 4 -> code pass@1 = (1 + 1) / 2
    assert summarize_eval(rows, ks=(1,), correct_threshold=0.5)["by_domain"]["code"]["pass@1"] == pytest.approx(1.0)


def test_summarize_eval_pools_duplicates_and_handles_empty():
    # the same problem split over two ranks: pooled to n = 4, c = 1
    s = summarize_eval([("p", "math", [1, 0]), ("p", "math", [0, 0])], ks=(4,))
    assert s["n_problems"] == 1 and s["pass@1"] == pytest.approx(0.25) and s["pass@4"] == pytest.approx(1.0)
    e = summarize_eval([], ks=(1, 8))
    assert e == {"n_problems": 0, "n_samples": 0, "by_domain": {}}
    assert "pass@8" not in summarize_eval([("p", "x", [1, 1])], ks=(8,))
    with pytest.raises(ValueError):
        summarize_eval([("p", "x", [1])], ks=(0,))
