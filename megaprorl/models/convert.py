"""HF <-> Megatron-core weights for the Qwen2, Qwen3, Qwen3-MoE, Qwen2-MoE, Llama and Mistral (dense) families
(TP-sharded, PP-stage sliced).

The mapping (see docs/convert.md), per decoder layer ``N`` (HF prefix ``model.layers.N.``):

=====================================================  ==========================================  ===========
Megatron (local spec; TE spec name in brackets)        HF                                          TP sharding
=====================================================  ==========================================  ===========
embedding.word_embeddings.weight                       model.embed_tokens.weight                   vocab rows
decoder.layers.N.input_layernorm.weight                input_layernorm.weight                      replicated
  [self_attention.linear_qkv.layer_norm_weight]
decoder.layers.N.self_attention.linear_qkv.weight      self_attn.{q,k,v}_proj.weight (grouped)     query groups
decoder.layers.N.self_attention.linear_qkv.bias        self_attn.{q,k,v}_proj.bias (Qwen2 only)    query groups
decoder.layers.N.self_attention.q_layernorm.weight     self_attn.q_norm.weight (Qwen3 only)        replicated
decoder.layers.N.self_attention.k_layernorm.weight     self_attn.k_norm.weight (Qwen3 only)        replicated
decoder.layers.N.self_attention.linear_proj.weight     self_attn.o_proj.weight                     input dim
decoder.layers.N.pre_mlp_layernorm.weight              post_attention_layernorm.weight             replicated
  [mlp.linear_fc1.layer_norm_weight]
decoder.layers.N.mlp.linear_fc1.weight                 cat(mlp.gate_proj, mlp.up_proj)             [gate_r; up_r]
decoder.layers.N.mlp.linear_fc2.weight                 mlp.down_proj.weight                        input dim
decoder.layers.N.mlp.router.weight (MoE)               mlp.gate.weight                             replicated
decoder.layers.N.mlp.experts.local_experts.E.          mlp.experts.E.{gate,up}_proj, down_proj     as the MLP's
  linear_fc1 / linear_fc2 (MoE, expert E)
decoder.layers.N.mlp.shared_experts.linear_fc1 / _fc2  mlp.shared_expert.{gate,up}_proj, down_proj as the MLP's
decoder.layers.N.mlp.shared_experts.gate_weight        mlp.shared_expert_gate.weight (Qwen2-MoE)   replicated
decoder.final_layernorm.weight                         model.norm.weight                           replicated
output_layer.weight                                    lm_head.weight (embed_tokens when tied)     vocab rows
=====================================================  ==========================================  ===========

Qwen3's ``head_dim`` need not be hidden_size / num_attention_heads (Qwen3-0.6B: 1024 / 16 heads, head_dim 128);
its q/k norms are RMSNorms over each head's ``head_dim`` channels, the same weight for every head.
Megatron's fused QKV weight is ordered by query group: for each of the ``G`` key/value heads,
the ``H/G`` query heads that share it, then its key head, then its value head
(``[G, (H/G + 2) * head_dim, hidden]``); tensor parallelism gives each rank ``G/tp`` whole groups.
Embedding and output layer rows are zero-padded from the HF vocabulary up to the padded vocabulary
(divisible by ``make_vocab_divisible_by * tp``) and split in contiguous row blocks.

Entry points: :func:`model_config_from_hf`, :func:`hf_to_megatron`, :func:`megatron_to_hf`,
:func:`load_hf_state_dict`, :func:`load_hf_into_model` (one rank, inside a running job),
:func:`save_megatron_as_hf` (collective) and :func:`main` (``megaprorl convert``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .gpt import head_dim
from .rope import rope_scaling_spec

# Mistral dense: the Llama layout; the MoE families: every layer's MLP routed (Qwen2-MoE with its shared expert)
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "qwen3_moe", "qwen2_moe")
MOE_MODEL_TYPES = ("qwen3_moe", "qwen2_moe")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
META_FILE = "megaprorl_convert.json"
MODEL_YAML = "model.yaml"
HF_META_DIR = "hf"
# Files copied next to converted weights so that the result is a complete HF directory.
_HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
                  "added_tokens.json", "chat_template.jinja", "chat_template.json")


class ConversionError(ValueError):
    """A user-caused conversion problem (missing file or key, unsupported model, bad shapes)."""


# ------------------------------------------------------------------------------------- HF config
def _cfg_get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _model_type(cfg) -> str:
    return str(_cfg_get(cfg, "model_type", "") or "")


def _rope_theta(cfg) -> float:
    params = _cfg_get(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = _cfg_get(cfg, "rope_theta", None)
    return float(theta) if theta is not None else 10000.0


def _rope_scaling(cfg, strict: bool) -> Dict:
    """The HF config's RoPE scaling (``rope_parameters``, or the older ``rope_scaling``) as
    ``rope_scaling_spec`` gives it; a type megaprorl does not build is an error, or ``{}`` without
    ``strict``."""
    raw = _cfg_get(cfg, "rope_parameters", None)
    if not isinstance(raw, dict):
        raw = _cfg_get(cfg, "rope_scaling", None)
    try:
        return rope_scaling_spec(raw if isinstance(raw, dict) else None, "HF config")
    except ValueError as e:
        if strict:
            raise ConversionError(f"{e} (pass strict=False to convert anyway)") from None
        return {}


class _Dims:
    """The shapes that the mapping needs, read (and checked) from the HF config."""

    def __init__(self, cfg):
        mt = _model_type(cfg)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConversionError(f"unsupported HF model_type {mt!r}: megaprorl converts {list(SUPPORTED_MODEL_TYPES)}")
        self.model_type = mt
        self.hidden = int(_cfg_get(cfg, "hidden_size"))
        self.heads = int(_cfg_get(cfg, "num_attention_heads"))
        self.groups = int(_cfg_get(cfg, "num_key_value_heads", None) or self.heads)
        self.layers = int(_cfg_get(cfg, "num_hidden_layers"))
        self.ffn = int(_cfg_get(cfg, "intermediate_size"))
        self.vocab = int(_cfg_get(cfg, "vocab_size"))
        self.tie = bool(_cfg_get(cfg, "tie_word_embeddings", False))
        hd = _cfg_get(cfg, "head_dim", None)
        # Qwen2 and Llama configs may carry head_dim (transformers' Llama honours it); 0 / None: hidden / heads
        self.head_dim = int(hd) if hd else self.hidden // self.heads
        if not hd and self.hidden % self.heads:
            raise ConversionError(f"hidden_size ({self.hidden}) is not a multiple of num_attention_heads "
                                  f"({self.heads}) and the HF config gives no head_dim")
        self.qk_norm = mt in ("qwen3", "qwen3_moe")
        # Qwen3-MoE / Qwen2-MoE: every layer's MLP is a router over routed experts; Qwen2-MoE's has a shared
        # expert too, scaled by sigmoid(shared_expert_gate . x)
        self.experts = int(_cfg_get(cfg, "num_experts", None) or _cfg_get(cfg, "num_local_experts", None) or 0) \
            if mt in MOE_MODEL_TYPES else 0
        self.shared_ffn = int(_cfg_get(cfg, "shared_expert_intermediate_size", 0) or 0) if mt == "qwen2_moe" else 0
        if mt == "qwen2_moe" and not self.shared_ffn:
            raise ConversionError("a qwen2_moe config without shared_expert_intermediate_size")
        if self.experts:
            self.topk = int(_cfg_get(cfg, "num_experts_per_tok"))
            self.moe_ffn = int(_cfg_get(cfg, "moe_intermediate_size"))
            self.norm_topk = bool(_cfg_get(cfg, "norm_topk_prob", False))
            if int(_cfg_get(cfg, "decoder_sparse_step", 1) or 1) != 1 or _cfg_get(cfg, "mlp_only_layers", None):
                raise ConversionError(f"{mt} with dense layers among the MoE ones (decoder_sparse_step != 1 or "
                                      "mlp_only_layers) is not supported: every layer must be an MoE layer")
            if not 1 <= self.topk <= self.experts:
                raise ConversionError(f"num_experts_per_tok ({self.topk}) must be in 1..num_experts ({self.experts})")
        elif mt in MOE_MODEL_TYPES:
            raise ConversionError(f"a {mt} config without num_experts (or num_local_experts)")
        if self.heads % self.groups:
            raise ConversionError(f"num_attention_heads ({self.heads}) must be a multiple of "
                                  f"num_key_value_heads ({self.groups})")
        self.q_per_group = self.heads // self.groups
        self.qkv_bias = mt in ("qwen2", "qwen2_moe") or bool(_cfg_get(cfg, "attention_bias", False))
        if mt in ("llama", "qwen3", "mistral", "qwen3_moe") and _cfg_get(cfg, "attention_bias", False):
            raise ConversionError(f"{mt} with attention_bias=True (bias on o_proj too) is not supported")
        if _cfg_get(cfg, "mlp_bias", False):
            raise ConversionError("mlp_bias=True is not supported (Megatron model is built without linear biases)")
        act = _cfg_get(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConversionError(f"hidden_act {act!r} is not supported (SwiGLU/silu only)")

    def check_tp(self, tp: int, ep: int = 1, across_replicas: bool = False):
        """``across_replicas``: the ``ep`` expert ranks are data-parallel replicas at TP = 1, not TP ranks."""
        if tp < 1:
            raise ConversionError(f"tensor parallel size must be >= 1, got {tp}")
        if across_replicas and tp != 1:
            raise ConversionError(f"experts across data-parallel replicas need tensor parallel size 1, got {tp}")
        if ep < 1 or (tp % ep and not across_replicas):
            raise ConversionError(f"expert parallel size {ep} must divide tensor parallel size {tp}")
        if ep > 1 and (not self.experts or self.experts % ep):
            raise ConversionError(f"expert parallel size {ep} must divide num_experts ({self.experts})")
        if self.groups % tp:
            raise ConversionError(f"num_key_value_heads ({self.groups}) must be divisible by tensor parallel size {tp}")
        if self.shared_ffn % tp:
            raise ConversionError(f"shared_expert_intermediate_size ({self.shared_ffn}) must be divisible by tensor "
                                  f"parallel size {tp}")
        if self.experts and self.moe_ffn % max(1, tp // ep):
            raise ConversionError(f"moe_intermediate_size ({self.moe_ffn}) must be divisible by the expert tensor "
                                  f"parallel size {tp // ep} (tensor parallel {tp} / expert parallel {ep})")
        if not self.experts and self.ffn % tp:
            raise ConversionError(f"intermediate_size ({self.ffn}) must be divisible by tensor parallel size {tp}")


def model_config_from_hf(hf_config, strict: bool = True) -> Dict:
    """``ModelConfig`` fields for an HF Qwen2 / Qwen3 / Llama / Mistral config (a ``PretrainedConfig`` or the
    config.json dict).

    The Megatron model must be built with ``vocab_size=hf_vocab_size(hf_config)`` (the HF embedding
    rows, which may exceed the tokenizer's length).  RoPE scaling ``linear``, ``llama3`` (Llama-3.x) and
    ``yarn`` come over as ``rope_scaling``; with ``strict`` another one (``dynamic``, ``longrope``...) or a sliding
    window is an error, since the built model would not reproduce the HF logits.
    """
    d = _Dims(hf_config)
    rope_scaling = _rope_scaling(hf_config, strict)
    if strict and _cfg_get(hf_config, "use_sliding_window", False):
        raise ConversionError("sliding-window attention (use_sliding_window=True) is not supported")
    window = _cfg_get(hf_config, "sliding_window", None) if _model_type(hf_config) == "mistral" else None
    if strict and window and int(window) < int(_cfg_get(hf_config, "max_position_embeddings", 0) or 0):
        # Mistral applies its window whenever it is set (Mistral-7B-v0.1: 4096 of 32768); v0.2/v0.3, Nemo: null
        raise ConversionError(f"sliding-window attention (sliding_window={window} < max_position_embeddings="
                              f"{_cfg_get(hf_config, 'max_position_embeddings')}) is not supported")
    kinds = sorted(set(_cfg_get(hf_config, "layer_types", None) or ()) - {"full_attention"})
    if strict and kinds:
        raise ConversionError(f"layer_types {kinds} are not supported: every layer must be full_attention")
    dtype = _cfg_get(hf_config, "dtype", None) or _cfg_get(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    out = dict(
        num_layers=d.layers,
        hidden_size=d.hidden,
        ffn_hidden_size=d.ffn,
        num_attention_heads=d.heads,
        num_query_groups=d.groups,
        head_dim=d.head_dim,
        max_position_embeddings=int(_cfg_get(hf_config, "max_position_embeddings", 4096)),
        rotary_base=_rope_theta(hf_config),
        rope_scaling=rope_scaling,
        norm_epsilon=float(_cfg_get(hf_config, "rms_norm_eps", 1e-6)),
        add_qkv_bias=d.qkv_bias,
        qk_norm=d.qk_norm,
        tie_embeddings=d.tie,
        num_experts=d.experts,
        moe_topk=d.topk if d.experts else 0,
        moe_ffn_hidden_size=d.moe_ffn if d.experts else 0,
        moe_norm_topk_prob=d.norm_topk if d.experts else True,
        moe_shared_expert_ffn_hidden_size=d.shared_ffn,
    )
    if dtype in _DTYPE_NAMES:
        out["params_dtype"] = _DTYPE_NAMES[dtype]
    return out


# The ModelConfig fields that fix the computation: a model built with another value than the HF config's
# loads (where the shapes agree) and computes something else (RoPE base, norm epsilon) or fails to load.
ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "head_dim", "rotary_base", "rope_scaling", "norm_epsilon", "add_qkv_bias", "qk_norm",
               "tie_embeddings", "num_experts", "moe_topk", "moe_ffn_hidden_size", "moe_norm_topk_prob",
               "moe_shared_expert_ffn_hidden_size")
# the MoE fields' values for a model config that predates them (a dense model)
_DENSE_MOE = {"num_experts": 0, "moe_topk": 0, "moe_ffn_hidden_size": 0, "moe_norm_topk_prob": True,
              "moe_shared_expert_ffn_hidden_size": 0}


def check_model_config(model_cfg, hf_config, where: str, prefix: str = "model.") -> None:
    """Raise ``ConversionError`` naming every architecture key of ``model_cfg`` (a ``ModelConfig``) whose
    value differs from the HF config's (``where``: the HF directory, for the message), with the values
    to set."""
    want = model_config_from_hf(hf_config)
    bad = []
    for k in ARCH_FIELDS:
        have, need = getattr(model_cfg, k, _DENSE_MOE.get(k)), want[k]
        if k == "rope_scaling":
            have = rope_scaling_spec(have, f"{prefix}{k}")
        elif k == "head_dim":  # 0 means hidden_size / num_attention_heads
            have = head_dim(model_cfg)
        same = (math.isclose(float(have), float(need), rel_tol=1e-9, abs_tol=0.0) if isinstance(need, float)
                else have == need)
        if not same:
            bad.append((k, have, need))
    if bad:
        listing = ", ".join(f"{prefix}{k}={have!r} (config.json: {need!r})" for k, have, need in bad)
        fix = ", ".join(f"{k}: {need}" for k, _, need in bad)
        raise ConversionError(f"{where}/config.json does not describe the model the config builds: {listing}; "
                              f"set them to the checkpoint's values (model: {{{fix}}})")


def hf_config_from_model_config(model_cfg, vocab_size: int, eos_token_id=None, pad_token_id=None) -> Dict:
    """An HF ``config.json`` dict for a model built from ``model_cfg`` (Qwen3 with q/k norms, Qwen2 with a
    QKV bias, else Llama): the inverse of :func:`model_config_from_hf`, for policies that did not start from an HF
    checkpoint (e.g. the demo's)."""
    qwen3 = bool(getattr(model_cfg, "qk_norm", False))
    qwen = bool(model_cfg.add_qkv_bias) and not qwen3
    if qwen3 and model_cfg.add_qkv_bias:
        raise ConversionError("model.qk_norm with model.add_qkv_bias has no HF family: Qwen3 has no QKV bias")
    mt = "qwen3" if qwen3 else "qwen2" if qwen else "llama"
    experts = int(getattr(model_cfg, "num_experts", 0) or 0)
    shared = int(getattr(model_cfg, "moe_shared_expert_ffn_hidden_size", 0) or 0)
    if experts:
        if (mt, bool(shared)) not in (("qwen3", False), ("qwen2", True)):
            raise ConversionError("model.num_experts > 0 has an HF family only as Qwen3-MoE (model.qk_norm, no "
                                  "model.add_qkv_bias, no shared expert) or Qwen2-MoE (model.add_qkv_bias, no "
                                  "model.qk_norm, model.moe_shared_expert_ffn_hidden_size > 0)")
        mt += "_moe"
    dtype = str(_DTYPES[model_cfg.params_dtype]).replace("torch.", "")  # float32 | bfloat16 | float16
    cfg = {
        "architectures": [{"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                           "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[mt]],
        "model_type": mt,
        "vocab_size": int(vocab_size),
        "hidden_size": int(model_cfg.hidden_size),
        "intermediate_size": int(model_cfg.ffn_hidden_size),
        "num_hidden_layers": int(model_cfg.num_layers),
        "num_attention_heads": int(model_cfg.num_attention_heads),
        "num_key_value_heads": int(model_cfg.num_query_groups or model_cfg.num_attention_heads),
        "head_dim": head_dim(model_cfg),
        "max_position_embeddings": int(model_cfg.max_position_embeddings),
        "rope_theta": float(model_cfg.rotary_base),
        "rms_norm_eps": float(model_cfg.norm_epsilon),
        "tie_word_embeddings": bool(model_cfg.tie_embeddings),
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    cfg.update({"use_sliding_window": False} if qwen else {"attention_bias": False})  # qwen: Qwen2 and Qwen2-MoE
    if mt == "llama":
        cfg["mlp_bias"] = False
    if experts:
        cfg.update(num_experts=experts, num_experts_per_tok=int(model_cfg.moe_topk),
                   moe_intermediate_size=int(model_cfg.moe_ffn_hidden_size or model_cfg.ffn_hidden_size),
                   norm_topk_prob=bool(model_cfg.moe_norm_topk_prob), decoder_sparse_step=1, mlp_only_layers=[])
        if shared:
            cfg["shared_expert_intermediate_size"] = shared
    scaling = rope_scaling_spec(getattr(model_cfg, "rope_scaling", None))
    if scaling:
        cfg["rope_scaling"] = scaling
    if eos_token_id is not None:
        cfg["eos_token_id"] = eos_token_id
    if pad_token_id is not None:
        cfg["pad_token_id"] = pad_token_id
    return cfg


def hf_vocab_size(hf_config) -> int:
    """Rows of the HF embedding: the (unpadded) vocab size to build the Megatron model with."""
    return int(_cfg_get(hf_config, "vocab_size"))


def _padded(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = max(1, divisible_by) * tp
    return ((vocab + multiple - 1) // multiple) * multiple


# ----------------------------------------------------------------------------------- key mapping
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Megatron name inside a layer -> (HF names inside "model.layers.N.", kind)
_LAYER_MAP = {
    "input_layernorm.weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.weight": (("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"), "qkv"),
    "self_attention.linear_qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                        "self_attn.v_proj.bias"), "qkv"),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "replicated"),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "replicated"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "row"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "row"),
}
_QK_NORM_NAMES = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")
_DENSE_MLP = ("mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
# an MoE layer's router and routed experts (Megatron's SequentialMLP; HF's checkpoint names, one tensor per expert)
_ROUTER = "mlp.router.weight"
# Qwen2-MoE's shared expert (Megatron's SharedExpertMLP with its gate) -> (HF names, kind)
_SHARED = {"mlp.shared_experts.linear_fc1.weight": (("mlp.shared_expert.gate_proj.weight",
                                                     "mlp.shared_expert.up_proj.weight"), "fc1"),
           "mlp.shared_experts.linear_fc2.weight": (("mlp.shared_expert.down_proj.weight",), "row"),
           "mlp.shared_experts.gate_weight": (("mlp.shared_expert_gate.weight",), "replicated")}
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
_LOCAL_EXPERT_RE = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.linear_fc[12]\.weight)$")


def _local_expert(mkey: str) -> Optional[int]:
    """The local expert index of an expert weight's Megatron key (None for other keys)."""
    m = _LOCAL_EXPERT_RE.search(mkey)
    return int(m.group(2)) if m else None


def _as_expert(mkey: str, expert: int) -> str:
    """``mkey`` (an expert weight's key) naming expert ``expert`` instead of its local index."""
    return _LOCAL_EXPERT_RE.sub(lambda m: f"{m.group(1)}{expert}{m.group(3)}", mkey)


def _expert_coords(tp_rank: int, tp_size: int, ep_size: int):
    """(expert-parallel rank, expert-tensor-parallel rank, expert-tensor-parallel size) of a tensor-parallel rank
    when the experts are spread over ``ep_size`` ranks of its group: Megatron's expert layout puts the expert
    tensor-parallel ranks innermost, so TP rank r holds the experts of EP rank r // (TP / EP), split as rank
    r % (TP / EP) of TP / EP."""
    etp = tp_size // ep_size
    return tp_rank // etp, tp_rank % etp, etp
_LAYERNORM_NAMES = {
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
    "te": ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
}


def _is_weight_key(key: str) -> bool:
    return not key.endswith("_extra_state")


def _hf_names(mkey: str, global_layer: Optional[int], dims: _Dims):
    """(HF names, kind) for one Megatron key; ``global_layer`` is the 0-based HF layer index."""
    if mkey == "embedding.word_embeddings.weight":
        return ("model.embed_tokens.weight",), "vocab"
    if mkey == "output_layer.weight":
        return (("model.embed_tokens.weight",) if dims.tie else ("lm_head.weight",)), "vocab"
    if mkey == "decoder.final_layernorm.weight":
        return ("model.norm.weight",), "replicated"
    m = _LAYER_RE.match(mkey)
    if m and dims.experts and (m.group(2) == _ROUTER or _EXPERT_RE.match(m.group(2))):
        e = _EXPERT_RE.match(m.group(2))
        if e is None:
            return (f"model.layers.{global_layer}.mlp.gate.weight",), "replicated"
        if int(e.group(1)) >= dims.experts:
            raise ConversionError(f"Megatron parameter {mkey} is expert {e.group(1)} of {dims.experts}")
        p = f"model.layers.{global_layer}.mlp.experts.{e.group(1)}."
        if e.group(2) == "1":
            return (p + "gate_proj.weight", p + "up_proj.weight"), "fc1"
        return (p + "down_proj.weight",), "row"
    if m and dims.shared_ffn and m.group(2) in _SHARED:
        names, kind = _SHARED[m.group(2)]
        return tuple(f"model.layers.{global_layer}.{n}" for n in names), kind
    if m and dims.experts and m.group(2) in _DENSE_MLP:
        raise ConversionError(f"Megatron parameter {mkey} is a dense MLP's, but the HF {dims.model_type} config "
                              "has MoE layers (model.num_experts mismatch)")
    if m and m.group(2) in _LAYER_MAP:
        names, kind = _LAYER_MAP[m.group(2)]
        if kind == "qkv" and names[0].endswith(".bias") and not dims.qkv_bias:
            raise ConversionError(f"Megatron parameter {mkey} has a QKV bias but the HF "
                                  f"{dims.model_type} config has none (add_qkv_bias mismatch)")
        if m.group(2) in _QK_NORM_NAMES and not dims.qk_norm:
            raise ConversionError(f"Megatron parameter {mkey} is a q/k norm but the HF {dims.model_type} "
                                  "config has none (qk_norm mismatch)")
        return tuple(f"model.layers.{global_layer}.{n}" for n in names), kind
    raise ConversionError(f"no HF mapping for Megatron parameter {mkey!r}")


def megatron_keys(hf_config, layer_numbers: Sequence[int], pre_process: bool = True, post_process: bool = True,
                  layernorm_style: str = "local", ep_size: int = 1) -> List[str]:
    """The Megatron parameter names of one pipeline stage holding ``len(layer_numbers)`` layers (an MoE
    model's experts: the local ones of a rank, ``num_experts / ep_size``)."""
    dims = _Dims(hf_config)
    if layernorm_style not in _LAYERNORM_NAMES:
        raise ConversionError(f"layernorm_style must be 'local' or 'te', got {layernorm_style!r}")
    ln1, ln2 = _LAYERNORM_NAMES[layernorm_style]
    keys = []
    if pre_process:
        keys.append("embedding.word_embeddings.weight")
    for i in range(len(layer_numbers)):
        p = f"decoder.layers.{i}."
        keys += [p + ln1, p + "self_attention.linear_qkv.weight"]
        if dims.qkv_bias:
            keys.append(p + "self_attention.linear_qkv.bias")
        if dims.qk_norm:
            keys += [p + n for n in _QK_NORM_NAMES]
        if dims.experts:  # the norm before the router is its own module in both specs
            keys += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight", p + _ROUTER]
            for e in range(dims.experts // ep_size):
                keys += [f"{p}mlp.experts.local_experts.{e}.linear_fc{j}.weight" for j in (1, 2)]
            if dims.shared_ffn:
                keys += [p + k for k in _SHARED]
        else:
            keys += [p + "self_attention.linear_proj.weight", p + ln2, p + "mlp.linear_fc1.weight",
                     p + "mlp.linear_fc2.weight"]
    if post_process:
        keys.append("decoder.final_layernorm.weight")
        if not dims.tie or not pre_process:  # tied + one stage: the output layer reuses the embedding
            keys.append("output_layer.weight")
    return keys


def _stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> List[int]:
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ConversionError(f"bad pipeline rank {pp_rank} of {pp_size}")
    if num_layers % pp_size:
        raise ConversionError(f"num_hidden_layers ({num_layers}) must be divisible by pipeline parallel size "
                              f"{pp_size} (or pass layer_numbers explicitly)")
    per = num_layers // pp_size
    return list(range(pp_rank * per, (pp_rank + 1) * per))


# ------------------------------------------------------------------------------ HF -> Megatron
def _shard_one(kind: str, hf: List[torch.Tensor], dims: _Dims, tp_rank: int, tp_size: int,
               padded_vocab: int, mkey: str) -> torch.Tensor:
    if kind == "replicated":
        return hf[0]
    if kind == "vocab":
        w = hf[0]
        if w.shape[0] > padded_vocab:
            raise ConversionError(f"{mkey}: HF has {w.shape[0]} vocab rows but the Megatron model only "
                                  f"{padded_vocab}; build it with vocab_size=hf_vocab_size(hf_config)")
        if w.shape[0] < padded_vocab:
            w = torch.cat([w, w.new_zeros((padded_vocab - w.shape[0],) + tuple(w.shape[1:]))], dim=0)
        return w.chunk(tp_size, dim=0)[tp_rank]
    if kind == "row":
        return hf[0].chunk(tp_size, dim=1)[tp_rank]
    if kind == "fc1":
        gate, up = hf
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    if kind == "qkv":
        q, k, v = hf
        g, hd = dims.groups, dims.head_dim
        rest = tuple(q.shape[1:])
        qkv = torch.cat([q.reshape((g, dims.q_per_group * hd) + rest), k.reshape((g, hd) + rest),
                         v.reshape((g, hd) + rest)], dim=1)
        per = g // tp_size
        return qkv[tp_rank * per:(tp_rank + 1) * per].reshape((-1,) + rest)
    raise AssertionError(kind)


def _convert_keys_to_megatron(mkeys: Iterable[str], get_hf: Callable[[str], torch.Tensor], dims: _Dims,
                              tp_rank: int, tp_size: int, padded_vocab: int,
                              layer_numbers: Sequence[int], ep_size: int = 1,
                              ep_rank: Optional[int] = None) -> Dict[str, torch.Tensor]:
    dims.check_tp(tp_size, ep_size, across_replicas=ep_rank is not None)
    if padded_vocab % tp_size:
        raise ConversionError(f"padded vocab {padded_vocab} is not divisible by tensor parallel size {tp_size}")
    out = {}
    for mkey in mkeys:
        m = _LAYER_RE.match(mkey)
        glob = None
        if m:
            local = int(m.group(1))
            if local >= len(layer_numbers):
                raise ConversionError(f"Megatron parameter {mkey} is beyond this stage's {len(layer_numbers)} layers")
            glob = int(layer_numbers[local])
            if not 0 <= glob < dims.layers:
                raise ConversionError(f"{mkey} maps to HF layer {glob}, but the HF config has {dims.layers} layers")
        names, kind, r, size = _hf_source(mkey, glob, dims, tp_rank, tp_size, ep_size, ep_rank)
        hf = [get_hf(n) for n in names]
        _check_hf_shapes(mkey, names, hf, dims)
        out[mkey] = _shard_one(kind, hf, dims, r, size, padded_vocab, mkey)
    return out


def _hf_source(mkey: str, glob: Optional[int], dims: _Dims, tp_rank: int, tp_size: int, ep_size: int,
               ep_rank: Optional[int] = None):
    """(HF names, kind, shard rank, shard count) of TP rank ``tp_rank``'s tensor ``mkey``: an expert's weights
    are the rank's EP share of the experts (local expert e: expert ep_rank * num_experts / EP + e), split over
    the expert-TP ranks; every other tensor is split over the TP group.  ``ep_rank`` given: the experts are
    spread over data-parallel replicas at TP = 1 and this is the rank's place among them (whole experts)."""
    local = _local_expert(mkey)
    if local is None:
        return _hf_names(mkey, glob, dims) + (tp_rank, tp_size)
    ep_rank, etp_rank, etp = (_expert_coords(tp_rank, tp_size, ep_size) if ep_rank is None else (ep_rank, 0, 1))
    per_rank = dims.experts // ep_size
    if local >= per_rank:
        raise ConversionError(f"Megatron parameter {mkey} is local expert {local} of {per_rank} per rank "
                              f"({dims.experts} experts over expert parallel {ep_size})")
    return _hf_names(_as_expert(mkey, ep_rank * per_rank + local), glob, dims) + (etp_rank, etp)


def _check_hf_shapes(mkey: str, names: Sequence[str], tensors: Sequence[torch.Tensor], dims: _Dims) -> None:
    """HF tensor shapes must match the HF config (a wrong config.json would otherwise scramble heads)."""
    h, hd = dims.hidden, dims.head_dim
    expect = {"q_proj.weight": (dims.heads * hd, h), "k_proj.weight": (dims.groups * hd, h),
              "v_proj.weight": (dims.groups * hd, h), "q_proj.bias": (dims.heads * hd,),
              "k_proj.bias": (dims.groups * hd,), "v_proj.bias": (dims.groups * hd,),
              "o_proj.weight": (h, dims.heads * hd), "gate_proj.weight": (dims.ffn, h),
              "up_proj.weight": (dims.ffn, h), "down_proj.weight": (h, dims.ffn),
              "q_norm.weight": (hd,), "k_norm.weight": (hd,),  # before norm.weight: the first match counts
              "layernorm.weight": (h,), "norm.weight": (h,), "embed_tokens.weight": (dims.vocab, h),
              "lm_head.weight": (dims.vocab, h)}
    if dims.experts:  # every MLP projection is an expert's, of the experts' width; the router's rows: experts
        f, g = dims.moe_ffn, dims.shared_ffn  # (the shared expert's, of its own width, are matched first)
        expect = {"shared_expert.gate_proj.weight": (g, h), "shared_expert.up_proj.weight": (g, h),
                  "shared_expert.down_proj.weight": (h, g), "shared_expert_gate.weight": (1, h),
                  **expect, "gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f),
                  "mlp.gate.weight": (dims.experts, h)}
    for name, t in zip(names, tensors):
        for suffix, shape in expect.items():
            if name.endswith(suffix):
                if tuple(t.shape) != shape:
                    raise ConversionError(f"HF tensor {name} has shape {tuple(t.shape)}, expected {shape} from "
                                          f"the HF config (needed for Megatron {mkey})")
                break


def _getter(hf_state_dict: Dict[str, torch.Tensor], where: str = "HF state dict"):
    def get(name):
        if name in hf_state_dict:
            return hf_state_dict[name]
        if name.startswith("model.") and name[len("model."):] in hf_state_dict:  # headless base-model save
            return hf_state_dict[name[len("model."):]]
        raise ConversionError(f"{where} has no tensor {name!r}")
    return get


def hf_to_megatron(hf_state_dict: Dict[str, torch.Tensor], hf_config, tp_rank: int = 0, tp_size: int = 1,
                   pp_rank: int = 0, pp_size: int = 1, padded_vocab: Optional[int] = None, *,
                   make_vocab_divisible_by: int = 128, layernorm_style: str = "local",
                   layer_numbers: Optional[Sequence[int]] = None,
                   target_keys: Optional[Iterable[str]] = None, ep_size: int = 1,
                   ep_rank: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The Megatron state dict of one (TP rank, PP stage) shard (an MoE model's experts spread over
    ``ep_size`` ranks of the TP group: ``parallel.expert_parallel``; with ``ep_rank``, over ``ep_size``
    data-parallel replicas at TP = 1, this shard being replica ``ep_rank``'s).

    ``padded_vocab`` defaults to the HF vocab padded to ``make_vocab_divisible_by * tp_size`` (as
    ``models.gpt.padded_vocab_size`` does).  Layers of stage ``pp_rank`` are an even split unless
    ``layer_numbers`` (0-based HF layer index of each local layer) is given.  ``target_keys`` (the
    target model's state-dict keys) selects exactly which parameters to produce, including the
    TE-spec layer-norm names; otherwise ``layernorm_style`` ("local" | "te") names them.
    """
    dims = _Dims(hf_config)
    if padded_vocab is None:
        padded_vocab = _padded(dims.vocab, make_vocab_divisible_by, tp_size)
    if layer_numbers is None:
        layer_numbers = _stage_layers(dims.layers, pp_rank, pp_size)
    if target_keys is None:
        target_keys = megatron_keys(hf_config, layer_numbers, pre_process=pp_rank == 0,
                                    post_process=pp_rank == pp_size - 1, layernorm_style=layernorm_style,
                                    ep_size=ep_size)
    keys = [k for k in target_keys if _is_weight_key(k)]
    return _convert_keys_to_megatron(keys, _getter(hf_state_dict), dims, tp_rank, tp_size, padded_vocab,
                                     layer_numbers, ep_size, ep_rank)


# ------------------------------------------------------------------------------ Megatron -> HF
def _merge_one(kind: str, shards: List[torch.Tensor], dims: _Dims) -> List[torch.Tensor]:
    tp = len(shards)
    if kind == "replicated":
        return [shards[0]]
    if kind == "vocab":
        w = torch.cat(shards, dim=0)
        if w.shape[0] < dims.vocab:
            raise ConversionError(f"Megatron vocab ({w.shape[0]} rows) is smaller than the HF vocab_size {dims.vocab}")
        return [w[:dims.vocab]]
    if kind == "row":
        return [torch.cat(shards, dim=1)]
    if kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    if kind == "qkv":
        g, hd = dims.groups, dims.head_dim
        rest = tuple(shards[0].shape[1:])
        per = g // tp
        qkv = torch.cat([s.reshape((per, (dims.q_per_group + 2) * hd) + rest) for s in shards], dim=0)
        qlen = dims.q_per_group * hd
        return [qkv[:, :qlen].reshape((-1,) + rest), qkv[:, qlen:qlen + hd].reshape((-1,) + rest),
                qkv[:, qlen + hd:].reshape((-1,) + rest)]
    raise AssertionError(kind)


def megatron_to_hf(tp_shards: Sequence[Dict[str, torch.Tensor]], hf_config, *, layer_offset: int = 0,
                   layer_numbers: Optional[Sequence[int]] = None, ep_size: int = 1) -> Dict[str, torch.Tensor]:
    """Merge the state dicts of all TP ranks of one pipeline stage (in TP-rank order) into HF tensors.
    An MoE model's experts spread over ``ep_size`` ranks of the TP group: rank r's local expert e is expert
    (r // (TP / EP)) * (num_experts / EP) + e, split over the TP / EP ranks that share its EP rank.

    Works on anything keyed like the model's state dict (parameters, gradients).  Local layer ``i``
    becomes HF layer ``layer_numbers[i]`` (default ``layer_offset + i``).  Vocab padding is dropped;
    with tied embeddings no ``lm_head.weight`` is written.  ``_extra_state`` entries are ignored.
    """
    if not tp_shards:
        raise ConversionError("megatron_to_hf needs at least one TP shard")
    dims = _Dims(hf_config)
    dims.check_tp(len(tp_shards), ep_size)
    etp = len(tp_shards) // ep_size
    per_rank = dims.experts // ep_size if dims.experts else 0
    out: Dict[str, torch.Tensor] = {}
    for mkey in tp_shards[0]:
        if not _is_weight_key(mkey) or tp_shards[0][mkey] is None:
            continue
        if mkey == "output_layer.weight" and dims.tie:
            continue
        m = _LAYER_RE.match(mkey)
        glob = None
        if m:
            local = int(m.group(1))
            glob = int(layer_numbers[local]) if layer_numbers is not None else layer_offset + local
        local = _local_expert(mkey)
        if local is not None and local >= per_rank:
            raise ConversionError(f"Megatron parameter {mkey} is local expert {local} of {per_rank} per rank "
                                  f"({dims.experts} experts over expert parallel {ep_size})")
        # (the key naming the HF tensors, the TP ranks whose shards merge into them)
        parts = [(mkey, range(len(tp_shards)))] if local is None else \
            [(_as_expert(mkey, e * per_rank + local), range(e * etp, (e + 1) * etp)) for e in range(ep_size)]
        for name_key, ranks in parts:
            names, kind = _hf_names(name_key, glob, dims)
            shards = []
            for r in ranks:
                if mkey not in tp_shards[r]:
                    raise ConversionError(f"TP shard {r} has no {mkey!r} (shard 0 has it)")
                shards.append(tp_shards[r][mkey])
            for name, t in zip(names, _merge_one(kind, shards, dims)):
                out[name] = t.contiguous()
    return out


def megatron_stages_to_hf(stages: Sequence[Sequence[Dict[str, torch.Tensor]]], hf_config,
                          ep_size: int = 1) -> Dict[str, torch.Tensor]:
    """``stages[pp_rank][tp_rank]`` state dicts -> one HF state dict (layers numbered consecutively)."""
    out: Dict[str, torch.Tensor] = {}
    offset = 0
    for tp_shards in stages:
        n = len({int(m.group(1)) for k in tp_shards[0] for m in [_LAYER_RE.match(k)] if m})
        out.update(megatron_to_hf(tp_shards, hf_config, layer_offset=offset, ep_size=ep_size))
        offset += n
    dims = _Dims(hf_config)
    if offset != dims.layers:
        raise ConversionError(f"the Megatron stages hold {offset} layers, the HF config says {dims.layers}")
    return out


# ------------------------------------------------------------------------------------- HF files
def load_hf_config(hf_dir: str):
    """The HF config of a local model directory (``transformers.AutoConfig``)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found: not a local HF model directory")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    except Exception as e:  # unknown model_type, malformed json
        raise ConversionError(f"cannot read {path}: {e}") from e


def load_hf_state_dict(hf_dir: str, keys: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a local HF directory (``model.safetensors``, a sharded ``*.index.json``, or
    ``pytorch_model.bin``); only ``keys`` when given (each must exist: ``model.X`` may also be
    stored as ``X``)."""
    wanted = None if keys is None else list(dict.fromkeys(keys))
    st_index = os.path.join(hf_dir, "model.safetensors.index.json")
    st_single = os.path.join(hf_dir, "model.safetensors")
    bin_index = os.path.join(hf_dir, "pytorch_model.bin.index.json")
    bin_single = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(st_index) or os.path.isfile(bin_index):
        index_path = st_index if os.path.isfile(st_index) else bin_index
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"{index_path}: not a valid index (needs a 'weight_map'): {e}") from e
        files: Dict[str, List[str]] = {}
        resolved = _resolve(wanted if wanted is not None else list(weight_map), weight_map, index_path)
        for want, stored in resolved.items():
            files.setdefault(weight_map[stored], []).append(stored)
        stored_tensors = {}
        for fname, names in files.items():
            stored_tensors.update(_read_file(os.path.join(hf_dir, fname), names))
        return {want: stored_tensors[stored] for want, stored in resolved.items()}
    for path in (st_single, bin_single):
        if os.path.isfile(path):
            available = _file_keys(path)
            resolved = _resolve(wanted if wanted is not None else available, set(available), path)
            tensors = _read_file(path, list(resolved.values()))
            return {want: tensors[stored] for want, stored in resolved.items()}
    raise ConversionError(f"no model weights in {hf_dir}: expected model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")


def _resolve(wanted, available, where: str) -> Dict[str, str]:
    out = {}
    missing = []
    for name in wanted:
        if name in available:
            out[name] = name
        elif name.startswith("model.") and name[len("model."):] in available:
            out[name] = name[len("model."):]
        else:
            missing.append(name)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"{where} lacks tensor(s) {missing[:5]}{more}")
    return out


def _file_keys(path: str) -> List[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(_torch_load(path).keys())


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConversionError(f"cannot read {path}: {e}") from e


def _read_file(path: str, names: List[str]) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ConversionError(f"weight file {path} (named in the index) not found")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                have = set(f.keys())
                for n in names:
                    if n not in have:
                        raise ConversionError(f"{path} has no tensor {n!r} although the index names it")
                return {n: f.get_tensor(n) for n in names}
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"cannot read {path}: {e}") from e
    sd = _torch_load(path)
    for n in names:
        if n not in sd:
            raise ConversionError(f"{path} has no tensor {n!r}")
    return {n: sd[n] for n in names}


def save_hf_state_dict(hf_state_dict: Dict[str, torch.Tensor], out_dir: str,
                       max_shard_bytes: int = 5 * 1024 ** 3) -> List[str]:
    """Write safetensors (one file, or shards of at most ``max_shard_bytes`` plus an index)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in hf_state_dict.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def _copy_side_files(src_dir: Optional[str], out_dir: str) -> None:
    if not src_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    for name in _HF_SIDE_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
            shutil.copyfile(src, os.path.join(out_dir, name))


# --------------------------------------------------------------------- in a running (Megatron) job
def _unwrap(model) -> List[torch.nn.Module]:
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for m in chunks:
        while hasattr(m, "module") and not hasattr(m, "decoder"):
            m = m.module
        out.append(m)
    return out


def _layer_numbers(gpt) -> List[int]:
    decoder = getattr(gpt, "decoder", None)
    if decoder is None:
        return []
    return [int(layer.layer_number) - 1 for layer in decoder.layers]


def _tp():
    """(TP rank, TP size, EP size) of this rank: the experts spread over EP ranks of its TP group."""
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        return mps.get_tensor_model_parallel_rank(), mps.get_tensor_model_parallel_world_size(), _ep()
    return 0, 1, 1


def _ep_across_replicas() -> Optional[int]:
    """This rank's expert-parallel rank when the experts are spread over data-parallel replicas (TP = 1), else
    None."""
    from megatron.core import parallel_state as mps

    from ..parallel import wide_expert_group

    return mps.get_expert_model_parallel_rank() if wide_expert_group() is not None else None


def _ep() -> int:
    """The expert-parallel size, checked to be laid out as ``init_distributed`` does: folded into tensor
    parallelism (each TP group's ranks hold all the experts; see ``_expert_coords``), or at TP = 1 over
    data-parallel replicas (``_ep_across_replicas``)."""
    from megatron.core import parallel_state as mps

    ep = mps.get_expert_model_parallel_world_size()
    if ep > 1 and mps.get_tensor_model_parallel_world_size() == 1:
        if mps.get_expert_tensor_parallel_world_size() != 1:
            raise ConversionError("experts across data-parallel replicas need expert tensor parallel size 1")
        return ep
    if ep > 1:
        tp_rank, tp = mps.get_tensor_model_parallel_rank(), mps.get_tensor_model_parallel_world_size()
        coords = (mps.get_expert_model_parallel_rank(), mps.get_expert_tensor_parallel_rank(),
                  mps.get_expert_tensor_parallel_world_size())
        if tp % ep or coords != _expert_coords(tp_rank, tp, ep):
            raise ConversionError(f"expert layout (EP rank, expert-TP rank, expert-TP size) = {coords} at TP rank "
                                  f"{tp_rank} of {tp}: the experts must be spread over the ranks of a TP group "
                                  "(parallel.init_distributed's layout)")
    return ep


@torch.no_grad()
def load_hf_into_model(model, hf_dir: str, hf_config=None) -> Dict[str, int]:
    """Copy a local HF checkpoint into this rank's Megatron GPTModel (or list of virtual-pipeline
    chunks, possibly wrapped in DDP / Float16Module): the rank's TP shard of its pipeline stage's
    layers, read from disk for just the tensors it needs.  Returns {"tensors": n, "params": n}."""
    hf_config = hf_config if hf_config is not None else load_hf_config(hf_dir)
    dims = _Dims(hf_config)
    tp_rank, tp_size, ep_size = _tp()
    ep_rank = _ep_across_replicas()  # or the experts spread over data-parallel replicas
    n_tensors = n_params = 0
    for gpt in _unwrap(model):
        target = {k: v for k, v in gpt.state_dict(keep_vars=True).items()
                  if _is_weight_key(k) and isinstance(v, torch.Tensor)}
        layers = _layer_numbers(gpt)
        padded = None
        for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if k in target:
                padded = target[k].shape[0] * tp_size
        needed = []
        for mkey in target:
            m = _LAYER_RE.match(mkey)
            glob = layers[int(m.group(1))] if m else None
            needed += list(_hf_source(mkey, glob, dims, tp_rank, tp_size, ep_size, ep_rank)[0])
        hf_sd = load_hf_state_dict(hf_dir, needed)
        converted = _convert_keys_to_megatron(list(target), _getter(hf_sd, hf_dir), dims, tp_rank, tp_size,
                                              padded or tp_size, layers, ep_size, ep_rank)
        for mkey, value in converted.items():
            param = target[mkey]
            if tuple(param.shape) != tuple(value.shape):
                raise ConversionError(f"{mkey}: Megatron parameter has shape {tuple(param.shape)} but the "
                                      f"converted HF tensor has {tuple(value.shape)} (model config mismatch? "
                                      "build it from model_config_from_hf)")
            param.data.copy_(value.to(dtype=param.dtype, device=param.device))
            n_tensors += 1
            n_params += value.numel()
    return {"tensors": n_tensors, "params": n_params}


@torch.no_grad()
def save_megatron_as_hf(model, hf_config, out_dir: str, hf_dir: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None) -> Optional[Dict[str, torch.Tensor]]:
    """Collective over all ranks: write the model as an HF directory at ``out_dir`` (rank 0 writes
    safetensors, config.json and, from ``hf_dir``, the tokenizer files).  Returns the HF state dict
    on global rank 0, None elsewhere.  Only the first data-parallel replica's weights are used: its ranks stream
    them (``HFWeightStream``) and rank 0 keeps them on the CPU."""
    import torch.distributed as dist

    from megatron.core import parallel_state as mps

    distributed = dist.is_initialized() and mps.model_parallel_is_initialized()
    is_root = not dist.is_initialized() or dist.get_rank() == 0
    gathered: Dict[str, torch.Tensor] = {}
    if not distributed or mps.get_data_parallel_rank() == 0:
        for bucket in HFWeightStream(model, hf_config).buckets(1 << 28):
            if is_root:
                gathered.update((name, t.to("cpu")) for name, t in bucket)
    result = None
    if is_root:
        result = gathered
        dims = _Dims(hf_config)
        _check_complete(result, dims)
        if dtype is not None:
            result = {k: v.to(dtype) for k, v in result.items()}
        _copy_side_files(hf_dir, out_dir)
        save_hf_state_dict(result, out_dir)
        if hasattr(hf_config, "save_pretrained"):
            hf_config.save_pretrained(out_dir)
        else:
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump(hf_config, f, indent=2)
    if distributed:
        dist.barrier()
    return result


def _stage_plan(chunks, hf_config, tp: int, ep: int = 1):
    """One pipeline stage's HF tensors, grouped as ``HFWeightStream`` sends them: ``[[(name, shape, dtype), ...],
    ...]``, one group per Megatron layer and one per other key (the embedding, the final norm, the output layer),
    worked out on meta tensors of the local shards' shapes, so no data moves."""
    plan = []
    for keys, layers, sd in _key_groups_of(chunks):
        meta = [{k: torch.empty(sd[k].shape, dtype=sd[k].dtype, device="meta") for k in keys}] * tp
        merged = megatron_to_hf(meta, hf_config, layer_numbers=layers, ep_size=ep)
        plan.append([(name, tuple(t.shape), t.dtype) for name, t in merged.items()])
    return plan


def _key_groups(sd: Dict[str, torch.Tensor]) -> List[List[str]]:
    """A chunk's weight keys, one group per layer, in the state dict's order (non-layer keys: one group each)."""
    groups: Dict[object, List[str]] = {}
    for k, v in sd.items():
        if not _is_weight_key(k) or not isinstance(v, torch.Tensor):
            continue
        m = _LAYER_RE.match(k)
        groups.setdefault(int(m.group(1)) if m else k, []).append(k)
    return list(groups.values())


class HFWeightStream:
    """The model's weights as full HF tensors, in buckets, for a rollout engine that refits by HF name.

    ``buckets()`` is collective over the model-parallel group and yields, on every rank, the same
    ``[(hf_name, tensor), ...]`` lists, of about ``bucket_bytes`` each (a tensor larger than that is a bucket
    alone), until every tensor of the HF checkpoint has been sent once.  One Megatron layer at a time, the
    tensor-parallel shards are all-gathered on their device and merged into HF tensors (as ``megatron_to_hf``),
    and a pipeline stage's tensors are broadcast to the other stages; so an engine beside any rank refits
    without the whole model ever sitting on one rank.  ``dtype`` casts (to the engine's dtype); the tensors are
    new ones (never views of the parameters, which the optimizer goes on changing) on the model's device, the
    caller's to keep or share.  The names and shapes, which do not change between
    steps, are exchanged over the pipeline group once.  Each data-parallel replica streams its own copy."""

    def __init__(self, model, hf_config):
        self.model = model
        self.hf_config = hf_config
        self.plan: Optional[List[List[List[Tuple[str, Tuple[int, ...], torch.dtype]]]]] = None  # [stage][group]

    def _chunks(self):
        chunks = []
        for gpt in _unwrap(self.model):
            sd = {k: v.detach() for k, v in gpt.state_dict().items()
                  if _is_weight_key(k) and isinstance(v, torch.Tensor)}
            chunks.append((sd, _layer_numbers(gpt)))
        return chunks

    @torch.no_grad()
    def buckets(self, bucket_bytes: int = 1 << 29, dtype: Optional[torch.dtype] = None):
        import torch.distributed as dist

        from megatron.core import parallel_state as mps

        distributed = dist.is_initialized() and mps.model_parallel_is_initialized()
        tp_group = mps.get_tensor_model_parallel_group() if distributed else None
        pp_group = mps.get_pipeline_model_parallel_group() if distributed else None
        tp = dist.get_world_size(tp_group) if distributed else 1
        ep = _ep() if distributed else 1  # the experts, spread over the TP group: gathered with the rest
        if distributed and _ep_across_replicas() is not None:
            raise ConversionError("the HF weight stream gathers a replica's experts from its own TP group; with the "
                                  "experts across data-parallel replicas (parallel.expert_parallel > 1 at "
                                  "tensor_parallel 1) it is not supported: export the checkpoint (megaprorl convert "
                                  "checkpoint-to-hf) instead")
        pp = dist.get_world_size(pp_group) if distributed else 1
        pp_rank = dist.get_rank(pp_group) if distributed else 0
        chunks = self._chunks()
        device = next(t for sd, _ in chunks for t in sd.values()).device
        if self.plan is None:
            own = _stage_plan(chunks, self.hf_config, tp, ep)
            plans = [own]
            if pp > 1:
                plans = [None] * pp
                dist.all_gather_object(plans, own, group=pp_group)
            self.plan = plans
        bucket: List[Tuple[str, torch.Tensor]] = []
        size = 0
        for stage, groups in enumerate(self.plan):
            mine = _key_groups_of(chunks) if stage == pp_rank else None
            for entries in groups:
                if mine is not None:
                    keys, layers, sd = next(mine)
                    if not entries:  # the output layer of a tied model: the embedding is sent already
                        continue
                    gathered = []
                    for k in keys:
                        t = sd[k].contiguous()
                        if tp == 1:
                            parts = [t.clone()]  # never a view of a parameter: the caller may keep and share it
                        else:
                            parts = [torch.empty_like(t) for _ in range(tp)]
                            dist.all_gather(parts, t, group=tp_group)
                        gathered.append(parts)
                    merged = megatron_to_hf([{k: gathered[i][r] for i, k in enumerate(keys)} for r in range(tp)],
                                            self.hf_config, layer_numbers=layers, ep_size=ep)
                    tensors = [merged[name].to(dtype or merged[name].dtype) for name, _, _ in entries]
                else:
                    tensors = [torch.empty(shape, dtype=dtype or dt, device=device) for _, shape, dt in entries]
                if pp > 1:
                    src = dist.get_global_rank(pp_group, stage)
                    for t in tensors:
                        dist.broadcast(t, src=src, group=pp_group)
                for (name, _, _), t in zip(entries, tensors):
                    nbytes = t.numel() * t.element_size()
                    if bucket and size + nbytes > bucket_bytes:
                        yield bucket
                        bucket, size = [], 0
                    bucket.append((name, t))
                    size += nbytes
        if bucket:
            yield bucket


def _key_groups_of(chunks):
    for sd, layers in chunks:
        for keys in _key_groups(sd):
            yield keys, layers, sd


def hf_keys(hf_config) -> List[str]:
    """Every tensor name an HF checkpoint of this config must hold."""
    dims = _Dims(hf_config)
    keys = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if dims.tie else ["lm_head.weight"])
    for i in range(dims.layers):
        for mname, (names, kind) in _LAYER_MAP.items():
            if kind == "qkv" and names[0].endswith(".bias") and not dims.qkv_bias:
                continue
            if mname in _QK_NORM_NAMES and not dims.qk_norm:
                continue
            if mname in _DENSE_MLP and dims.experts:
                continue
            keys += [f"model.layers.{i}.{n}" for n in names]
        if dims.experts:
            keys.append(f"model.layers.{i}.mlp.gate.weight")
            keys += [f"model.layers.{i}.mlp.experts.{e}.{n}.weight" for e in range(dims.experts)
                     for n in ("gate_proj", "up_proj", "down_proj")]
            if dims.shared_ffn:
                keys += [f"model.layers.{i}.{n}" for names, _ in _SHARED.values() for n in names]
    return list(dict.fromkeys(keys))


def _check_complete(hf_sd: Dict[str, torch.Tensor], dims: _Dims) -> None:
    missing = []
    for k in ["model.embed_tokens.weight", "model.norm.weight"] + ([] if dims.tie else ["lm_head.weight"]):
        if k not in hf_sd:
            missing.append(k)
    for i in range(dims.layers):
        if f"model.layers.{i}.self_attn.q_proj.weight" not in hf_sd:
            missing.append(f"model.layers.{i}.*")
    if missing:
        raise ConversionError(f"the gathered Megatron model lacks {missing[:5]}")


# ----------------------------------------------------------------------- offline: megaprorl convert
def shard_file(out_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron's legacy per-rank layout: ``mp_rank_TT[_PPP]/model_optim_rng.pt``."""
    sub = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(out_dir, sub, "model_optim_rng.pt")


def convert_hf_to_megatron_dir(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1,
                               make_vocab_divisible_by: int = 128, layernorm_style: str = "local",
                               dtype: Optional[str] = None, log=print) -> Dict:
    hf_config = load_hf_config(hf_dir)
    dims = _Dims(hf_config)
    dims.check_tp(tp)
    _stage_layers(dims.layers, 0, pp)  # divisibility check before the (slow) load
    mcfg = model_config_from_hf(hf_config, strict=False)
    if dtype:
        if dtype not in _DTYPES:
            raise ConversionError(f"--dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        mcfg["params_dtype"] = dtype
    log(f"reading {hf_dir} ({_model_type(hf_config)}, {dims.layers} layers)")
    hf_sd = load_hf_state_dict(hf_dir, hf_keys(hf_config))
    padded = _padded(dims.vocab, make_vocab_divisible_by, tp)
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            sd = hf_to_megatron(hf_sd, hf_config, tp_rank, tp, pp_rank, pp, padded,
                                layernorm_style=layernorm_style)
            if dtype:
                sd = {k: v.to(_DTYPES[dtype]) for k, v in sd.items()}
            sd = {k: v.contiguous().clone() for k, v in sd.items()}
            path = shard_file(out_dir, tp_rank, pp_rank, pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({"model": sd, "checkpoint_version": 3.0}, path)
            log(f"wrote {path}")
    meta = {"tensor_parallel": tp, "pipeline_parallel": pp, "vocab_size": dims.vocab, "padded_vocab_size": padded,
            "make_vocab_divisible_by": make_vocab_divisible_by, "layernorm_style": layernorm_style,
            "model": mcfg, "source": os.path.abspath(hf_dir)}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    _copy_side_files(hf_dir, os.path.join(out_dir, HF_META_DIR))
    snippet = model_yaml(mcfg, os.path.abspath(hf_dir))
    with open(os.path.join(out_dir, MODEL_YAML), "w") as f:
        f.write(snippet)
    log(f"the model.* keys of a run config for this checkpoint (also in {os.path.join(out_dir, MODEL_YAML)}; "
        f"the trainer checks them against config.json):\n{snippet}")
    return meta


def model_yaml(fields: Dict, hf_dir: str) -> str:
    """The ``model:`` section of a run config for an HF checkpoint: ``model_config_from_hf``'s fields, with
    ``tokenizer`` and ``hf_path`` at the directory (a YAML file that ``load_config`` reads as it is)."""
    import yaml

    return yaml.safe_dump({"model": {**fields, "tokenizer": hf_dir, "hf_path": hf_dir}}, sort_keys=False)


def convert_megatron_dir_to_hf(megatron_dir: str, out_dir: str, hf_config_dir: Optional[str] = None,
                               dtype: Optional[str] = None, log=print) -> Dict[str, torch.Tensor]:
    meta_path = os.path.join(megatron_dir, META_FILE)
    if not os.path.isfile(meta_path):
        raise ConversionError(f"{meta_path} not found: --megatron must be a directory written by "
                              "`megaprorl convert hf-to-megatron`")
    with open(meta_path) as f:
        meta = json.load(f)
    cfg_dir = hf_config_dir or os.path.join(megatron_dir, HF_META_DIR)
    hf_config = load_hf_config(cfg_dir)
    tp, pp = int(meta["tensor_parallel"]), int(meta["pipeline_parallel"])
    stages = []
    for pp_rank in range(pp):
        shards = []
        for tp_rank in range(tp):
            path = shard_file(megatron_dir, tp_rank, pp_rank, pp)
            if not os.path.isfile(path):
                raise ConversionError(f"missing Megatron shard {path} (tp={tp}, pp={pp} per {meta_path})")
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if "model" not in blob:
                raise ConversionError(f"{path} has no 'model' entry")
            shards.append(blob["model"])
        stages.append(shards)
    hf_sd = megatron_stages_to_hf(stages, hf_config)
    if dtype:
        if dtype not in _DTYPES:
            raise ConversionError(f"--dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        hf_sd = {k: v.to(_DTYPES[dtype]) for k, v in hf_sd.items()}
    _copy_side_files(cfg_dir, out_dir)
    files = save_hf_state_dict(hf_sd, out_dir)
    log(f"wrote {', '.join(os.path.join(out_dir, n) for n in files)}")
    return hf_sd


USAGE = """megaprorl convert hf-to-megatron --hf HF_DIR --out DIR [--tp N] [--pp M]
                  [--make-vocab-divisible-by 128] [--layernorm-names local|te] [--dtype fp32|bf16|fp16]
megaprorl convert megatron-to-hf --megatron DIR --out HF_DIR [--hf-config HF_DIR] [--dtype ...]
megaprorl convert checkpoint-to-hf --checkpoint RUN_DIR|CKPT_DIR --out HF_DIR [--hf-config HF_DIR]
                  [--which policy|reference] [--dtype ...] [--tp N] [--pp M]

Qwen2 / Qwen3 / Qwen3-MoE / Qwen2-MoE / Llama / Mistral families. hf-to-megatron writes
DIR/mp_rank_TT[_PPP]/model_optim_rng.pt per (TP rank, PP stage), DIR/megaprorl_convert.json (the model.* config to
train with) and DIR/hf/ (config and tokenizer files). checkpoint-to-hf writes a trained policy (or its reference)
from a megaprorl training checkpoint as an HF directory. Inside a running job,
megaprorl.models.convert.load_hf_into_model shards an HF directory on the fly (no conversion step needed)."""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    direction, rest = argv[0], argv[1:]
    if direction == "hf-to-megatron":
        p = argparse.ArgumentParser(prog="megaprorl convert hf-to-megatron")
        p.add_argument("--hf", required=True, help="local HF model directory")
        p.add_argument("--out", required=True)
        p.add_argument("--tp", type=int, default=1)
        p.add_argument("--pp", type=int, default=1)
        p.add_argument("--make-vocab-divisible-by", type=int, default=128)
        p.add_argument("--layernorm-names", choices=sorted(_LAYERNORM_NAMES), default="local",
                       help="local spec (input_layernorm) or TransformerEngine spec (linear_qkv.layer_norm_weight)")
        p.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
        a = p.parse_args(rest)
        run = lambda: convert_hf_to_megatron_dir(a.hf, a.out, a.tp, a.pp, a.make_vocab_divisible_by,  # noqa: E731
                                                 a.layernorm_names, a.dtype)
    elif direction == "megatron-to-hf":
        p = argparse.ArgumentParser(prog="megaprorl convert megatron-to-hf")
        p.add_argument("--megatron", required=True, help="directory written by hf-to-megatron")
        p.add_argument("--out", required=True)
        p.add_argument("--hf-config", default=None, help="HF directory with config.json (default: MEGATRON/hf)")
        p.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
        a = p.parse_args(rest)
        run = lambda: convert_megatron_dir_to_hf(a.megatron, a.out, a.hf_config, a.dtype)  # noqa: E731
    elif direction == "checkpoint-to-hf":
        from .. import export

        p = argparse.ArgumentParser(prog="megaprorl convert checkpoint-to-hf",
                                    description="Write a megaprorl checkpoint's policy (or reference) as an HF model.")
        export.add_arguments(p)
        a = p.parse_args(rest)
        run = lambda: export.export_checkpoint_to_hf(a.checkpoint, a.out, a.hf_config, a.which,  # noqa: E731
                                                     a.dtype, a.tp, a.pp)
    else:
        import difflib

        near = difflib.get_close_matches(direction, ["hf-to-megatron", "megatron-to-hf", "checkpoint-to-hf"], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        print(f"megaprorl convert: unknown direction {direction!r}{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        run()
    except ConversionError as e:
        print(f"megaprorl convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
