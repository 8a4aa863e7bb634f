"""`megaprorl bench step` on the CPU: the tiny preset runs every phase and writes its JSON report."""

import json

import pytest


@pytest.mark.parametrize("extra", [[], ["--skip-rollout", "--ragged", "--pack-tokens", "64", "--distributed-optimizer",
                                                     "--offload"],
                                   ["--preset", "tiny-qwen3", "--rollout-batch-size", "8", "--stop-rate", "0.1"],
                                   ["--prompts", "2", "--n-samples", "2", "--decode-attention", "triton"],
                                   ["--preset", "tiny-moe", "--prompts", "2", "--n-samples", "2"]],
                         ids=["tiny", "tiny-packed", "tiny-qwen3", "tiny-triton", "tiny-moe"])
def test_bench_step_tiny_writes_report(tmp_path, extra):
    from megaprorl.bench.step import main

    out = tmp_path / "bench_step.json"
    assert main(["--preset", "tiny", "--repeats", "1", "--out", str(out), "--peak-tflops", "2", *extra]) == 0
    rep = json.loads(out.read_text())
    preset = extra[extra.index("--preset") + 1] if "--preset" in extra else "tiny"
    assert rep["preset"] == preset
    t = rep["times_s"]
    for phase in ("rollout", "sleep", "reward", "logprob", "update", "weight_sync", "total"):
        assert t[phase] >= 0.0, phase
    assert t["logprob"] > 0 and t["update"] > 0 and t["tokens"] > 0
    assert rep["tokens_per_s_trainer"] > 0
    # MFU: the step's model FLOPs (each sequence's attention by its own length) over the time and the peak
    assert t["flops"] > 0 and rep["mfu_update"] == pytest.approx(t["flops"] / t["update"] / 2e12)
    n_fwd = 1 + ("--no-reference" not in extra)
    assert rep["mfu_trainer"] == pytest.approx(t["flops"] * (1 + n_fwd / 3) / (t["logprob"] + t["update"]) / 2e12)
    from megaprorl.bench.step import PRESETS, param_count

    # the refit stream sends every parameter of the HF checkpoint once (no vocab padding), in bf16
    assert round(rep["refit_stream"]["gb"] * 1e9) == 2 * param_count(PRESETS[rep["preset"]])
    assert rep["refit_stream"]["seconds"] > 0 and rep["refit_stream"]["buckets"] >= 1
    assert rep["distributed_optimizer"] == ("--distributed-optimizer" in extra)
    assert rep["pack_tokens"] == (64 if "--pack-tokens" in extra else 0)
    assert rep["offload"] == ("--offload" in extra)
    if rep["offload"]:  # the policy's optimizer state and gradients, then the reference's weights
        assert len(rep["offload_gb"]) == 2 and min(rep["offload_gb"]) > 0 and t["offload"] > 0
    if "--skip-rollout" not in extra:
        assert t["rollout"] > 0  # the embedded engine decoded the responses
        assert rep["rollout_tokens_per_s"] > 0
        assert 0 < rep["engine"]["decode_row_steps"] <= rep["engine"]["dense_row_steps"]
        rows = 8 if "tiny-qwen3" in extra else 4 if "--prompts" in extra else 32
        assert rep["continuous_batching"] and rep["rollout_batch_size"] == rows and rep["engine_name"] == "megatron"
        assert rep["decode_attention"] == ("triton" if "triton" in extra else "sdpa")  # the interpreter on a CPU
        assert 0 < rep["engine"]["keys_own"] <= rep["engine"]["keys_span"]
        if "--stop-rate" in extra:  # responses end early and unevenly: rows were refilled
            assert rep["engine"]["admissions"] > rep["engine"]["rollouts"] / 8 and t["response_tokens"] < 32 * 16
    else:
        assert rep["rollout_tokens_per_s"] is None and rep["engine"] is None


def test_bench_step_trtllm_needs_a_gpu(tmp_path):
    from megaprorl.bench.step import main

    with pytest.raises(SystemExit, match="error: rollout.engine=trtllm runs on CUDA GPUs; this process sees none"):
        main(["--preset", "tiny", "--repeats", "1", "--out", str(tmp_path / "b.json"), "--engine", "trtllm"])


