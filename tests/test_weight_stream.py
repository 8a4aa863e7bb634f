"""HFWeightStream: a Megatron model, sharded over TP=2 x PP=2, streamed as the HF checkpoint it was loaded from,
on every rank, in buckets (what a rollout engine that refits by HF name receives after each update)."""

import os
from types import SimpleNamespace

import pytest
import torch

from dist_utils import run_distributed
from tiny_models import randomize_hf_params

transformers = pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

from megaprorl.models import convert as C  # noqa: E402

BUCKET = 40_000  # bytes: a few tensors of the tiny model per bucket, and some tensors larger than a bucket


def _config(family):
    common = dict(vocab_size=100, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    if family == "qwen2":  # tied embeddings: the last stage's output layer is not sent again
        return transformers.Qwen2Config(tie_word_embeddings=True, **common)
    if family == "qwen3":  # q/k norms, no QKV bias
        return transformers.Qwen3Config(tie_word_embeddings=False, head_dim=16, **common)
    return transformers.LlamaConfig(tie_word_embeddings=False, **common)


def _stream(rank, world, dirs):
    from megatron.core import parallel_state as mps

    from megaprorl.models.gpt import build_gpt
    from megaprorl.parallel import init_distributed

    init_distributed(2, 2)
    out = {}
    for family, hf_dir in dirs.items():
        hf_config = C.load_hf_config(hf_dir)
        fields = C.model_config_from_hf(hf_config)
        mcfg = SimpleNamespace(**dict(dict(init_std=0.02, params_dtype="fp32", make_vocab_divisible_by=128,
                                           transformer_impl="local", attention="sdpa", fp8="", fp8_recipe="delayed",
                                           recompute_granularity=""), **fields))
        pcfg = SimpleNamespace(tensor_parallel=2, pipeline_parallel=2, sequence_parallel=False)
        model = build_gpt(mcfg, pcfg, C.hf_vocab_size(hf_config))
        C.load_hf_into_model(model, hf_dir, hf_config)
        stream = C.HFWeightStream(model, hf_config)
        runs = []
        for dtype in (None, torch.bfloat16):  # the second run reuses the names and shapes of the first
            buckets = [[(n, t.clone()) for n, t in b] for b in stream.buckets(BUCKET, dtype=dtype)]
            runs.append(buckets)
        out[family] = runs
    mps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    dirs = {}
    for i, family in enumerate(("qwen2", "llama", "qwen3")):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(_config(family)).float()
        randomize_hf_params(model)
        dirs[family] = str(root / family)
        model.save_pretrained(dirs[family])
    return dirs, run_distributed(_stream, world_size=4, args=(dirs,), timeout=600)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_every_rank_receives_the_hf_checkpoint_exactly_in_buckets(streamed, family):
    dirs, results = streamed
    want = C.load_hf_state_dict(dirs[family])
    for rank, res in enumerate(results):
        for buckets, dtype in zip(res[family], (torch.float32, torch.bfloat16)):
            names = [n for b in buckets for n, _ in b]
            assert len(names) == len(set(names)), f"rank {rank}: a tensor was sent twice"
            assert set(names) == set(want), f"rank {rank}: {set(want) ^ set(names)}"
            got = dict(t for b in buckets for t in b)
            for n, t in got.items():
                assert t.dtype == dtype, n
                assert torch.equal(t, want[n].to(dtype)), f"rank {rank}: {n}"
            for b in buckets:  # a bucket goes over the limit only when it is one tensor
                nbytes = sum(t.numel() * t.element_size() for _, t in b)
                assert nbytes <= BUCKET or len(b) == 1, (rank, [n for n, _ in b], nbytes)
            assert len(buckets) > 3
    if family == "qwen2":
        assert "lm_head.weight" not in want
