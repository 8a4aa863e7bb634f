"""Unbiased pass@k (Chen et al. 2021) and the evaluation summary.

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

for ``n`` samples of which ``c`` are correct (the product form never forms a binomial coefficient,
so it is exact in floating point for any n).  ``pass@1`` reduces to c / n: the accuracy averaged over
the samples.
"""

from __future__ import annotations

from typing import Dict, Hashable, Iterable, List, Sequence, Tuple

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` correct.  Needs 1 <= k <= n."""
    n, c, k = int(n), int(c), int(k)
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n (n={n}, c={c})")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n (n={n}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_batch(n: Sequence[int], c: Sequence[int], k: int) -> torch.Tensor:
    """pass@k of many problems (float64 tensor [P]); ``n`` and ``c`` are per problem."""
    n_l = n.tolist() if isinstance(n, torch.Tensor) else list(n)
    c_l = c.tolist() if isinstance(c, torch.Tensor) else list(c)
    if len(n_l) != len(c_l):
        raise ValueError("n and c must have the same length")
    return torch.tensor([pass_at_k(a, b, k) for a, b in zip(n_l, c_l)], dtype=torch.float64)


def summarize_eval(results: Iterable[Tuple[Hashable, str, Sequence[float]]], ks: Sequence[int] = (1,),
                   correct_threshold: float = 1.0) -> Dict:
    """Summary of sampled evaluation.

    ``results``: (problem_id, domain, rewards of the samples) rows; rows with the same
    (domain, problem_id) are pooled (e.g. samples gathered from several ranks).  A sample is correct
    when its reward >= ``correct_threshold``.  Returns::

        {"n_problems": P, "n_samples": S, "mean_reward": ...,
         "pass@1": mean over problems of c/n, "pass@k": mean over problems with n >= k, ...,
         "by_domain": {domain: {same keys}}}

    A ``pass@k`` key is present only when at least one problem has n >= k samples (problems with
    fewer samples are left out of that k's mean).  Problems with no samples are ignored.
    """
    pooled: Dict[Tuple[str, Hashable], List[float]] = {}
    for pid, dom, rewards in results:
        pooled.setdefault((str(dom), pid), []).extend(float(r) for r in rewards)
    ks = sorted({int(k) for k in ks} | {1})
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1 (got {ks})")

    def summarize(rows: List[List[float]]) -> Dict:
        rows = [r for r in rows if r]
        out: Dict = {"n_problems": len(rows), "n_samples": sum(len(r) for r in rows)}
        if not rows:
            return out
        out["mean_reward"] = sum(sum(r) for r in rows) / out["n_samples"]
        for k in ks:
            vals = [pass_at_k(len(r), sum(1 for x in r if x >= correct_threshold), k) for r in rows if len(r) >= k]
            if vals:
                out[f"pass@{k}"] = sum(vals) / len(vals)
        return out

    summary = summarize(list(pooled.values()))
    domains = sorted({d for d, _ in pooled})
    summary["by_domain"] = {d: summarize([r for (dd, _), r in pooled.items() if dd == d]) for d in domains}
    return summary
