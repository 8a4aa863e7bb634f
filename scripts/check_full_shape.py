"""Full-size load check on CPU: a model of a published config.json with random weights (no model hub here),
written by transformers, loaded into the Megatron policy the trainer builds (fp32, TP=1) after the trainer's
check of model.* against config.json, and compared with transformers' logits on a few sequences; then written
back with save_megatron_as_hf and compared tensor by tensor with the original files.

    PYTHONPATH=. python3 scripts/check_full_shape.py [--model r1-distill-1.5b|llama-3.2-1b|qwen3-0.6b]
                                                     [--workdir DIR]
                                                     [--tokens 64]

r1-distill-1.5b: DeepSeek-R1-Distill-Qwen-1.5B (Qwen2) with examples/prorl_v2.yaml's model.* keys.
llama-3.2-1b: Llama-3.2-1B (tied embeddings, llama3 RoPE scaling with factor 32) with the model.* keys that
model_config_from_hf gives, as a run config would spell them.  qwen3-0.6b: Qwen3-0.6B (head_dim 128 with
hidden 1024 / 16 heads, q/k norms, tied), the same way.  About 7 GB of disk (fp32 safetensors, twice)
and up to 23 GB of memory.  Prints the figures recorded in docs/convert.md.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_config_files import LLAMA_3P2_1B, QWEN3_0P6B, R1_DISTILL_1P5B  # noqa: E402  published config.json files

MODELS = {"r1-distill-1.5b": (R1_DISTILL_1P5B, "Qwen2Config"),
          "llama-3.2-1b": (LLAMA_3P2_1B, "LlamaConfig"),
          "qwen3-0.6b": (QWEN3_0P6B, "Qwen3Config")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(MODELS), default="r1-distill-1.5b")
    p.add_argument("--workdir", default="")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rows", type=int, default=2)
    a = p.parse_args()
    import transformers

    from megaprorl.config import load_config
    from megaprorl.models.convert import (check_model_config, hf_vocab_size, load_hf_config, load_hf_into_model,
                                          load_hf_state_dict, model_config_from_hf, save_megatron_as_hf)
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    published, config_class = MODELS[a.model]
    work = a.workdir or tempfile.mkdtemp(prefix=f"{a.model}_")
    hf_dir, back_dir = os.path.join(work, "hf"), os.path.join(work, "back")
    t = time.time()
    if os.path.exists(os.path.join(hf_dir, "config.json")):  # a --workdir of an earlier run
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                               dtype=torch.float32)
    else:
        torch.manual_seed(0)
        hf_cfg = getattr(transformers, config_class)(**{k: v for k, v in published.items() if k != "architectures"})
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32)
        hf.save_pretrained(hf_dir)
    hf.eval()
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"HF model: {n_params / 1e9:.3f} B parameters, ready in {time.time() - t:.0f} s at {hf_dir}")

    arch = []  # the R1 example spells out its model.* keys; for Llama they are written as a user would
    if a.model != "r1-distill-1.5b":
        arch = [f"model.{k}={v}" for k, v in model_config_from_hf(published).items() if k != "params_dtype"]
    cfg = load_config("examples/prorl_v2.yaml", [f"model.hf_path={hf_dir}", f"model.tokenizer={hf_dir}",
                                                 "model.params_dtype=fp32", "model.transformer_impl=local",
                                                 "model.recompute_granularity=''", *arch])
    hf_config = load_hf_config(hf_dir)
    check_model_config(cfg.model, hf_config, hf_dir)
    info = init_distributed()
    t = time.time()
    pol = Policy(cfg.model, cfg.parallel, cfg.train.optim, hf_vocab_size(hf_config), info.device, "torch",
                 trainable=False)
    emb = pol.model.embedding.word_embeddings.weight.shape
    counts = load_hf_into_model(pol.model, hf_dir, hf_config)
    print(f"Megatron policy built and loaded in {time.time() - t:.0f} s: {counts['tensors']} tensors, "
          f"{counts['params'] / 1e9:.3f} B values; embedding {tuple(emb)} (vocab {hf_config.vocab_size}, "
          f"padded to a multiple of model.make_vocab_divisible_by={cfg.model.make_vocab_divisible_by})")

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, hf_config.vocab_size, (a.rows, a.tokens), generator=g)
    t = time.time()
    with torch.no_grad():
        want = hf(tokens).logits.float()
        pos = torch.arange(a.tokens)[None].expand(a.rows, -1)
        got = pol.model(tokens, pos, None)[..., : hf_config.vocab_size].float()
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"logits [{a.rows}, {a.tokens}, {hf_config.vocab_size}]: max |Megatron - HF| = {diff:.2e} "
          f"(max |logit| {scale:.2f}), {time.time() - t:.0f} s for both forwards")

    del hf, want, got  # room for the two state dicts compared below
    t = time.time()
    save_megatron_as_hf(pol.model, hf_config, back_dir, hf_dir=hf_dir)
    orig, back = load_hf_state_dict(hf_dir), load_hf_state_dict(back_dir)
    same = set(orig) == set(back) and all(torch.equal(orig[k], back[k]) for k in orig)
    print(f"written back as HF in {time.time() - t:.0f} s: {len(back)} tensors, bit-identical to the original: {same}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"model": a.model, "params_b": n_params / 1e9, "max_abs_logit_diff": diff, "round_trip_bit_exact": same,
                      "peak_rss_gb": round(peak, 1)}))
    return 0 if same and diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
