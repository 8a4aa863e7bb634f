"""Sequence parallelism on the local spec (TorchNorm), over gloo at TP=2: the policy with
``parallel.sequence_parallel`` equals the same policy without it, in log-probs, entropies, loss statistics
and every parameter's gradient (the norms' partial gradients all-reduced by Megatron's
``finalize_model_grads``), in padded and packed micro-batches, with the logits path and the fused LM head;
the embedded engine (sequence parallelism off while it decodes) returns the same rollouts, and its lean
decode stage returns Megatron's forward's rollouts exactly (TP=2, and TP=2 x PP=2)."""

import copy

import pytest
import torch

from dist_utils import run_distributed
from test_pipeline import _generate
from tiny_models import tiny_policy_cfgs


QWEN3 = dict(qk_norm=True, head_dim=32, add_qkv_bias=False)  # per-head q/k norms, heads x head_dim = 2 x hidden


def _policy(tp, pp, sp, pack, fused, model):
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.policy import Policy

    torch.manual_seed(0)
    m, p, o = tiny_policy_cfgs(**model)
    p.tensor_parallel, p.pipeline_parallel, p.sequence_parallel = tp, pp, sp
    tok = CharTokenizer()
    pol = Policy(m, p, o, tok.vocab_size, torch.device("cpu"), "torch", pack_tokens=pack, pad_id=tok.pad_id,
                 fused_lm_head=fused, lm_head_token_chunk=5)
    pol.optimizer.step_with_ready_grads = lambda: True  # compare gradients, not updates
    return pol, tok


def _job(rank, world, pp, pack, fused, engine, model):
    from megaprorl.algo.loss import LossSpec
    from megaprorl.parallel import init_distributed
    from test_fused_lm_head_policy import _batch

    init_distributed(world // pp, pp)
    out = {}
    state = None
    for sp in (False, True):
        pol, tok = _policy(world // pp, pp, sp, pack, fused, model)
        if state is None:
            state = copy.deepcopy(pol.model.state_dict())
        else:
            pol.model.load_state_dict(state)
        assert pol.model.config.sequence_parallel == sp
        norms = [q for n, q in pol.model.named_parameters() if "layernorm" in n]
        assert norms and all(getattr(q, "sequence_parallel", None) is sp for q in norms)
        assert any("q_layernorm" in n for n, _ in pol.model.named_parameters()) == bool(model.get("qk_norm"))
        batch = _batch(tok)
        lp, ent = pol.logprobs(batch, 2, temperature=0.7, with_entropy=True)
        stats = pol.train_step(batch, LossSpec(kl_coef=0.1, eps_low=0.2, eps_high=0.28), micro_batch_size=2,
                               temperature=0.7)
        grads = {n: q.grad.detach().clone() for n, q in pol.model.named_parameters() if q.grad is not None}
        out[sp] = dict(lp=lp, ent=ent, stats=stats, grads=grads, mask=batch.loss_mask > 0,
                       rollouts=_generate(pol, tok) if engine else None)
        if engine and not sp:  # the lean decode stage (TP reductions, PP stages) = Megatron's forward, exactly
            assert _generate(pol, tok, lean=False) == _generate(pol, tok, continuous=False)
        assert pol.model.config.sequence_parallel == sp  # restored after generating
    return out


def _compare(results):
    for r in results:
        a, b = r[False], r[True]
        m = a["mask"]
        torch.testing.assert_close(b["lp"][m], a["lp"][m], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["ent"][m], a["ent"][m], rtol=1e-5, atol=1e-5)
        for k in ("loss", "entropy", "kl_ref", "clip_frac_low", "clip_frac_high", "tokens", "grad_norm"):
            assert b["stats"][k] == pytest.approx(a["stats"][k], rel=1e-5, abs=1e-7), k
        assert set(b["grads"]) == set(a["grads"]) and any("layernorm" in n for n in a["grads"])
        for n in a["grads"]:
            torch.testing.assert_close(b["grads"][n], a["grads"][n], rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")
        if a["rollouts"] is not None:
            for g_runs, w_runs in zip(b["rollouts"], a["rollouts"]):
                assert [x[0] for x in g_runs] == [x[0] for x in w_runs]
                for (_, g_lp, _), (_, w_lp, _) in zip(g_runs, w_runs):
                    assert g_lp == pytest.approx(w_lp, abs=1e-5)


@pytest.mark.parametrize("pack,fused,engine,model", [(0, False, True, {}), (20, True, False, QWEN3)],
                         ids=["padded-qwen2", "packed-fused-qwen3"])
def test_sequence_parallel_equals_tensor_parallel(pack, fused, engine, model):
    """TP=2: padded micro-batches with the logits path and the engine; packed ones with the fused LM head
    (its input all-gathered along the sequence, its gradient reduce-scattered) on the Qwen3 shape (its q/k
    norms, marked sequence-parallel like every norm, see all tokens of their heads: one TP sum either way)."""
    _compare(run_distributed(_job, 2, (1, pack, fused, engine, model)))


def test_sequence_parallel_under_pipeline_parallelism():
    """TP=2 x PP=2 (four ranks): Megatron's schedule sends [s/TP, b, h] between stages; the engine decodes
    with sequence parallelism off on every stage."""
    _compare(run_distributed(_job, 4, (2, 0, False, True, {})))


def test_sequence_parallel_with_the_local_spec_is_a_valid_config():
    from megaprorl.config import load_config

    cfg = load_config("examples/demo.yaml", ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                                             "model.num_query_groups=2", "model.transformer_impl=local"])
    assert cfg.parallel.sequence_parallel
