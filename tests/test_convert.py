"""HF <-> Megatron conversion (megaprorl.models.convert) for tiny random Qwen2, Qwen3 and Llama models.

One gloo job (2 processes, spawned once for the module) loads the HF models into Megatron at
TP=1, TP=2 and PP=2 and returns logits, losses and gradients; the tests compare them with the HF
models, bit-exact round trips, and TP=2 against TP=1.  The Qwen3 has a head_dim (32) that is not
hidden / heads (16) and per-head q/k norms; the job also takes one policy training step on it at TP=1
and TP=2 (the trainer's gradient reduction of the replicated q/k norms over the TP ranks).
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from dist_utils import run_distributed
from tiny_models import randomize_hf_params

transformers = pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

from megaprorl.models import convert as C  # noqa: E402

VOCAB = 100
FAMILIES = ("qwen2", "llama", "qwen3", "mistral", "qwen3_moe", "qwen3_moe_raw", "qwen2_moe")
# Both families run at PP=2: Llama untied, Qwen2 with tied embeddings (the last stage's copy of the
# embedding filled from embed_tokens; parallel/compat.py keeps Megatron's `.cuda()` on it on the CPU).
PP_FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
EP_FAMILIES = ("qwen3_moe", "qwen2_moe")  # also at TP=2 with the experts spread over both ranks (EP=2)
B, S = 2, 12
ATOL = 1e-4
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
# YaRN as Qwen3 configures it past 32K (factor 4), here with an original context of 16 = 64 / 4
YARN_SCALING = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
YARN_SPEC = dict(YARN_SCALING, beta_fast=32.0, beta_slow=1.0, mscale=0.0, mscale_all_dim=0.0, truncate=True)


# ------------------------------------------------------------------------------- tiny HF models
def _hf_config(family):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6)
    if family == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=True, rope_theta=1000000.0, **common)
    if family == "qwen3":  # Qwen3's shape: head_dim fixed (128 there), heads x head_dim = 2 x hidden here; YaRN
        return transformers.Qwen3Config(tie_word_embeddings=True, rope_theta=1000000.0, head_dim=32,
                                        rope_scaling=dict(YARN_SCALING), **common)
    if family.startswith("qwen3_moe"):  # 4 experts, 2 per token; routing weights renormalised (Qwen3-30B-A3B) or not
        return transformers.Qwen3MoeConfig(tie_word_embeddings=False, rope_theta=1000000.0, head_dim=32,
                                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           norm_topk_prob=family == "qwen3_moe", **common)
    if family == "qwen2_moe":  # Qwen1.5-MoE / Qwen2-57B-A14B's shape: QKV bias, a gated shared expert, raw top-k
        return transformers.Qwen2MoeConfig(tie_word_embeddings=False, rope_theta=1000000.0, num_experts=4,
                                           num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=48, norm_topk_prob=False, **common)
    if family == "mistral":  # Mistral-Nemo's shape: the Llama layout, head_dim given (128 for hidden 5120 / 32 there)
        return transformers.MistralConfig(tie_word_embeddings=False, rope_theta=1000000.0, head_dim=32,
                                          sliding_window=None, **common)
    # Llama-3.x RoPE scaling, with a short original context so that, at head_dim 16, the 12 test positions
    # see all three bands (kept, interpolated, divided by the factor)
    return transformers.LlamaConfig(tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=dict(LLAMA3_SCALING),
                                    **common)


def _make_hf(family, path):
    torch.manual_seed(FAMILIES.index(family))
    cfg = _hf_config(family)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    randomize_hf_params(model)  # norms and biases non-trivial too
    # Llama is written as a sharded checkpoint (index json), Qwen2 as one model.safetensors.
    model.save_pretrained(path, max_shard_size="60KB" if family == "llama" else "5GB")
    return model.eval()


def _mcfg(hf_dir, attention):
    fields = C.model_config_from_hf(C.load_hf_config(hf_dir))
    base = dict(init_std=0.02, params_dtype="fp32", make_vocab_divisible_by=128, transformer_impl="local",
                attention=attention, fp8="", fp8_recipe="delayed", recompute_granularity="")
    base.update(fields)
    return SimpleNamespace(**base)


# ------------------------------------------------------------------------ the distributed worker
def _masked_ce(logits_bsv, labels, vocab, tp_rank):
    """Token-mean CE through Megatron's vocab-parallel CE; padded vocab columns are masked out."""
    from megatron.core import tensor_parallel

    v_local = logits_bsv.shape[-1]
    cols = torch.arange(v_local) + tp_rank * v_local
    logits = logits_bsv.masked_fill(cols >= vocab, -1e9)
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                                        labels.t().contiguous())
    return loss.mean()


def _gather_tp(x):
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    g = mps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(g))]
    dist.all_gather(parts, x.contiguous(), group=g)
    return torch.cat(parts, dim=-1)


