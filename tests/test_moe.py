"""Mixture-of-experts policies (the Qwen3-MoE shape: ``model.num_experts``) through the trainer: at TP=2 (with the
sequence parallelism Megatron's MoE layer needs there) RL steps run and checkpoint, the checkpoint resumes at
TP=1 with the same log-probs and the same next step, and exported as an HF directory it loads in transformers'
Qwen3-MoE with the same log-probs.  The HF <-> Megatron mapping itself is in test_convert.py (families
qwen3_moe and qwen3_moe_raw)."""

import os

import pytest
import torch

from dist_utils import run_distributed
from test_reset import ROOT, TINY

pytest.importorskip("megatron.core")

MOE = ["model.num_experts=4", "model.moe_topk=2", "model.moe_ffn_hidden_size=32", "model.qk_norm=true",
       "model.add_qkv_bias=false", "model.num_query_groups=2", "model.num_layers=2"]
PROMPTS, RESPONSES = [[3, 4, 5, 6], [7, 8]], [[9, 10, 1], [11, 1]]  # test_dist_ckpt's job's batch


def test_moe_policy_trains_at_tp2_resumes_at_tp1_and_exports_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megaprorl.export import export_checkpoint_to_hf
    from megaprorl.policy import build_seq_batch

    from test_dist_ckpt import _trainer_job

    moe = MOE + ["parallel.sequence_parallel=true"]  # at TP=2, and ignored at TP=1
    saved = run_distributed(_trainer_job, 2, (str(tmp_path), "save", "tp", moe))
    loaded = run_distributed(_trainer_job, 1, (str(tmp_path), "load", "tp", moe))[0]
    assert all(s["step"] == 2 and s["adam_steps"] == {2.0} for s in saved) and loaded["step"] == 2
    for s in saved:
        torch.testing.assert_close(loaded["policy"], s["policy"], rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded["reference"], s["reference"], rtol=0, atol=1e-5)
        for k, v in s["next"].items():  # the resumed run's next step: same rollouts, same update
            assert loaded["next"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    hf_dir = str(tmp_path / "hf")
    export_checkpoint_to_hf(str(tmp_path / "demo"), hf_dir, log=lambda *a: None)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    batch = build_seq_batch(PROMPTS, RESPONSES, 0)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch.tokens).logits[:, :-1].float(), -1)
    want = logp.gather(-1, batch.tokens[:, 1:, None])[..., 0]
    mask = batch.loss_mask.bool()  # the response tokens (the rows are right-padded)
    torch.testing.assert_close(want[mask], saved[0]["policy"][mask], rtol=0, atol=1e-4)


def _dp_job(rank, world, out_dir):
    from megatron.core import parallel_state as mps

    from megaprorl.config import load_config
    from megaprorl.trainer import Trainer

    over = [f"output_dir={out_dir}", *TINY, *MOE, "train.optim.distributed_optimizer=true"]
    t = Trainer(load_config(os.path.join(ROOT, "examples", "demo.yaml"), over))
    try:
        t.warmstart()
        before = {n: p.detach().clone() for n, p in t.policy.model.named_parameters()}
        stats = t.rl_step()
        after = {n: p.detach().clone() for n, p in t.policy.model.named_parameters()}
        return dict(stats={k: stats[k] for k in ("loss", "grad_norm", "moe/load_max_over_mean", "moe/routed_tokens")},
                    moved=sorted(n for n in after if not torch.equal(after[n], before[n])), after=after)
    finally:
        t.close()
        mps.destroy_model_parallel()


def test_moe_policy_with_the_distributed_optimizer_at_dp2(tmp_path):
    """Two data-parallel replicas, Megatron's distributed optimizer (the experts' parameters in their own buffers,
    reduced over the expert data-parallel group): one RL step updates the router and every expert, finitely, and
    leaves the replicas equal; the step's metrics hold the experts' load."""
    r0, r1 = run_distributed(_dp_job, 2, (str(tmp_path),))
    for r in (r0, r1):
        assert all(torch.isfinite(torch.tensor(float(v))) for v in r["stats"].values())
        assert r["stats"]["moe/routed_tokens"] > 0 and r["stats"]["moe/load_max_over_mean"] >= 1.0  # logged
        assert any(n.endswith("mlp.router.weight") for n in r["moved"]), (r["stats"], r["moved"])
        assert {n.split("local_experts.")[1].split(".")[0] for n in r["moved"] if "local_experts" in n} == \
            {"0", "1", "2", "3"}
    for n, v in r0["after"].items():
        assert torch.equal(v, r1["after"][n]), n


