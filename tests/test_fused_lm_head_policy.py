"""train.fused_lm_head: the policy's log-prob pass and RL loss from hidden states and the output weight
(no [T, V] logits) equal the logits path: log-probs, entropies, loss statistics and every gradient, with
a temperature, padded vocabulary rows, tied embeddings, packed sequences, and under TP=2 (the hidden
states' gradient all-reduced over the TP group) and PP=2 (the head on the last stage), over gloo."""

import copy
import os

import pytest
import torch

from dist_utils import run_distributed
from tiny_models import tiny_policy_cfgs

INTERPRET = {"TRITON_INTERPRET": "1", "MEGAPRORL_TRITON_BLOCK_V": "16"}


def _batch(tok):
    from test_packing import _batch as packing_batch

    return packing_batch(tok, n=6, seed=7)  # 6 rows: 3 micro-batches of 2


def _job(rank, world, tp, pp, backend, pack, tie, divisible=8):
    if backend == "triton":  # the gloo children run the Triton kernels in the CPU interpreter
        os.environ.update(INTERPRET)
    from megaprorl.algo.loss import LossSpec
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    info = init_distributed(tp, pp)
    torch.manual_seed(0)
    m, p, o = tiny_policy_cfgs(tie_embeddings=tie, make_vocab_divisible_by=divisible)
    p.tensor_parallel, p.pipeline_parallel = tp, pp
    tok = CharTokenizer()
    pol = Policy(m, p, o, tok.vocab_size, info.device, backend, pack_tokens=pack, pad_id=tok.pad_id,
                 lm_head_token_chunk=5)
    head = getattr(pol.model, "output_layer", None)
    if head is not None and head.weight is not None:
        assert head.weight.shape[0] * tp > tok.vocab_size  # padded vocabulary rows exist
    state = copy.deepcopy(pol.model.state_dict())
    pol.optimizer.step_with_ready_grads = lambda: True  # compare gradients, not updates
    batch = _batch(tok)
    spec = LossSpec(kl_coef=0.1, eps_low=0.2, eps_high=0.28)
    out = {}
    for fused in (False, True):
        pol.model.load_state_dict(state)
        pol.fused_lm_head = fused
        lp, ent = pol.logprobs(batch, 2, temperature=0.7, with_entropy=True)
        stats = pol.train_step(batch, spec, micro_batch_size=2, temperature=0.7)
        grads = {n: q.grad.detach().clone() for n, q in pol.model.named_parameters() if q.grad is not None}
        out[fused] = dict(lp=lp, ent=ent, stats=stats, grads=grads)
    return out


def _compare(res):
    for r in res:
        a, b = r[False], r[True]
        m = _batch_mask()
        torch.testing.assert_close(b["lp"][m], a["lp"][m], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["ent"][m], a["ent"][m], rtol=1e-5, atol=1e-5)
        for k in ("loss", "entropy", "kl_ref", "clip_frac_low", "clip_frac_high", "tokens"):
            assert b["stats"][k] == pytest.approx(a["stats"][k], rel=1e-5, abs=1e-7), k
        assert b["stats"]["grad_norm"] == pytest.approx(a["stats"]["grad_norm"], rel=1e-5)
        assert set(b["grads"]) == set(a["grads"]) and a["grads"]
        for n in a["grads"]:
            torch.testing.assert_close(b["grads"][n], a["grads"][n], rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")


def _batch_mask():
    from megaprorl.models.tokenizer import CharTokenizer

    return _batch(CharTokenizer()).loss_mask > 0


# padded micro-batches are covered by the TP and PP cases below (pack 0)
@pytest.mark.parametrize("backend,pack,tie", [("torch", 20, True), ("triton", 20, False)])
def test_fused_lm_head_equals_logits_on_one_rank(backend, pack, tie):
    pytest.importorskip("triton") if backend == "triton" else None
    _compare(run_distributed(_job, 1, (1, 1, backend, pack, tie)))


@pytest.mark.parametrize("tp,pp,backend,divisible", [(2, 1, "triton", 8), (1, 2, "torch", 8), (2, 1, "torch", 64)])
def test_fused_lm_head_equals_logits_under_tp_and_pp(tp, pp, backend, divisible):
    """divisible 64: 128 vocabulary rows over 2 ranks for 47 tokens, so rank 1 holds only padding and
    contributes an empty shard."""
    pytest.importorskip("triton") if backend == "triton" else None
    _compare(run_distributed(_job, tp * pp, (tp, pp, backend, 0, False, divisible)))


def test_fused_lm_head_config_reaches_the_policy():
    from megaprorl.config import ConfigError, load_config

    cfg = load_config("examples/demo.yaml", ["train.fused_lm_head=true", "train.lm_head_token_chunk=512"])
    assert cfg.train.fused_lm_head is True and cfg.train.lm_head_token_chunk == 512
    with pytest.raises(ConfigError, match="lm_head_token_chunk"):
        load_config("examples/demo.yaml", ["train.lm_head_token_chunk=0"])


@pytest.mark.gpu
def test_fused_lm_head_equals_logits_bf16_on_gpu():
    """bf16 on CUDA, the compiled Triton kernels (LM head and logits loss, in-place gradient): the fused
    head's log-probs, loss and gradient norm match the logits path within bf16 tolerances."""
    from megaprorl.algo.loss import LossSpec
    from tiny_models import tiny_policy

    pol, tok = tiny_policy({"params_dtype": "bf16"}, pack_tokens=24)
    pol.kernel_backend = "triton"
    pol.optimizer.step_with_ready_grads = lambda: True  # compare at fixed weights
    batch = _batch(tok)
    m = batch.loss_mask > 0
    res = {}
    for fused in (False, True):
        pol.fused_lm_head = fused
        lp = pol.logprobs(batch, 2)
        res[fused] = (lp, pol.train_step(batch, LossSpec(kl_coef=0.1), 2))
    torch.testing.assert_close(res[True][0][m], res[False][0][m], rtol=0, atol=5e-2)
    assert res[True][1]["loss"] == pytest.approx(res[False][1]["loss"], abs=2e-2)
    assert res[True][1]["grad_norm"] == pytest.approx(res[False][1]["grad_norm"], rel=5e-2)
