"""Distributed checkpoints (Megatron dist_checkpointing): saved at TP=2, loaded at TP=1 (and back),
the model gives the same logits, the reference is restored, and the next update — which depends on
AdamW's moments — is the same as if the run had continued at the saved layout."""

import pytest
import torch

from dist_utils import run_distributed
from tiny_models import tiny_policy_cfgs


def _batch():
    from megaprorl.algo.loss import aggregation_weights
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.policy import build_seq_batch

    tok = CharTokenizer()
    g = torch.Generator().manual_seed(5)
    prompts = [tok.encode(s) for s in ["1+2=", "13+45=", "7+88=", "99+1="]]
    resp = [torch.randint(2, tok.vocab_size, (k,), generator=g).tolist() for k in (3, 5, 2, 4)]
    b = build_seq_batch(prompts, resp, tok.pad_id)
    b.advantages = torch.randn(b.loss_mask.shape, generator=g) * b.loss_mask
    b.weights = aggregation_weights(b.loss_mask, "token-mean", float(b.loss_mask.sum()), len(b))
    b.old_logp = torch.full(b.loss_mask.shape, -3.0)
    b.ref_logp = torch.full(b.loss_mask.shape, -3.1)
    return b, tok


def _full_logits(pol, tokens, vocab):
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    with torch.no_grad():
        L = tokens.shape[1]
        x = pol.model(tokens, torch.arange(L)[None].expand(tokens.shape[0], -1), None)
    g = mps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(g))]
    dist.all_gather(parts, x.contiguous(), group=g)
    return torch.cat(parts, -1)[..., :vocab]


def _job(rank, world, tp, ckpt, mode, model=None):
    """mode 'save': one update, save, then a second update; 'load': load, then the second update."""
    from megatron.core import parallel_state as mps

    from megaprorl.algo.loss import LossSpec
    from megaprorl.dist_ckpt import load_policy, save_policy
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    info = init_distributed(tp, 1)
    torch.manual_seed(7)
    m, p, o = tiny_policy_cfgs(**(model or {}))
    p.tensor_parallel = tp
    batch, tok = _batch()
    pol = Policy(m, p, o, tok.vocab_size, info.device, "torch")
    ref = Policy(m, p, o, tok.vocab_size, info.device, "torch", trainable=False)
    spec = LossSpec(kl_coef=0.1)
    out = {}
    if mode == "save":
        pol.train_step(batch, spec, 2)
        save_policy(ckpt, pol, ref, extra_common={"step": 1})
    else:
        common = load_policy(ckpt, pol, ref)
        out["common"] = common
    out["logits"] = _full_logits(pol, batch.tokens, tok.vocab_size)
    out["ref_logits"] = _full_logits(ref, batch.tokens, tok.vocab_size)
    out["stats"] = pol.train_step(batch, spec, 2)
    out["logits_after"] = _full_logits(pol, batch.tokens, tok.vocab_size)
    mps.destroy_model_parallel()
    return out


@pytest.mark.parametrize("save_tp,load_tp,model", [(2, 1, None), (1, 2, dict(qk_norm=True, head_dim=32, add_qkv_bias=False))],
                         ids=["tp2-to-tp1", "tp1-to-tp2-qwen3"])
def test_checkpoint_resumes_on_another_tensor_parallel_layout(tmp_path, save_tp, load_tp, model):
    """TP=2 -> TP=1 on the Qwen2 shape; TP=1 -> TP=2 on the Qwen3 shape (the replicated q/k norms and their
    Adam moments on both ranks)."""
    ckpt = str(tmp_path / "ckpt")
    saved = run_distributed(_job, save_tp, (save_tp, ckpt, "save", model))[0]
    loaded = run_distributed(_job, load_tp, (load_tp, ckpt, "load", model))
    for out in loaded:
        assert out["common"] == {"step": 1}
        torch.testing.assert_close(out["logits"], saved["logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["ref_logits"], saved["ref_logits"], rtol=0, atol=1e-5)
        assert not torch.allclose(out["logits"], out["ref_logits"])  # the update moved the policy
        for k in ("loss", "grad_norm", "entropy", "kl_ref"):
            assert out["stats"][k] == pytest.approx(saved["stats"][k], rel=1e-5), k
        # AdamW's moments came back: the second update lands where the saved layout's did
        torch.testing.assert_close(out["logits_after"], saved["logits_after"], rtol=0, atol=1e-5)


def test_load_errors_name_the_checkpoint(tmp_path):
    from megaprorl.dist_ckpt import load_policy
    from tiny_models import tiny_policy

    pol, _ = tiny_policy()
    missing = tmp_path / "nowhere"
    with pytest.raises(Exception, match="nowhere"):
        load_policy(str(missing), pol)


# ------------------------------------------------------------------------------ trainer checkpoints
def _trainer_job(rank, world, out_dir, mode, layout="tp", extra=()):
    """A tiny trainer: 'save' trains 2 RL steps and checkpoints; 'load' resumes that checkpoint at
    this world size (one rank saved it, two load it: TP=2 or PP=2 here) and reports what it restored.
    Both then take one more RL step (at PP=2: the embedded engine decodes across the two stages).
    ``extra``: more config overrides (test_moe.py's MoE model)."""
    import os

    from megatron.core import parallel_state as mps

    from megaprorl.config import load_config
    from megaprorl.policy import build_seq_batch
    from megaprorl.trainer import Trainer
    from test_reset import ROOT, TINY

    tp, pp = (world, 1) if layout == "tp" else (1, world)
    over = [f"output_dir={out_dir}", *TINY, "model.num_query_groups=2", "model.num_layers=2",
            f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}", *extra]
    t = Trainer(load_config(os.path.join(ROOT, "examples", "demo.yaml"), over))
    try:
        if mode == "save":
            t.warmstart()
            for _ in range(2):
                t.rl_step()
                t.step += 1
            t.save_checkpoint()
        else:
            from megaprorl import checkpoint as ckpt

            path = ckpt.find_latest(t.ckpt_dir, world)  # saved by one rank: usable by two (model/ inside)
            assert path is not None
            t.load_checkpoint(path)
        batch = build_seq_batch([[3, 4, 5, 6], [7, 8]], [[9, 10, 1], [11, 1]], 0)
        out = dict(step=t.step, policy=t.policy.logprobs(batch, 2), reference=t.reference.logprobs(batch, 2),
                   adam_steps={float(s["step"]) for s in t.policy.adam_states()})
        out["next"] = {k: v for k, v in t.rl_step().items() if k in ("reward", "loss", "response_length", "entropy",
                                                                   "grad_norm")}
        return out
    finally:
        t.close()
        mps.destroy_model_parallel()


@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_trainer_checkpoint_resumes_at_another_world_size(tmp_path, layout):
    saved = run_distributed(_trainer_job, 1, (str(tmp_path), "save", layout))[0]
    loaded = run_distributed(_trainer_job, 2, (str(tmp_path), "load", layout))
    assert saved["step"] == 2 and saved["adam_steps"] == {2.0}
    assert set(saved["next"]) == {"reward", "loss", "response_length", "entropy", "grad_norm"}
    for out in loaded:
        assert out["step"] == 2 and out["adam_steps"] == {2.0}
        torch.testing.assert_close(out["policy"], saved["policy"], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["reference"], saved["reference"], rtol=0, atol=1e-5)
        for k, v in saved["next"].items():  # the resumed run's next step: same rollouts, same update
            assert out["next"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert not torch.allclose(saved["policy"], saved["reference"])  # the two are distinct states