def test_moe_config_checks():
    from megaprorl.config import ConfigError, load_config

    demo = os.path.join(ROOT, "examples", "demo.yaml")
    cfg = load_config(demo, MOE)
    assert cfg.model.num_experts == 4 and cfg.model.moe_norm_topk_prob
    qwen2 = ["model.qk_norm=false", "model.add_qkv_bias=true", "model.moe_shared_expert_ffn_hidden_size=48"]
    assert load_config(demo, MOE + qwen2).model.moe_shared_expert_ffn_hidden_size == 48  # the Qwen2-MoE shape
    for extra, msg in [(["model.moe_topk=5"], "'model.moe_topk': must be in 1..model.num_experts"),
                       (["parallel.tensor_parallel=2"], "'parallel.sequence_parallel': must be true for an MoE"),
                       (["model.qk_norm=false"], "'model.num_experts': an MoE model is the Qwen3-MoE shape"),
                       (["model.moe_shared_expert_ffn_hidden_size=48"], "or the Qwen2-MoE shape"),
                       (["rollout.cuda_graphs=true", "rollout.decode_attention=triton"],
                        "'rollout.cuda_graphs': an MoE model's decode step .* depend on the routing"),
                       (["model.moe_ffn_hidden_size=33", "parallel.tensor_parallel=2",
                         "parallel.sequence_parallel=true"], "'model.moe_ffn_hidden_size': must be divisible")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(demo, MOE + extra)


def test_moe_checkpoint_saved_at_one_rank_resumes_at_pp2(tmp_path):
    """The MoE checkpoint of one rank loads at PP=2 (each stage its layers' routers and experts), with the same
    log-probs and the same next step (the engine decoding across the two stages)."""
    from test_dist_ckpt import _trainer_job

    saved = run_distributed(_trainer_job, 1, (str(tmp_path), "save", "pp", MOE))[0]
    for out in run_distributed(_trainer_job, 2, (str(tmp_path), "load", "pp", MOE)):
        assert out["step"] == 2 and out["adam_steps"] == {2.0}
        torch.testing.assert_close(out["policy"], saved["policy"], rtol=0, atol=1e-5)
        for k, v in saved["next"].items():
            assert out["next"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def _load_job(rank, world, hf_dir, tp, pp, pack):
    """The expert-load statistics of one log-prob pass over the HF model's weights, at this layout."""
    from types import SimpleNamespace

    from megatron.core import parallel_state as mps

    from megaprorl.models import convert as C
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy
    from test_convert import _mcfg
    from test_packing import _batch
    from tiny_models import tiny_policy_cfgs

    info = init_distributed(tp, pp)
    p = SimpleNamespace(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=tp > 1)
    tok = CharTokenizer()
    hf_config = C.load_hf_config(hf_dir)
    pol = Policy(_mcfg(hf_dir, "sdpa"), p, tiny_policy_cfgs()[2], C.hf_vocab_size(hf_config), info.device, "torch",
                 trainable=False, pad_id=tok.pad_id, pack_tokens=pack)
    C.load_hf_into_model(pol.model, hf_dir, hf_config)
    batch = _batch(tok)
    pol.logprobs(batch, 3, expert_load=True)  # 9 rows: micro-batches of one shape (PP needs it)
    out = dict(pol.last_expert_load, real=int(batch.lengths.sum()))
    pol.logprobs(batch, 3)  # not asked: the hooks are gone, the last statistics stay
    assert not any(layer.mlp.router._forward_hooks for layer in pol.model.decoder.layers)
    mps.destroy_model_parallel()
    return out


def test_expert_load_counts_the_real_tokens_whatever_the_layout(tmp_path):
    """``Policy.logprobs(expert_load=True)`` counts the tokens each router sends to each expert, padding left out:
    every real token k times per layer, and the same counts padded or packed, at TP=1, at TP=2 under sequence
    parallelism (each rank's chunk of the sequence, summed) and at PP=2 (each stage its layers, averaged over all)."""
    transformers = pytest.importorskip("transformers")
    from megaprorl.models.tokenizer import CharTokenizer
    from test_convert import _hf_config

    torch.manual_seed(0)
    cfg = _hf_config("qwen3_moe")
    cfg.vocab_size = CharTokenizer().vocab_size
    hf_dir = str(tmp_path / "hf")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(hf_dir)
    layouts = ((1, 1, 0), (1, 1, 24), (2, 1, 0), (1, 2, 0))  # (TP, PP, pack tokens)
    runs = {lay: run_distributed(_load_job, lay[0] * lay[1], (hf_dir, *lay)) for lay in layouts}
    want = runs[(1, 1, 0)][0]
    assert want["moe/routed_tokens"] == 2 * want["real"]  # top-2
    assert 1.0 <= want["moe/load_max_over_mean"] <= 4.0 and 0.0 <= want["moe/dead_experts_frac"] < 1.0
    for outs in runs.values():
        for out in outs:
            for k in ("moe/routed_tokens", "moe/load_max_over_mean", "moe/dead_experts_frac"):
                assert out[k] == pytest.approx(want[k], rel=1e-9), k