def _run_tp(hf_dir, attention, tp, tokens, labels, save_dir=None, ep=1):
    from megatron.core import parallel_state as mps

    from megaprorl.models.gpt import build_gpt, needs_explicit_causal_mask
    from megaprorl.parallel import init_distributed

    init_distributed(tp, 1, expert_parallel=ep)
    mcfg = _mcfg(hf_dir, attention)
    # Megatron's MoE layer trains at TP > 1 only under sequence parallelism (as model.num_experts requires)
    pcfg = SimpleNamespace(tensor_parallel=tp, pipeline_parallel=1, sequence_parallel=bool(mcfg.num_experts),
                           expert_parallel=ep)
    hf_config = C.load_hf_config(hf_dir)
    model = build_gpt(mcfg, pcfg, C.hf_vocab_size(hf_config))
    info = C.load_hf_into_model(model, hf_dir, hf_config)
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None] if needs_explicit_causal_mask(mcfg) else None
    pos = torch.arange(S)[None].expand(B, S)
    logits = model(tokens, pos, mask)  # [b, s, v/tp]
    tp_rank = mps.get_tensor_model_parallel_rank()
    loss = _masked_ce(logits, labels, VOCAB, tp_rank)
    loss.backward()
    _sum_qk_norm_grads(model)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    full_logits = _gather_tp(logits.detach())[..., :VOCAB]
    saved = None
    if save_dir is not None:
        saved = C.save_megatron_as_hf(model, hf_config, save_dir, hf_dir=hf_dir)
    out = dict(logits=full_logits, loss=loss.detach(), grads=grads, tp_rank=tp_rank, info=info,
               params={k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")},
               saved=saved is not None)
    mps.destroy_model_parallel()
    return out


def _wide_rows(rank):
    """The batch rows and length rank ``rank`` of two holds with the experts across data-parallel replicas."""
    return (slice(0, 1), S) if rank == 0 else (slice(1, 2), 7)


def _run_experts_across_replicas(hf_dir, tokens, labels):
    """TP=1 on two ranks with the experts spread over both (parallel.expert_parallel=2 as data-parallel replicas:
    the all-to-all dispatcher): each rank its own tokens (rank 0 a row of 12, rank 1 a row of 7)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    from megaprorl.models.gpt import build_gpt
    from megaprorl.parallel import init_distributed

    init_distributed(1, 1, expert_parallel=2)
    mcfg = _mcfg(hf_dir, "sdpa")
    pcfg = SimpleNamespace(tensor_parallel=1, pipeline_parallel=1, sequence_parallel=False, expert_parallel=2)
    hf_config = C.load_hf_config(hf_dir)
    model = build_gpt(mcfg, pcfg, C.hf_vocab_size(hf_config))
    C.load_hf_into_model(model, hf_dir, hf_config)
    rank = dist.get_rank()
    rows, n = _wide_rows(rank)
    tok, lab = tokens[rows, :n], labels[rows, :n]
    logits = model(tok, torch.arange(n)[None], None)
    loss = _masked_ce(logits, lab, VOCAB, 0)
    loss.backward()
    out = dict(rank=rank, ep_rank=mps.get_expert_model_parallel_rank(), logits=logits.detach()[..., :VOCAB],
               loss=loss.detach(), grads={k: p.grad.detach().clone() for k, p in model.named_parameters()},
               params={k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")})
    mps.destroy_model_parallel()
    return out


def _sum_qk_norm_grads(model):
    """Each TP rank's q/k norms saw only its own heads: their gradient is the sum over the TP group, as
    Megatron's finalize_model_grads makes it in the trainer (checked through the policy by _run_policy_step)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    for n, p in model.named_parameters():  # and under sequence parallelism every replicated one (norms, router)
        if "q_layernorm" in n or "k_layernorm" in n or getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=mps.get_tensor_model_parallel_group())


def _run_policy_step(hf_dir, tp):
    """One policy training step (the trainer's path: Megatron's DDP, finalize_model_grads, grad norm) from
    the HF weights at ``tp``, without clipping (the gradients are read after the step)."""
    from megatron.core import parallel_state as mps

    from megaprorl.algo.loss import LossSpec
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy
    from test_packing import _batch
    from tiny_models import tiny_policy_cfgs

    info = init_distributed(tp, 1)
    hf_config = C.load_hf_config(hf_dir)
    pcfg = SimpleNamespace(tensor_parallel=tp, pipeline_parallel=1, sequence_parallel=False)
    tok = CharTokenizer()
    ocfg = tiny_policy_cfgs()[2]
    ocfg.grad_clip = 0.0
    pol = Policy(_mcfg(hf_dir, "sdpa"), pcfg, ocfg, C.hf_vocab_size(hf_config), info.device, "torch",
                 pad_id=tok.pad_id)
    C.load_hf_into_model(pol.model, hf_dir, hf_config)
    pol.optimizer.step_with_ready_grads = lambda: True  # compare gradients, not updates
    stats = pol.train_step(_batch(tok, n=6, seed=7), LossSpec(kl_coef=0.1), micro_batch_size=3)
    grads = {n: q.grad.detach().clone() for n, q in pol.model.named_parameters()}
    del pol
    mps.destroy_model_parallel()
    return dict(stats=stats, grads=grads, dp=info.dp)


