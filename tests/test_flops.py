"""Model FLOPs (megaprorl/models/flops.py): the parameter count behind them is the built Megatron model's, and the
trainer's per-step perf/* figures are those FLOPs over the step's timings."""

import os

import pytest

from megaprorl.models.flops import param_count, peak_tflops, shape_of, train_flops, train_flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("overrides", [
    {},  # Qwen2: QKV bias, untied
    {"tie_embeddings": True, "qk_norm": True, "add_qkv_bias": False, "head_dim": 32},  # Qwen3: head_dim != h / heads
    dict(num_experts=4, moe_topk=2, moe_ffn_hidden_size=32, moe_norm_topk_prob=True, qk_norm=True, head_dim=16,
         add_qkv_bias=False),  # Qwen3-MoE
    dict(num_experts=4, moe_topk=2, moe_ffn_hidden_size=32, moe_norm_topk_prob=False,
         moe_shared_expert_ffn_hidden_size=48),  # Qwen2-MoE: a shared expert and its gate
], ids=["qwen2", "qwen3", "qwen3-moe", "qwen2-moe"])
def test_the_shape_of_a_config_counts_the_built_models_parameters(overrides):
    from tiny_models import tiny_policy, tiny_policy_cfgs

    from megaprorl.models.gpt import padded_vocab_size

    pol, tok = tiny_policy(overrides)
    mcfg = tiny_policy_cfgs(**overrides)[0]
    p = shape_of(mcfg, padded_vocab_size(tok.vocab_size, mcfg.make_vocab_divisible_by, 1))
    assert param_count(p) == sum(t.numel() for t in pol.model.parameters())
    if not overrides.get("num_experts"):
        assert param_count(p, active=True) == param_count(p)
    else:  # the router, moe_topk of the experts, the shared expert and its gate
        expert = 3 * 64 * 32
        assert param_count(p) - param_count(p, active=True) == 2 * (4 - 2) * expert


def test_train_flops_adds_each_sequences_own_attention():
    p = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, vocab=100)
    matmul = param_count(p) - 100 * 64  # the untied embedding is a lookup
    assert train_flops_per_token(p, 0) == 6 * matmul
    # causal attention, fwd + bwd: 6 * layers * heads * head_dim * s per token, s tokens
    assert train_flops(p, [3, 10]) == pytest.approx(6 * matmul * 13 + 6 * 2 * 4 * 16 * (3 * 3 + 10 * 10))
    assert train_flops(p, []) == 0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA GB200") == 2250.0
    assert peak_tflops("cpu") == 0.0 and peak_tflops("anything", 123.0) == 123.0


def test_the_trainer_logs_tflops_and_mfu_of_its_step(tmp_path):
    """One RL step's perf/* figures: the update's and the trainer's (log-prob passes too) TFLOP/s, and their MFU
    against logging.peak_tflops; the trainer's are the update's FLOPs x (1 + forwards / 3) over both timings."""
    from megaprorl.config import load_config
    from megaprorl.trainer import Trainer

    t = Trainer(load_config(os.path.join(ROOT, "examples", "demo.yaml"), [
        f"output_dir={tmp_path}", "warmstart.steps=0", "train.prompts_per_step=4", "train.mini_batch_prompts=4",
        "rollout.n_samples=2", "logging.progress=false", "model.num_layers=1", "model.hidden_size=32",
        "model.ffn_hidden_size=64", "rewards.num_workers=0", "algo.kl.coef=0.01", "logging.peak_tflops=0.5"]))
    try:
        seen = []
        perf = t._perf_stats

        def spy(seq_lens, t_logprob, t_update):
            seen.append(list(seq_lens))
            return perf(seq_lens, t_logprob, t_update)

        t._perf_stats = spy
        stats = t.rl_step()
    finally:
        t.close()
    (lens,) = seen
    assert len(lens) == 8 and min(lens) > 0
    fb = train_flops(t.flops_shape, lens)
    assert stats["perf/tflops_update"] == pytest.approx(fb / stats["time/update_s"] / 1e12, rel=1e-6)
    # old log-probs recomputed and a reference (algo.kl.coef > 0): two forwards, each a third of a fwd + bwd
    both = stats["time/logprob_s"] + stats["time/update_s"]
    assert stats["perf/tflops_trainer"] == pytest.approx(fb * (1 + 2 / 3) / both / 1e12, rel=1e-6)
    assert stats["perf/mfu_update"] == pytest.approx(stats["perf/tflops_update"] / 0.5)
    assert stats["perf/mfu_trainer"] == pytest.approx(stats["perf/tflops_trainer"] / 0.5)