@pytest.mark.parametrize("preset", ["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b",
                                    "qwen3-30b-a3b"])
def test_preset_parameter_counts_are_the_models(preset):
    """param_count (the MFU's N) = the parameters of the HF model of the preset's shape (built on the meta
    device from the config.json the export would write: Qwen2 with a QKV bias, Qwen3 with q/k norms)."""
    from types import SimpleNamespace

    import torch

    transformers = pytest.importorskip("transformers")
    from megaprorl.bench.step import PRESETS
    from megaprorl.models.flops import param_count, train_flops_per_token
    from megaprorl.models.convert import hf_config_from_model_config

    p = PRESETS[preset]
    mcfg = SimpleNamespace(**{k: v for k, v in p.items() if k != "vocab"}, max_position_embeddings=4096,
                           rotary_base=1e6, norm_epsilon=1e-6, params_dtype="bf16")
    mcfg.add_qkv_bias = p.get("add_qkv_bias", True)
    mcfg.tie_embeddings = p.get("tie_embeddings", False)
    mcfg.moe_norm_topk_prob = True
    hf_cfg = hf_config_from_model_config(mcfg, p["vocab"])
    assert hf_cfg["model_type"] == preset.split("-")[0] + ("_moe" if p.get("num_experts") else "")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_cfg))
    assert param_count(p) == sum(t.numel() for t in model.parameters())
    embedding = 0 if mcfg.tie_embeddings else p["vocab"] * p["hidden_size"]  # a lookup, no FLOPs
    active = param_count(p, active=True)
    assert train_flops_per_token(p, 0) == 6 * (active - embedding)
    if p.get("num_experts"):  # the router and 8 of the 128 experts per token: Qwen3-30B-A3B's 30.5B and 3.3B
        assert round(param_count(p) / 1e8) == 305 and 3.3e9 < active < 3.4e9
    else:
        assert active == param_count(p)


def test_attention_probe_writes_report(tmp_path):
    """scripts/attn_probe.py (packed attention paths): runs on the CPU, records what cannot run there."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "attn_probe.py"
    spec = importlib.util.spec_from_file_location("attn_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "attn_probe.json"
    assert probe.main(["--device", "cpu", "--tokens", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
                       "--seqs", "1", "3", "--iters", "1", "--paths", "per_sequence:default", "varlen", "padded",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 3 * 2
    ran = {(r["seqs"], r["path"], r["regime"]) for r in rows if r["ms"] is not None}
    assert (3, "per_sequence:default", "fresh") in ran and (3, "padded", "repeat") in ran
    assert all(r["error"] for r in rows if r["path"] == "varlen")  # FlashAttention varlen: CUDA only


def _bench_job(rank, world, out, extra):
    from megatron.core import parallel_state as mps

    from megaprorl.bench.step import main

    try:
        return main(["--preset", "tiny", "--repeats", "1", "--out", out, *extra])
    finally:
        mps.destroy_model_parallel()


@pytest.mark.parametrize("layout", [["--tp", "2", "--sequence-parallel"], ["--pp", "2"]])
def test_bench_step_over_two_ranks(tmp_path, layout):
    """TP=2 with sequence parallelism and PP=2 under gloo: every phase runs (at PP=2 the rollout decodes
    across both stages)."""
    from dist_utils import run_distributed

    out = tmp_path / "bench_step.json"
    assert run_distributed(_bench_job, 2, (str(out), layout)) == [0, 0]
    rep = json.loads(out.read_text())
    assert rep["world_size"] == 2 and rep["dp"] == 1
    assert (rep["tp"], rep["pp"]) == ((2, 1) if layout[0] == "--tp" else (1, 2))
    assert rep["sequence_parallel"] == (layout[0] == "--tp")
    t = rep["times_s"]
    assert t["rollout"] > 0 and t["logprob"] > 0 and t["update"] > 0
    assert t["tokens"] == 8 * 4 * (16 + t["response_tokens"] / (8 * 4))  # 8 prompts x 4 samples, prompt 16
