"""Configs of the tiny Megatron policy that the CPU tests build (2 layers, hidden 64, GQA, SDPA)."""

from types import SimpleNamespace


def tiny_policy_cfgs(**model_overrides):
    """(model, parallel, optim) namespaces for ``megaprorl.policy.Policy`` on one CPU rank."""
    m = SimpleNamespace(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                        norm_epsilon=1e-6, add_qkv_bias=True, init_std=0.05, params_dtype="fp32",
                        recompute_granularity="", fp8="", fp8_recipe="", transformer_impl="local", attention="sdpa",
                        make_vocab_divisible_by=8, max_position_embeddings=64, tie_embeddings=False, rotary_base=10000)
    for k, v in model_overrides.items():
        setattr(m, k, v)
    p = SimpleNamespace(tensor_parallel=1, pipeline_parallel=1, sequence_parallel=False)
    o = SimpleNamespace(lr=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.0, grad_clip=1.0)
    return m, p, o


def tiny_policy(model_overrides=None, **policy_kwargs):
    """A seeded tiny ``Policy`` (torch kernels) on this process's single rank, and its char tokenizer."""
    import torch

    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    info = init_distributed()
    torch.manual_seed(0)
    m, p, o = tiny_policy_cfgs(**(model_overrides or {}))
    tok = CharTokenizer()
    policy_kwargs.setdefault("pad_id", tok.pad_id)
    return Policy(m, p, o, tok.vocab_size, info.device, "torch", **policy_kwargs), tok


def randomize_hf_params(model, scale: float = 0.05):
    """Make every tensor of an HF model non-trivial (norms near 1, biases and weights random), in place."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model
