"""Count the aten ops of the packed-sequence path on CPU (the host-side overhead the GPU profiler blamed
for slow packing): a tiny 4-layer policy, one pack of 16 sequences, one forward+backward and one whole
train step (forward, backward, optimizer), counted by torch.profiler.

    PYTHONPATH=.:tests python3 scripts/count_packed_ops.py
"""

from __future__ import annotations

import collections

import torch
from torch.profiler import ProfilerActivity, profile


def _count(fn) -> collections.Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def main() -> int:
    from tiny_models import tiny_policy

    from megaprorl.algo.loss import LossSpec, aggregation_weights
    from megaprorl.policy import build_seq_batch

    pol, tok = tiny_policy({"num_layers": 4, "max_position_embeddings": 512}, pack_tokens=400)
    g = torch.Generator().manual_seed(0)
    prompts = [tok.encode("12+34=") for _ in range(16)]
    resp = [torch.randint(2, tok.vocab_size, (int(k),), generator=g).tolist()
            for k in torch.randint(5, 20, (16,), generator=g)]
    b = build_seq_batch(prompts, resp, tok.pad_id)
    b.old_logp = torch.full(b.loss_mask.shape, -3.0)
    b.ref_logp = b.old_logp + 0.05
    b.advantages = torch.randn(b.loss_mask.shape, generator=g) * b.loss_mask
    b.weights = aggregation_weights(b.loss_mask, "token-mean", float(b.loss_mask.sum()), len(b))
    spec = LossSpec(kl_coef=0.1)
    pol.train_step(b, spec, micro_batch_size=16)  # warm-up
    step = _count(lambda: pol.train_step(b, spec, micro_batch_size=16))
    print(f"aten ops per train step (forward, backward, optimizer): {sum(step.values())}")
    for name, n in step.most_common(12):
        print(f"  {n:6} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
