"""Build a Megatron-core GPTModel of the Qwen2 / Qwen3 / Llama shape from the model config."""

from __future__ import annotations

import dataclasses

import torch

from ..parallel import compat

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(mcfg, pcfg, routing_replay: bool = False):
    """megatron.core TransformerConfig for the Qwen2 / Qwen3 / Llama families (RoPE, RMSNorm, SwiGLU, GQA;
    QKV bias for Qwen2; per-head q/k RMSNorm and a free head_dim for Qwen3)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if mcfg.params_dtype not in _DTYPES:
        raise ValueError(f"model.params_dtype must be one of {list(_DTYPES)}, got {mcfg.params_dtype!r}")
    dtype = _DTYPES[mcfg.params_dtype]
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=mcfg.num_layers,
        hidden_size=mcfg.hidden_size,
        ffn_hidden_size=mcfg.ffn_hidden_size,
        num_attention_heads=mcfg.num_attention_heads,
        num_query_groups=mcfg.num_query_groups or mcfg.num_attention_heads,
        kv_channels=head_dim(mcfg),
        qk_layernorm=bool(getattr(mcfg, "qk_norm", False)),
        normalization="RMSNorm",
        layernorm_epsilon=mcfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=mcfg.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        init_method_std=mcfg.init_std,
        tensor_model_parallel_size=pcfg.tensor_parallel,
        pipeline_model_parallel_size=pcfg.pipeline_parallel,
        sequence_parallel=bool(pcfg.sequence_parallel and pcfg.tensor_parallel > 1),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        recompute_granularity=mcfg.recompute_granularity or None,
        recompute_method="uniform" if mcfg.recompute_granularity == "full" else None,
        recompute_num_layers=1 if mcfg.recompute_granularity == "full" else None,
        calculate_per_token_loss=True,
    )
    experts = num_experts(mcfg)
    if experts:
        # Qwen3-MoE's router: softmax over the experts, top-k, renormalised when norm_topk_prob (Megatron's
        # default, a softmax over the k chosen logits, is the same) else not (pre-softmax: the full softmax's
        # k values).  The experts are spread over the ranks of a tensor-parallel group (parallel.expert_parallel,
        # each expert split over the TP / EP ranks that hold it), whose ranks see the same tokens: the all-gather
        # dispatcher (over that group); at TP = 1 over EP data-parallel replicas, whose ranks hold different
        # tokens: the all-to-all dispatcher (each token to its experts' ranks).  No load-balancing loss in RL.  The router's logits in fp32 (Megatron's advice for stable routing; HF's
        # softmax is in fp32 too): a bf16 policy's routing flips less often on rounding (near-ties still can)
        kwargs.update(num_moe_experts=experts, moe_router_topk=int(mcfg.moe_topk), moe_router_dtype="fp32",
                      moe_ffn_hidden_size=int(mcfg.moe_ffn_hidden_size or mcfg.ffn_hidden_size),
                      moe_router_pre_softmax=not bool(mcfg.moe_norm_topk_prob),
                      moe_token_dispatcher_type="alltoall" if experts_across_replicas(pcfg) else "allgather",
                      moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_grouped_gemm=False,
                      expert_model_parallel_size=expert_parallel(pcfg),
                      expert_tensor_parallel_size=max(1, pcfg.tensor_parallel // expert_parallel(pcfg)))
        if routing_replay:  # each router can record its top-k and replay given ones (Megatron's RouterReplay)
            kwargs.update(moe_enable_routing_replay=True)
        shared = int(getattr(mcfg, "moe_shared_expert_ffn_hidden_size", 0) or 0)
        if shared:  # Qwen2-MoE's shared expert: a SwiGLU MLP beside the routed ones, scaled by sigmoid(gate . x)
            kwargs.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
    if mcfg.fp8:
        _require_te("model.fp8")
        kwargs.update(fp8=mcfg.fp8, fp8_recipe=mcfg.fp8_recipe)
    if not on_gpu:
        kwargs.update(attention_backend=_local_attention_backend())
    if "cuda_graph_scope" in {f.name for f in dataclasses.fields(TransformerConfig)}:
        # Megatron 0.16's default, "full", is deprecated by Megatron itself (a warning per config) for its
        # equivalent, the empty list: the whole layer when CUDA graphs are on (they are not here)
        kwargs.update(cuda_graph_scope=[])
    return TransformerConfig(**kwargs)


def _moe_without_te() -> None:
    """megatron-core 0.16's moe_utils binds TransformerEngine's fused MoE functions (``te_general_gemm``,
    ``fused_permute``...) only when TE imports, but its router tests ``te_general_gemm is not None``: without TE
    the router raises NameError.  Bind the missing names to None, as the code expects."""
    from megatron.core.transformer.moe import moe_utils

    for name in ("te_general_gemm", "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                 "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
                 "fused_topk_with_score_function", "fused_unpermute"):
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def _experts_apart(model) -> None:
    """Mark the routed experts' weights as Megatron marks them under expert parallelism (``allreduce`` False):
    its DDP keeps them in their own buffers, reduced over the expert data-parallel group, and its optimizer in
    a second optimizer of the chain, with the gradient norm over the expert model-parallel group.  Megatron
    marks them only when expert_parallel > 1; marking them at every layout gives the optimizer one structure,
    so that its checkpoint written at one expert-parallel size loads at another (at EP = 1 the expert groups
    are the dense ones, so nothing is reduced differently)."""
    for name, p in model.named_parameters():
        if ".mlp.experts." in f".{name}":
            p.allreduce = False


def expert_parallel(pcfg) -> int:
    """Ranks of a tensor-parallel group that the experts are spread over (``parallel.expert_parallel``)."""
    return int(getattr(pcfg, "expert_parallel", 1) or 1)


def experts_across_replicas(pcfg) -> bool:
    """True when the experts are spread over data-parallel replicas (``parallel.expert_parallel`` > 1 at
    ``parallel.tensor_parallel`` = 1) instead of over the ranks of a tensor-parallel group."""
    return expert_parallel(pcfg) > 1 and int(pcfg.tensor_parallel) == 1


def num_experts(mcfg) -> int:
    """Routed experts per MoE layer (``model.num_experts``; 0: a dense model)."""
    return int(getattr(mcfg, "num_experts", 0) or 0)


def head_dim(mcfg) -> int:
    """Channels per attention head: ``model.head_dim``, or hidden_size / num_attention_heads when it is 0."""
    return int(getattr(mcfg, "head_dim", 0) or mcfg.hidden_size // mcfg.num_attention_heads)


def _local_attention_backend():
    from megatron.core.transformer.enums import AttnBackend

    return AttnBackend.local


def _require_te(what: str):
    try:
        import transformer_engine  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"{what} needs TransformerEngine: install it with `pip install -e .[gpu]` "
                           "(transformer-engine[pytorch]) on a CUDA machine") from e


def use_transformer_engine(mcfg) -> bool:
    impl = mcfg.transformer_impl
    if impl == "local":
        return False
    if impl == "transformer_engine":
        _require_te("model.transformer_impl=transformer_engine")
        return True
    if impl == "auto":
        if not torch.cuda.is_available():
            return False
        try:
            import transformer_engine  # noqa: F401
            return True
        except ImportError:
            return False
    raise ValueError(f"model.transformer_impl must be local, transformer_engine or auto, got {impl!r}")


def describe(mcfg, pcfg, model) -> str:
    """One line on what a policy runs: parameters, layer spec and why, attention, dtype, layout, device."""
    n = sum(p.numel() for p in model.parameters())
    where = "" if pcfg.tensor_parallel * pcfg.pipeline_parallel == 1 else " on this rank's shard"
    if use_transformer_engine(mcfg):
        spec = "TransformerEngine layer spec" + (f", FP8 {mcfg.fp8} ({mcfg.fp8_recipe})" if mcfg.fp8 else "")
    else:
        why = {"local": "model.transformer_impl=local"}.get(
            mcfg.transformer_impl, "no CUDA" if not torch.cuda.is_available() else "TransformerEngine is not installed")
        spec = f"local layer spec ({why}), attention {getattr(mcfg, 'attention', 'sdpa')}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if num_experts(mcfg):
        spec += f", MoE: {num_experts(mcfg)} experts, {mcfg.moe_topk} per token"
        if getattr(mcfg, "moe_shared_expert_ffn_hidden_size", 0):
            spec += ", a shared expert"
    return (f"policy: {n / 1e6:.2f}M parameters{where}, {spec}, {mcfg.params_dtype}, "
            f"TP={pcfg.tensor_parallel} PP={pcfg.pipeline_parallel}, {device}")


def build_gpt(mcfg, pcfg, vocab_size: int, pre_process=None, post_process=None, routing_replay: bool = False):
    """A GPTModel for this rank's pipeline stage. ``vocab_size`` is the (unpadded) tokenizer size.  ``routing_replay``
    (an MoE model): its routers record and replay top-k choices (``policy.RoutingReplay``)."""
    compat.install()
    from . import rope

    rope.install()  # packed sequences: RoPE without a per-sequence loop
    from megatron.core import parallel_state as mps
    from megatron.core.models.gpt import GPTModel

    cfg = transformer_config(mcfg, pcfg, routing_replay=routing_replay)
    if num_experts(mcfg):
        _moe_without_te()
    if use_transformer_engine(mcfg):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts(mcfg) or None,
                                                          moe_grouped_gemm=False, qk_layernorm=cfg.qk_layernorm)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(num_experts=num_experts(mcfg) or None, moe_grouped_gemm=False,
                                        normalization="RMSNorm", qk_layernorm=cfg.qk_layernorm)
        if getattr(mcfg, "attention", "sdpa") == "sdpa":
            from .attention import SDPAttention

            spec.submodules.self_attention.submodules.core_attention = SDPAttention
        elif mcfg.attention != "megatron":
            raise ValueError(f"model.attention must be 'sdpa' or 'megatron', got {mcfg.attention!r}")
        # torch norms that support sequence parallelism (Megatron's WrappedTorchNorm refuses it), for the
        # layers and the final norm (which the block takes from its submodules, not from the layer spec)
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

        from .norm import TorchNorm

        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = TorchNorm
        if cfg.qk_layernorm:  # per head (hidden_size = head_dim); finalize_model_grads sums their grads over TP
            att = spec.submodules.self_attention.submodules
            att.q_layernorm = att.k_layernorm = TorchNorm
        spec = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(cfg), layer_norm=TorchNorm)
    padded = padded_vocab_size(vocab_size, mcfg.make_vocab_divisible_by, pcfg.tensor_parallel)
    if pre_process is None:
        pre_process = mps.is_pipeline_first_stage()
    if post_process is None:
        post_process = mps.is_pipeline_last_stage()
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=padded,
        max_sequence_length=mcfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=mcfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(mcfg.rotary_base),
    )
    rope.scale_rope(model, rope.rope_scaling_spec(getattr(mcfg, "rope_scaling", None)), base=float(mcfg.rotary_base))
    # one dtype for every parameter (TorchNorm is created in params_dtype, as TE's norms are; this catches
    # any other module that is not) keeps Megatron's optimizer on a single grad buffer (its distributed
    # optimizer's checkpoint gather mis-sizes shards across mixed buffers)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != cfg.params_dtype:
                p.data = p.data.to(cfg.params_dtype)
    _experts_apart(model)
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def needs_explicit_causal_mask(mcfg) -> bool:
    """Megatron's local DotProductAttention needs a boolean mask; SDPA and TE run causal without one."""
    return not use_transformer_engine(mcfg) and getattr(mcfg, "attention", "sdpa") == "megatron"


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = max(1, divisible_by) * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple
