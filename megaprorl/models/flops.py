"""Model FLOPs of the policy's passes, for throughput and MFU (`megaprorl bench step` and the trainer's `perf/*`).

A shape is a dict of the model's sizes (``hidden_size``, ``ffn_hidden_size``, ``num_layers``,
``num_attention_heads``, ``num_query_groups``, ``vocab`` and optionally ``head_dim``, ``add_qkv_bias``,
``qk_norm``, ``tie_embeddings``, ``num_experts``, ``moe_topk``, ``moe_ffn_hidden_size``,
``moe_shared_expert_ffn_hidden_size``): the bench's presets, or ``shape_of`` a run's ``model`` config.  The
counts are model FLOPs (what the model needs, not what recomputation or padding spend), so MFU shows those
costs as a lower figure.
"""

from __future__ import annotations

from typing import Iterable

# Dense bf16 tensor-core peaks (no sparsity), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}

_SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
               "add_qkv_bias", "qk_norm", "tie_embeddings", "num_experts", "moe_topk", "moe_ffn_hidden_size",
               "moe_shared_expert_ffn_hidden_size")


def shape_of(model_cfg, vocab: int) -> dict:
    """The shape of a ``model`` config (``megaprorl.config.ModelConfig``) with ``vocab`` output rows."""
    p = {k: getattr(model_cfg, k) for k in _SHAPE_KEYS if hasattr(model_cfg, k)}
    if p.get("num_experts") and not p.get("moe_ffn_hidden_size"):
        p["moe_ffn_hidden_size"] = p["ffn_hidden_size"]  # the config's 0: the dense width
    return {**p, "vocab": int(vocab)}


def _head_dim(p: dict) -> int:
    return p.get("head_dim") or p["hidden_size"] // p["num_attention_heads"]


def param_count(p: dict, active: bool = False) -> int:
    """Parameters of a shape (the embedding once when tied); ``active``: an MoE model's per token (the router,
    ``moe_topk`` of its experts and the shared expert with its gate)."""
    h, f, L, V, hd = p["hidden_size"], p["ffn_hidden_size"], p["num_layers"], p["vocab"], _head_dim(p)
    q, kv = hd * p["num_attention_heads"], hd * p["num_query_groups"]
    experts = p.get("num_experts", 0)
    mlp = 3 * h * f
    if experts:
        mlp = (p["moe_topk"] if active else experts) * 3 * h * p["moe_ffn_hidden_size"] + experts * h
        shared = p.get("moe_shared_expert_ffn_hidden_size", 0)
        mlp += (3 * h * shared + h) if shared else 0
    per_layer = h * (q + 2 * kv) + q * h + mlp + 2 * h
    per_layer += (q + 2 * kv) * p.get("add_qkv_bias", True) + 2 * hd * p.get("qk_norm", False)
    return L * per_layer + (1 if p.get("tie_embeddings", False) else 2) * V * h + h


def train_flops_per_token(p: dict, seq_len: int) -> float:
    """Forward and backward FLOPs per token of a sequence of ``seq_len`` tokens: 6 x (the matmul parameters a
    token goes through: the layers, an MoE layer's active experts and router, and the LM head, a tied one too;
    not the embedding lookup) plus attention (causal: 6 * L * s * heads * head_dim per token for fwd+bwd of
    QK^T and AV, halved by causality).  A forward alone is a third of it."""
    matmul = param_count(p, active=True) - (0 if p.get("tie_embeddings", False) else p["vocab"] * p["hidden_size"])
    return 6.0 * matmul + 6.0 * p["num_layers"] * seq_len * p["num_attention_heads"] * _head_dim(p)


def train_flops(p: dict, seq_lens: Iterable[int]) -> float:
    """Forward and backward FLOPs of one pass over sequences of these lengths (each attends only to itself, as
    packed or unpadded; a forward alone is a third of it)."""
    return sum(s * train_flops_per_token(p, s) for s in seq_lens)


def peak_tflops(device_name: str, override: float = 0.0) -> float:
    """``override`` when set, else the dense bf16 peak of a device named like one of ``PEAK_TFLOPS`` (0: unknown)."""
    if override:
        return override
    for k, v in PEAK_TFLOPS.items():
        if k in device_name:
            return v
    return 0.0
