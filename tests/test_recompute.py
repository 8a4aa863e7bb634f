"""Activation recomputation (``model.recompute_granularity``): the same gradients as without it, on CPU."""

import copy

import pytest
import torch

from test_packing import _batch
from tiny_models import tiny_policy


def _grads(pol, batch, spec):
    pol.optimizer.step_with_ready_grads = lambda: True  # keep the weights; compare the gradients
    stats = pol.train_step(batch, spec, micro_batch_size=4)
    assert stats["skipped_update"] == 0.0
    return torch.cat([p.main_grad.reshape(-1) for p in pol.model.parameters()])


@pytest.mark.parametrize("granularity", ["selective", "full"])
@pytest.mark.parametrize("pack", [0, 30])
def test_recomputed_activations_give_the_same_gradients(granularity, pack, monkeypatch):
    """Megatron's checkpointed forward (the core attention for `selective`, each whole layer for `full`) is
    recomputed in the backward, through Megatron's CheckpointFunction and its RNG-state bookkeeping. Gradients,
    log-probs and entropies equal the run that keeps every activation, padded and packed."""
    from megaprorl.algo.loss import LossSpec

    plain, tok = tiny_policy(pack_tokens=pack)
    state = copy.deepcopy(plain.model.state_dict())
    recomputed, _ = tiny_policy({"recompute_granularity": granularity}, pack_tokens=pack)
    recomputed.model.load_state_dict(state)
    assert recomputed.model.config.recompute_granularity == granularity
    batch = _batch(tok)
    spec = LossSpec(kl_coef=0.1, entropy_coef=0.01)
    want = _grads(plain, batch, spec)
    from megatron.core.tensor_parallel import random as mrandom

    recomputed_forwards = []
    backward = mrandom.CheckpointFunction.backward
    monkeypatch.setattr(mrandom.CheckpointFunction, "backward",
                        staticmethod(lambda ctx, *a: recomputed_forwards.append(1) or backward(ctx, *a)))
    got = _grads(recomputed, batch, spec)
    # one recomputed forward per layer and micro-batch (2 layers; 2 micro-batches padded, >= 2 packs of 30 tokens)
    assert len(recomputed_forwards) >= 4
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for a, b in zip(recomputed.logprobs(batch, 4, with_entropy=True), plain.logprobs(batch, 4, with_entropy=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _saved_bytes(pol, batch, spec) -> int:
    """Bytes of the distinct storages autograd saves for the backward during the forward passes of one update
    (what the backward will need: the activations), the weights aside."""
    weights = {p.untyped_storage().data_ptr() for p in pol.model.parameters()}
    saved = {}

    def pack(t):
        if torch._C._current_graph_task_id() == -1:  # in a forward (the backward's recomputed forwards free theirs)
            s = t.untyped_storage()
            if s.data_ptr() not in weights:
                saved[s.data_ptr()] = s.nbytes()
        return t

    pol.optimizer.step_with_ready_grads = lambda: True
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pol.train_step(batch, spec, micro_batch_size=len(batch))  # one micro-batch: every storage alive at once
    return sum(saved.values())


def test_what_each_granularity_saves():
    """What the backward keeps, counted from the saved tensors.  `full` keeps each layer's input and recomputes
    the rest.  `selective` recomputes the core attention only: with SDPA (flash-style: inputs, output and
    log-sum-exp) that saves the log-sum-exp alone, since the projections around it keep q, k, v and the output
    as theirs; it costs the attention's forward again for ~nothing (Megatron warns so for TransformerEngine's
    fused attention too).  The recipe examples therefore use no recomputation at 8K and `full` at 16K."""
    from megaprorl.algo.loss import LossSpec

    spec = LossSpec(kl_coef=0.1)
    sizes = {}
    for granularity in ("", "selective", "full"):
        pol, tok = tiny_policy({"recompute_granularity": granularity, "num_layers": 4})
        sizes[granularity] = _saved_bytes(pol, _batch(tok), spec)
    assert 0.98 * sizes[""] <= sizes["selective"] < sizes[""]
    assert sizes["full"] < 0.5 * sizes[""]