def _run_pp(hf_dir, attention, tokens):
    """PP=2 (TP=1): stage 0 sends its hidden states to stage 1, which returns the logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    from megaprorl.models.gpt import build_gpt, needs_explicit_causal_mask
    from megaprorl.parallel import init_distributed

    init_distributed(1, 2)
    mcfg = _mcfg(hf_dir, attention)
    pcfg = SimpleNamespace(tensor_parallel=1, pipeline_parallel=2, sequence_parallel=False)
    hf_config = C.load_hf_config(hf_dir)
    model = build_gpt(mcfg, pcfg, C.hf_vocab_size(hf_config))
    C.load_hf_into_model(model, hf_dir, hf_config)
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None] if needs_explicit_causal_mask(mcfg) else None
    pos = torch.arange(S)[None].expand(B, S)
    stage = mps.get_pipeline_model_parallel_rank()
    layers = [int(layer.layer_number) for layer in model.decoder.layers]
    with torch.no_grad():
        if stage == 0:
            hidden = model(tokens, pos, mask)  # [s, b, h]
            dist.send(hidden.contiguous(), 1)
            out = None
        else:
            hidden = torch.empty(S, B, mcfg.hidden_size)
            dist.recv(hidden, 0)
            model.set_input_tensor(hidden)
            out = model(None, pos, mask)[..., :VOCAB]
    mps.destroy_model_parallel()
    return dict(stage=stage, layers=layers, logits=out)


def _job(rank, world, dirs, tokens, labels, save_root):
    out = {}
    for family, hf_dir in dirs.items():
        attention = "megatron" if family == "llama" else "sdpa"
        tp1 = _run_tp(hf_dir, attention, 1, tokens, labels)  # two data-parallel replicas of TP=1
        tp2 = _run_tp(hf_dir, attention, 2, tokens, labels, save_dir=os.path.join(save_root, family))
        out[family] = dict(tp1=tp1, tp2=tp2)
        if family in PP_FAMILIES:
            out[family]["pp2"] = _run_pp(hf_dir, attention, tokens)
        if family in EP_FAMILIES:
            out[family]["ep2"] = _run_tp(hf_dir, attention, 2, tokens, labels, ep=2,
                                         save_dir=os.path.join(save_root, family + "-ep2"))
            out[family]["wide"] = _run_experts_across_replicas(hf_dir, tokens, labels)
    out["qwen3"]["step"] = {tp: _run_policy_step(dirs["qwen3"], tp) for tp in (1, 2)}
    return out


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    dirs, hf_models = {}, {}
    for family in FAMILIES:
        d = str(root / family)
        hf_models[family] = _make_hf(family, d)
        dirs[family] = d
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    save_root = str(root / "saved")
    results = run_distributed(_job, world_size=2, args=(dirs, tokens, labels, save_root), timeout=600)
    return SimpleNamespace(dirs=dirs, hf=hf_models, tokens=tokens, labels=labels, results=results,
                           save_root=save_root, root=root)


def _hf_forward_backward(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    loss.backward()
    grads = _by_checkpoint_name({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return logits.detach(), loss.detach(), grads


def _by_checkpoint_name(tensors):
    """transformers 5 holds an MoE layer's experts fused (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
    [E, H, I]); its checkpoints, and megaprorl's HF names, have one tensor per expert and projection."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name[:-len("gate_up_proj")]
            for e, (gate, up) in enumerate(x.chunk(2, dim=0) for x in t):
                out[f"{p}{e}.gate_proj.weight"], out[f"{p}{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            p = name[:-len("down_proj")]
            for e, x in enumerate(t):
                out[f"{p}{e}.down_proj.weight"] = x
        else:
            out[name] = t
    return out


# ------------------------------------------------------------------------------------- tests
def test_model_config_from_hf():
    q = C.model_config_from_hf(_hf_config("qwen2"))
    assert q["add_qkv_bias"] is True and q["tie_embeddings"] is True
    assert q["num_query_groups"] == 2 and q["ffn_hidden_size"] == 128 and q["rotary_base"] == 1000000.0
    l = C.model_config_from_hf(_hf_config("llama"))  # noqa: E741
    assert l["add_qkv_bias"] is False and l["tie_embeddings"] is False and l["rotary_base"] == 10000.0
    assert l["norm_epsilon"] == 1e-6 and l["num_layers"] == 2 and l["hidden_size"] == 64
    # a raw config.json dict (old-style rope_theta) works too
    raw = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, intermediate_size=128, vocab_size=100, rope_theta=5e5, rms_norm_eps=1e-5)
    assert C.model_config_from_hf(raw)["rotary_base"] == 5e5
    with pytest.raises(C.ConversionError, match="model_type"):
        C.model_config_from_hf(dict(raw, model_type="gpt2"))
    assert l["rope_scaling"] == LLAMA3_SCALING and q["rope_scaling"] == {} and C.model_config_from_hf(raw)[
        "rope_scaling"] == {}
    lin = C.model_config_from_hf(dict(raw, rope_scaling={"type": "linear", "factor": 2}))["rope_scaling"]
    assert lin == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(C.ConversionError, match="RoPE scaling 'dynamic' is not supported"):
        C.model_config_from_hf(dict(raw, rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
    with pytest.raises(C.ConversionError, match="original_max_position_embeddings"):  # yarn without it
        C.model_config_from_hf(dict(raw, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(C.ConversionError, match="low_freq_factor"):  # llama3 without its parameters
        C.model_config_from_hf(dict(raw, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    assert C.model_config_from_hf(dict(raw, rope_scaling={"rope_type": "dynamic"}), strict=False)["rope_scaling"] == {}
    # Qwen3: head_dim from the config (not hidden / heads), q/k norms, no QKV bias
    q3 = C.model_config_from_hf(_hf_config("qwen3"))
    assert (q3["head_dim"], q3["qk_norm"], q3["add_qkv_bias"], q3["tie_embeddings"]) == (32, True, False, True)
    assert q3["rope_scaling"] == YARN_SPEC
    assert (l["head_dim"], l["qk_norm"], q["head_dim"], q["qk_norm"]) == (16, False, 16, False)
    raw3 = dict(raw, model_type="qwen3", head_dim=128)
    assert C.model_config_from_hf(raw3)["head_dim"] == 128
    with pytest.raises(C.ConversionError, match="qwen3 with attention_bias=True"):
        C.model_config_from_hf(dict(raw3, attention_bias=True))
    with pytest.raises(C.ConversionError, match=r"layer_types \['sliding_attention'\]"):
        C.model_config_from_hf(dict(raw3, layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(C.ConversionError, match="gives no head_dim"):
        C.model_config_from_hf(dict(raw, hidden_size=66))
    # Mistral: Llama's fields, head_dim given; a window shorter than the context is refused (v0.1's 4096)
    m = C.model_config_from_hf(_hf_config("mistral"))
    assert (m["head_dim"], m["add_qkv_bias"], m["qk_norm"], m["tie_embeddings"], m["rope_scaling"]) == (
        32, False, False, False, {})
    rawm = dict(raw, model_type="mistral", max_position_embeddings=32768)
    for window in (None, 32768):
        assert C.model_config_from_hf(dict(rawm, sliding_window=window))["max_position_embeddings"] == 32768
    with pytest.raises(C.ConversionError, match="sliding_window=4096 < max_position_embeddings=32768"):
        C.model_config_from_hf(dict(rawm, sliding_window=4096))
    with pytest.raises(C.ConversionError, match="mistral with attention_bias=True"):
        C.model_config_from_hf(dict(rawm, attention_bias=True))


def test_qwen3_config_is_checked_and_exported():
    """check_model_config names a head_dim or qk_norm that differs from config.json's (head_dim 0 means
    hidden / heads); the exported config.json is a Qwen3 one that transformers reads back as it was."""
    hf_cfg = _hf_config("qwen3")
    mcfg = SimpleNamespace(**C.model_config_from_hf(hf_cfg))
    C.check_model_config(mcfg, hf_cfg, "/hf")
    for key, wrong in (("head_dim", 0), ("head_dim", 16), ("qk_norm", False)):
        with pytest.raises(C.ConversionError, match=f"model.{key}="):
            C.check_model_config(SimpleNamespace(**{**vars(mcfg), key: wrong}), hf_cfg, "/hf")
    llama = SimpleNamespace(**C.model_config_from_hf(_hf_config("llama")))
    C.check_model_config(SimpleNamespace(**{**vars(llama), "head_dim": 0}), _hf_config("llama"), "/hf")
    mcfg.params_dtype, mcfg.max_position_embeddings = "fp32", 64
    out = C.hf_config_from_model_config(mcfg, VOCAB)
    assert out["model_type"] == "qwen3" and out["architectures"] == ["Qwen3ForCausalLM"]
    back = transformers.Qwen3Config(**out)
    assert C.model_config_from_hf(back) == dict(C.model_config_from_hf(hf_cfg), params_dtype="fp32")
    with pytest.raises(C.ConversionError, match="Qwen3 has no QKV bias"):
        C.hf_config_from_model_config(SimpleNamespace(**{**vars(mcfg), "add_qkv_bias": True}), VOCAB)


@pytest.mark.parametrize("scaling", [LLAMA3_SCALING, {"rope_type": "linear", "factor": 4.0},
                                     dict(LLAMA3_SCALING, factor=32.0, original_max_position_embeddings=8192),
                                     dict(YARN_SCALING, original_max_position_embeddings=32768),
                                     dict(YARN_SCALING, beta_fast=8.0, mscale=1.0, mscale_all_dim=0.5, truncate=False)],
                         ids=["llama3.1", "linear", "llama3.2", "yarn-qwen3", "yarn-mscales"])
def test_rope_scaling_frequencies_equal_transformers(scaling):
    """The policy's RoPE frequencies = transformers' for the same config (head_dim 16, base 500000), and so is
    YaRN's attention factor (the scale of cos and sin) that Megatron's attention reads from the model config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megaprorl.models.rope import attention_factor as megatron_factor
    from tiny_models import tiny_policy

    policy, _ = tiny_policy({"rotary_base": 500000.0, "rope_scaling": scaling})
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                                      max_position_embeddings=131072, rope_scaling=dict(scaling))
    want, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg, "cpu")
    assert (attention_factor > 1.05) == (scaling["rope_type"] == "yarn")
    assert megatron_factor(policy.model.config) == pytest.approx(attention_factor, rel=1e-12)
    got = policy.model.rotary_pos_emb.inv_freq
    unscaled = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    assert ((want.float() - unscaled).abs() / unscaled).max() > 0.5  # the scaling moves the table
    torch.testing.assert_close(got, want.float(), atol=0, rtol=1e-6)


def test_rope_scaling_is_checked_and_exported():
    """check_model_config names a model.rope_scaling that differs from config.json's; the exported
    config.json carries the scaling, and transformers reads it back as it was."""
    hf_cfg = _hf_config("llama")
    mcfg = SimpleNamespace(**C.model_config_from_hf(hf_cfg))
    C.check_model_config(mcfg, hf_cfg, "/hf")
    for wrong in ({}, dict(LLAMA3_SCALING, factor=4.0)):
        with pytest.raises(C.ConversionError, match="model.rope_scaling=.*config.json: .*'llama3'"):
            C.check_model_config(SimpleNamespace(**{**vars(mcfg), "rope_scaling": wrong}), hf_cfg, "/hf")
    mcfg.params_dtype, mcfg.max_position_embeddings = "fp32", 64
    back = transformers.LlamaConfig(**C.hf_config_from_model_config(mcfg, VOCAB))
    assert C.model_config_from_hf(back)["rope_scaling"] == LLAMA3_SCALING


@pytest.mark.parametrize("family,theta", [("llama", 10000.0), ("qwen3", 1000000.0)])
def test_rope_scaling_matters_to_the_logits(setup, family, theta):
    """The tiny Llama's (llama3) and Qwen3's (yarn) HF logits move far outside the tolerance without their
    RoPE scaling, so the TP / PP / round-trip / engine tests on them check the scaled frequencies (and
    YaRN's attention factor)."""
    plain_cfg = _hf_config(family)
    plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    plain = transformers.AutoModelForCausalLM.from_config(plain_cfg, attn_implementation="eager").float().eval()
    plain.load_state_dict(setup.hf[family].state_dict())
    with torch.no_grad():
        a, b = setup.hf[family](input_ids=setup.tokens).logits, plain(input_ids=setup.tokens).logits
    assert (a - b).abs().max() > 100 * ATOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_match_hf(setup, family, tp):
    hf_logits, _, _ = _hf_forward_backward(setup.hf[family], setup.tokens, setup.labels)
    for r in setup.results:
        res = r[family][f"tp{tp}"]
        assert res["info"]["tensors"] > 0
        torch.testing.assert_close(res["logits"], hf_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", PP_FAMILIES)
def test_pipeline_stages_load_their_layers(setup, family):
    hf_logits, _, _ = _hf_forward_backward(setup.hf[family], setup.tokens, setup.labels)
    stages = sorted((r[family]["pp2"] for r in setup.results), key=lambda x: x["stage"])
    assert [s["layers"] for s in stages] == [[1], [2]]
    torch.testing.assert_close(stages[1]["logits"], hf_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_loss_and_grads_equal_tp1_and_hf(setup, family):
    hf_config = C.load_hf_config(setup.dirs[family])
    _, hf_loss, hf_grads = _hf_forward_backward(setup.hf[family], setup.tokens, setup.labels)
    tp1 = setup.results[0][family]["tp1"]
    tp2 = sorted((r[family]["tp2"] for r in setup.results), key=lambda x: x["tp_rank"])
    assert [t["tp_rank"] for t in tp2] == [0, 1]
    torch.testing.assert_close(tp1["loss"], hf_loss, atol=1e-5, rtol=0)
    for t in tp2:
        torch.testing.assert_close(t["loss"], tp1["loss"], atol=1e-6, rtol=0)
    g1 = C.megatron_to_hf([tp1["grads"]], hf_config)
    g2 = C.megatron_to_hf([t["grads"] for t in tp2], hf_config)
    assert set(g1) == set(g2) == set(hf_grads)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(g1[k], hf_grads[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("family", EP_FAMILIES)
def test_expert_parallel_loads_logits_grads_and_saves_as_hf(setup, family):
    """TP=2 with the experts spread over both ranks (parallel.expert_parallel=2): each rank holds two whole
    experts (rank r: experts 2r, 2r+1, as hf_to_megatron shards them), the logits, the loss and every gradient
    equal HF's, and the model saved as HF (its experts gathered from both ranks) is the source bit for bit."""
    hf_dir = setup.dirs[family]
    hf_config = C.load_hf_config(hf_dir)
    hf_sd = C.load_hf_state_dict(hf_dir)
    hf_logits, hf_loss, hf_grads = _hf_forward_backward(setup.hf[family], setup.tokens, setup.labels)
    ep2 = sorted((r[family]["ep2"] for r in setup.results), key=lambda x: x["tp_rank"])
    for t in ep2:
        want = C.hf_to_megatron(hf_sd, hf_config, t["tp_rank"], 2, ep_size=2)
        assert set(t["params"]) == set(want)
        for k, v in want.items():
            assert torch.equal(t["params"][k], v), k
        e = 2 * t["tp_rank"]  # whole experts: gate and up rows of expert e, all of them
        gate_up = torch.cat([hf_sd[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"],
                             hf_sd[f"model.layers.0.mlp.experts.{e}.up_proj.weight"]])
        assert torch.equal(t["params"]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"], gate_up)
        torch.testing.assert_close(t["logits"], hf_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(t["loss"], hf_loss, atol=1e-5, rtol=0)
    grads = C.megatron_to_hf([t["grads"] for t in ep2], hf_config, ep_size=2)
    assert set(grads) == set(hf_grads)
    for k in grads:
        torch.testing.assert_close(grads[k], hf_grads[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    saved = C.load_hf_state_dict(os.path.join(setup.save_root, family + "-ep2"))
    assert set(saved) == set(hf_sd) and all(torch.equal(saved[k], hf_sd[k]) for k in hf_sd)
    with pytest.raises(C.ConversionError, match="expert parallel size 3 must divide tensor parallel size 2"):
        C.hf_to_megatron(hf_sd, hf_config, 0, 2, ep_size=3)
    with pytest.raises(C.ConversionError, match="expert parallel size 2 must divide num_experts"):
        C.hf_to_megatron(C.load_hf_state_dict(setup.dirs["qwen3"]), C.load_hf_config(setup.dirs["qwen3"]), 0, 2,
                         ep_size=2)


@pytest.mark.parametrize("family", EP_FAMILIES)
def test_experts_across_replicas_load_their_experts_and_exchange_tokens(setup, family):
    """TP=1, the experts spread over two data-parallel replicas: rank r loads experts 2r, 2r+1 whole (and every
    dense weight); on its own tokens (12 on one rank, 7 on the other) its logits and loss are HF's; each
    expert's gradient is HF's of both ranks' losses (the tokens routed to it from either rank), each dense
    weight's that of the rank's own loss."""
    hf_dir = setup.dirs[family]
    hf_config = C.load_hf_config(hf_dir)
    hf_sd = C.load_hf_state_dict(hf_dir)
    runs = sorted((r[family]["wide"] for r in setup.results), key=lambda x: x["rank"])
    assert [r["ep_rank"] for r in runs] == [0, 1]
    model = setup.hf[family]
    own = []
    for r in runs:
        want = C.hf_to_megatron(hf_sd, hf_config, 0, 1, ep_size=2, ep_rank=r["ep_rank"])
        assert set(r["params"]) == set(want)
        for k, v in want.items():
            assert torch.equal(r["params"][k], v), k
        e = 2 * r["ep_rank"]
        assert torch.equal(r["params"]["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"],
                           hf_sd[f"model.layers.0.mlp.experts.{e + 1}.down_proj.weight"])
        rows, n = _wide_rows(r["rank"])
        logits, loss, grads = _hf_forward_backward(model, setup.tokens[rows, :n], setup.labels[rows, :n])
        torch.testing.assert_close(r["logits"], logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(r["loss"], loss, atol=1e-5, rtol=0)
        own.append(grads)
    both = {k: own[0][k] + own[1][k] for k in own[0]}
    dims = C._Dims(hf_config)
    for r in runs:  # HF's gradients laid out as this rank's parameters
        padded = r["params"]["embedding.word_embeddings.weight"].shape[0]
        for mkey, g in r["grads"].items():
            ref = both if ".local_experts." in mkey else own[r["rank"]]
            want = C._convert_keys_to_megatron([mkey], ref.__getitem__, dims, 0, 1, padded, list(range(dims.layers)),
                                               2, r["ep_rank"])[mkey]
            torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{mkey}: {m}")
    with pytest.raises(C.ConversionError, match="experts across data-parallel replicas need tensor parallel size 1"):
        C.hf_to_megatron(hf_sd, hf_config, 0, 2, ep_size=2, ep_rank=0)


def test_qwen3_policy_step_at_tp2_equals_tp1(setup):
    """The trainer's step on the Qwen3 weights: at TP=2 each rank's q/k norms see half the heads, and the
    summed gradients (finalize_model_grads), the loss and the gradient norm equal TP=1's.  At TP=1 the
    two ranks are data-parallel replicas of the same batch, whose gradients DP sums: twice TP=2's."""
    hf_config = C.load_hf_config(setup.dirs["qwen3"])
    runs = [r["qwen3"]["step"] for r in setup.results]
    one, two = runs[0][1], [r[2] for r in runs]  # results are in rank order
    assert (one["dp"], two[0]["dp"]) == (2, 1)
    g1 = C.megatron_to_hf([one["grads"]], hf_config)
    g2 = C.megatron_to_hf([t["grads"] for t in two], hf_config)
    assert set(g1) == set(g2)
    qk = [k for k in g1 if k.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(qk) == 4 and all(g1[k].abs().max() > 1e-4 for k in qk)
    for k in g1:
        torch.testing.assert_close(2 * g2[k], g1[k], atol=1e-6, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    for t in two:
        assert t["stats"]["loss"] == pytest.approx(one["stats"]["loss"], rel=1e-5)
        assert t["stats"]["tokens"] == one["stats"]["tokens"]
        assert 2 * t["stats"]["grad_norm"] == pytest.approx(one["stats"]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("family,tp,pp,ep", [(f, tp, pp, 1) for f in FAMILIES for tp, pp in [(1, 1), (2, 1), (2, 2), (1, 2)]]
                         + [(f, 2, pp, 2) for f in EP_FAMILIES for pp in (1, 2)])
def test_round_trip_bit_exact(setup, family, tp, pp, ep):
    hf_dir = setup.dirs[family]
    hf_config = C.load_hf_config(hf_dir)
    hf_sd = C.load_hf_state_dict(hf_dir)
    stages = [[C.hf_to_megatron(hf_sd, hf_config, t, tp, p, pp, ep_size=ep) for t in range(tp)] for p in range(pp)]
    back = C.megatron_stages_to_hf(stages, hf_config, ep_size=ep)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_shards_equal_offline_conversion(setup, family):
    """The parameters load_hf_into_model placed on each TP rank are the hf_to_megatron shards."""
    hf_dir = setup.dirs[family]
    hf_config = C.load_hf_config(hf_dir)
    hf_sd = C.load_hf_state_dict(hf_dir)
    for r in setup.results:
        res = r[family]["tp2"]
        expect = C.hf_to_megatron(hf_sd, hf_config, res["tp_rank"], 2)
        assert set(expect) == set(res["params"])
        for k, v in expect.items():
            assert torch.equal(res["params"][k], v), k


@pytest.mark.parametrize("family", FAMILIES)
def test_save_megatron_as_hf(setup, family):
    out = os.path.join(setup.save_root, family)
    assert sum(r[family]["tp2"]["saved"] for r in setup.results) == 1  # only global rank 0 returns it
    orig = C.load_hf_state_dict(setup.dirs[family])
    saved = C.load_hf_state_dict(out)
    assert set(saved) == set(orig)
    for k in orig:
        assert torch.equal(saved[k], orig[k]), k
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=setup.tokens).logits,
                                   setup.hf[family](input_ids=setup.tokens).logits, atol=0, rtol=0)


def test_te_layernorm_names_round_trip(setup):
    hf_dir = setup.dirs["llama"]
    hf_config = C.load_hf_config(hf_dir)
    hf_sd = C.load_hf_state_dict(hf_dir)
    shards = [C.hf_to_megatron(hf_sd, hf_config, t, 2, layernorm_style="te") for t in range(2)]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in shards[0]
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in shards[1]
    assert not any("input_layernorm" in k for k in shards[0])
    back = C.megatron_to_hf(shards, hf_config)
    assert set(back) == set(hf_sd) and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_qkv_grouped_layout():
    """Rows of linear_qkv are [q heads of group g..., k_g, v_g] per group; TP ranks get whole groups."""
    cfg = dict(model_type="llama", hidden_size=8, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=1, intermediate_size=8, vocab_size=4, tie_word_embeddings=True)
    hd = 2
    q = torch.arange(4 * hd).float()[:, None].expand(-1, 8) + 0.0   # q head h rows: 2h, 2h+1
    k = 100 + torch.arange(2 * hd).float()[:, None].expand(-1, 8)
    v = 200 + torch.arange(2 * hd).float()[:, None].expand(-1, 8)
    sd = {"model.layers.0.self_attn.q_proj.weight": q, "model.layers.0.self_attn.k_proj.weight": k,
          "model.layers.0.self_attn.v_proj.weight": v}
    keys = ["decoder.layers.0.self_attention.linear_qkv.weight"]
    r0 = C.hf_to_megatron(sd, cfg, 0, 2, target_keys=keys, padded_vocab=128)[keys[0]][:, 0].tolist()
    r1 = C.hf_to_megatron(sd, cfg, 1, 2, target_keys=keys, padded_vocab=128)[keys[0]][:, 0].tolist()
    assert r0 == [0, 1, 2, 3, 100, 101, 200, 201]  # group 0: q heads 0,1; k0; v0
    assert r1 == [4, 5, 6, 7, 102, 103, 202, 203]  # group 1: q heads 2,3; k1; v1


def test_cli_round_trip_and_errors(setup, tmp_path, capsys):
    hf_dir = setup.dirs["qwen2"]
    mdir, back = str(tmp_path / "meg"), str(tmp_path / "back")
    assert C.main(["hf-to-megatron", "--hf", hf_dir, "--out", mdir, "--tp", "2", "--pp", "2"]) == 0
    for t in range(2):
        for p in range(2):
            assert os.path.isfile(os.path.join(mdir, f"mp_rank_{t:02d}_{p:03d}", "model_optim_rng.pt"))
    meta = json.load(open(os.path.join(mdir, C.META_FILE)))
    assert meta["model"]["add_qkv_bias"] is True and meta["padded_vocab_size"] == 256
    # the model.* section it wrote (and printed) is a run config that passes the trainer's check
    from megaprorl.config import load_config

    cfg = load_config(os.path.join(mdir, C.MODEL_YAML), ["rollout.max_new_tokens=16"])  # the tiny model: 64 positions
    assert cfg.model.hf_path == cfg.model.tokenizer == os.path.abspath(hf_dir)
    C.check_model_config(cfg.model, C.load_hf_config(hf_dir), hf_dir)
    assert "model:\n  num_layers: 2\n" in capsys.readouterr().out
    assert C.main(["megatron-to-hf", "--megatron", mdir, "--out", back]) == 0
    orig, new = C.load_hf_state_dict(hf_dir), C.load_hf_state_dict(back)
    assert set(orig) == set(new) and all(torch.equal(orig[k], new[k]) for k in orig)
    assert os.path.isfile(os.path.join(back, "config.json"))
    # through the top-level CLI
    from megaprorl.cli import main as cli_main

    assert cli_main(["convert", "megatron-to-hf", "--megatron", mdir, "--out", str(tmp_path / "b2")]) == 0
    capsys.readouterr()
    # clear errors naming the missing file / key
    assert C.main(["hf-to-megatron", "--hf", str(tmp_path / "nope"), "--out", mdir]) == 1
    assert "config.json" in capsys.readouterr().err
    os.remove(os.path.join(mdir, "mp_rank_01_001", "model_optim_rng.pt"))
    assert C.main(["megatron-to-hf", "--megatron", mdir, "--out", back]) == 1
    assert "mp_rank_01_001" in capsys.readouterr().err
    assert C.main(["hf-to-megatron", "--hf", hf_dir, "--out", mdir, "--tp", "4"]) == 1
    assert "num_key_value_heads" in capsys.readouterr().err
    assert C.main(["hf-to-mega", "--hf", hf_dir]) == 2
    assert "hf-to-megatron" in capsys.readouterr().err


def test_missing_tensor_is_named(setup):
    hf_config = C.load_hf_config(setup.dirs["llama"])
    hf_sd = C.load_hf_state_dict(setup.dirs["llama"])
    del hf_sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(C.ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        C.hf_to_megatron(hf_sd, hf_config, 0, 1)
    bad = dict(hf_sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})
    with pytest.raises(C.ConversionError, match=r"k_proj\.weight has shape \(64, 64\), expected \(32, 64\)"):
        C.hf_to_megatron(bad, hf_config, 0, 1)
    with pytest.raises(C.ConversionError, match="lm_head.weight"):
        C.load_hf_state_dict(setup.dirs["qwen2"], ["lm_head.weight"])  # tied: not stored


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_moe_raw", "qwen2_moe"])
def test_moe_config_and_checkpoint_names(setup, family):
    """The MoE fields come over from the HF config (the experts' width, k, renormalisation), the checkpoint holds
    one tensor per expert and projection (what the fused in-memory experts of transformers split into), and a
    config with dense layers among the MoE ones is refused by name."""
    hf_config = C.load_hf_config(setup.dirs[family])
    f = C.model_config_from_hf(hf_config)
    assert (f["num_experts"], f["moe_topk"], f["moe_ffn_hidden_size"]) == (4, 2, 32)
    assert f["moe_norm_topk_prob"] == (family == "qwen3_moe")
    qwen2 = family == "qwen2_moe"
    assert (f["qk_norm"], f["add_qkv_bias"], f["moe_shared_expert_ffn_hidden_size"]) == (not qwen2, qwen2, 48 * qwen2)
    params = _by_checkpoint_name({n: p.detach() for n, p in setup.hf[family].named_parameters()})
    saved = C.load_hf_state_dict(setup.dirs[family])
    assert set(params) == set(saved) == set(C.hf_keys(hf_config))
    assert all(torch.equal(params[k], saved[k]) for k in saved)
    exported = C.hf_config_from_model_config(SimpleNamespace(**dict(_mcfg(setup.dirs[family], "sdpa").__dict__)), VOCAB)
    assert C.model_config_from_hf(exported) == {k: v for k, v in f.items() if k != "params_dtype"} | (
        {"params_dtype": "fp32"} if "params_dtype" in f else {})
    assert exported["architectures"] == ["Qwen2MoeForCausalLM" if qwen2 else "Qwen3MoeForCausalLM"]
    for bad in ({"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}):
        with pytest.raises(C.ConversionError, match="every layer must be an MoE layer"):
            C.model_config_from_hf(dict(hf_config.to_dict(), **bad))
    dense = C.model_config_from_hf(C.load_hf_config(setup.dirs["qwen3"]))
    assert (dense["num_experts"], dense["moe_topk"]) == (0, 0)
