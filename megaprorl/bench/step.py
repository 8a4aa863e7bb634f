"""`megaprorl bench step`: one RL step's time broken down, with tokens/s and MFU.

Builds a random policy of a named shape (``--preset tiny`` for CPU, ``qwen2-1.5b`` for the
DeepSeek-R1-Distill-Qwen-1.5B shape, ``qwen3-30b-a3b`` / ``qwen3-30b-a3b-8l`` for Qwen3-30B-A3B's mixture of
experts, whose FLOPs and MFU count the active parameters), draws random prompts, and times, on whatever machine it runs:
rollout (the embedded engine, or ``--engine trtllm``), reward (a trivial verifier, so the number is the
pool's overhead), the old-policy and reference log-prob passes, the optimizer update, and the weight sync.
``--skip-rollout`` times only the trainer side on sequences of ``--prompt-len + --response-len``
random tokens (the 8K training throughput without an 8K decode).  Prints a table and writes JSON.

Under torchrun, ``--tp`` / ``--pp`` lay the policy out over tensor and pipeline parallel ranks and the
rest of the world is data parallel: each data-parallel rank draws its own prompts, tokens/s counts
all of them, and MFU is per GPU (all ranks' FLOPs over the world's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from types import SimpleNamespace

import torch

from ..kernels import GRAD_MODES
from ..models.flops import param_count, peak_tflops, train_flops

_QWEN3 = dict(head_dim=128, qk_norm=True, add_qkv_bias=False, tie_embeddings=True)
_QWEN3_30B_A3B = dict(hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32, num_query_groups=4, vocab=151936,
                      head_dim=128, qk_norm=True, add_qkv_bias=False, tie_embeddings=False, num_experts=128,
                      moe_topk=8, moe_ffn_hidden_size=768)
PRESETS = {
    "tiny": dict(num_layers=2, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                 vocab=64),
    # the Qwen3 shape at the tiny size (head_dim 64 = 2 x hidden / heads), for CPU runs of the bench itself
    "tiny-qwen3": dict(num_layers=2, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                       vocab=64, head_dim=64, qk_norm=True, add_qkv_bias=False, tie_embeddings=True),
    "qwen2-0.5b": dict(num_layers=24, hidden_size=896, ffn_hidden_size=4864, num_attention_heads=14,
                       num_query_groups=2, vocab=151936),
    "qwen2-1.5b": dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                       num_query_groups=2, vocab=151936),
    "qwen2-7b": dict(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                     num_query_groups=4, vocab=152064),
    # Qwen3: head_dim 128 whatever the width, per-head q/k RMSNorm, no QKV bias, tied below 8B
    "qwen3-0.6b": dict(num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
                       num_query_groups=8, vocab=151936, **_QWEN3),
    "qwen3-1.7b": dict(num_layers=28, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16,
                       num_query_groups=8, vocab=151936, **_QWEN3),
    "qwen3-4b": dict(num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32,
                     num_query_groups=8, vocab=151936, **_QWEN3),
    # mixture of experts (model.num_experts): a CPU-size one, and Qwen3-30B-A3B (128 experts, 8 per token; untied;
    # 30.5B parameters, 3.3B active) and its first 8 layers (one GPU)
    "tiny-moe": dict(num_layers=2, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                     vocab=64, head_dim=32, qk_norm=True, add_qkv_bias=False, num_experts=4, moe_topk=2,
                     moe_ffn_hidden_size=64),
    "qwen3-30b-a3b": dict(num_layers=48, **_QWEN3_30B_A3B),
    "qwen3-30b-a3b-8l": dict(num_layers=8, **_QWEN3_30B_A3B),
}

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megaprorl bench step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--response-len", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--pack-tokens", type=int, default=0,
                    help="> 0: pack sequences into micro-batches of at most this many tokens (train.pack_tokens)")
    ap.add_argument("--ragged", action="store_true",
                    help="with --skip-rollout: response lengths uniform in [1, --response-len] (as real rollouts)")
    ap.add_argument("--dtype", default="", help="fp32 | bf16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--loss-grad-mode", default="inplace", choices=GRAD_MODES,
                    help="train.loss_grad_mode (Triton loss)")
    ap.add_argument("--fused-lm-head", action="store_true", help="train.fused_lm_head: no [T, V] logits")
    ap.add_argument("--recompute", default="", help="'' | selective | full")
    ap.add_argument("--transformer-impl", default="auto", choices=("auto", "local", "transformer_engine"),
                    help="layer spec (model.transformer_impl; auto = TE when installed on a GPU)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (parallel.tensor_parallel)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (parallel.pipeline_parallel)")
    ap.add_argument("--sequence-parallel", action="store_true", help="parallel.sequence_parallel (with --tp > 1)")
    ap.add_argument("--ep", type=int, default=1,
                    help="an MoE preset: its experts spread over this many ranks of each TP group "
                         "(parallel.expert_parallel; divides --tp)")
    ap.add_argument("--distributed-optimizer", action="store_true",
                    help="train.optim.distributed_optimizer (Megatron's ZeRO-1; one GPU = one shard)")
    ap.add_argument("--fp8", default="", choices=("", "e4m3", "hybrid"),
                    help="model.fp8 (needs TransformerEngine); the delayed-scaling recipe")
    ap.add_argument("--skip-rollout", action="store_true", help="time only log-prob passes and the update")
    ap.add_argument("--engine", default="megatron", choices=("megatron", "trtllm"),
                    help="rollout.engine: the embedded engine, or TensorRT-LLM refit in place (needs tensorrt-llm, "
                         "ray and a GPU; weight_sync is then the refit)")
    ap.add_argument("--trtllm-bucket-mb", type=float, default=1024, help="rollout.trtllm_bucket_mb")
    ap.add_argument("--trtllm-kv-cache-fraction", type=float, default=0.3, help="rollout.trtllm_kv_cache_fraction")
    ap.add_argument("--trtllm-sleep", action=argparse.BooleanOptionalAction, default=True,
                    help="rollout.trtllm_sleep: the engine releases its memory while the trainer runs")
    ap.add_argument("--rollout-batch-size", type=int, default=0,
                    help="rows the engine decodes together (rollout.batch_size; 0: every rollout of the step at once)")
    ap.add_argument("--lock-step", action="store_true", help="rollout.continuous_batching=false")
    ap.add_argument("--decode-attention", default="sdpa", choices=("sdpa", "triton"),
                    help="rollout.decode_attention: the lean decode step's attention over the KV cache")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="rollout.cuda_graphs: replay each KV cache's decode step as a CUDA graph (needs "
                         "--decode-attention triton and a GPU)")
    ap.add_argument("--stop-rate", type=float, default=0.0,
                    help="make that share of the vocabulary stop tokens, so that the random policy's responses end "
                         "at about that rate per token and spread over the budget as RL responses do (0: only "
                         "token 1, which a random policy of a large vocabulary almost never draws)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--offload", action="store_true",
                    help="train.offload_optimizer and train.offload_reference: the optimizer's state, gradients and "
                         "the reference's weights in host memory outside the update and the reference's pass")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--out", default="bench_step.json")
    args = ap.parse_args(argv)

    from ..algo.loss import LossSpec, aggregation_weights
    from ..config import ConfigError
    from ..models.gpt import use_transformer_engine
    from ..parallel import dp_rank, init_distributed
    from ..policy import Policy, build_seq_batch
    from ..rollout import SamplingParams
    from ..rollout.megatron_engine import MegatronEngine
    from ..rollout.trtllm_engine import TrtllmUnavailable

    if args.ep > 1 and args.tp % args.ep:
        raise SystemExit(f"error: --ep ({args.ep}) must divide --tp ({args.tp}): the experts are spread over the "
                         "ranks of a tensor-parallel group")
    info = init_distributed(args.tp, args.pp, expert_parallel=args.ep)
    on_gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    p = PRESETS[args.preset]
    seq_len = args.prompt_len + args.response_len
    mcfg = SimpleNamespace(num_layers=p["num_layers"], hidden_size=p["hidden_size"],
                           ffn_hidden_size=p["ffn_hidden_size"], num_attention_heads=p["num_attention_heads"],
                           num_query_groups=p["num_query_groups"], head_dim=p.get("head_dim", 0),
                           qk_norm=p.get("qk_norm", False), max_position_embeddings=max(seq_len, 64),
                           rotary_base=1e6, norm_epsilon=1e-6, add_qkv_bias=p.get("add_qkv_bias", True),
                           tie_embeddings=p.get("tie_embeddings", False),
                           num_experts=p.get("num_experts", 0), moe_topk=p.get("moe_topk", 0),
                           moe_ffn_hidden_size=p.get("moe_ffn_hidden_size", 0), moe_norm_topk_prob=True,
                           init_std=0.02, params_dtype=dtype, make_vocab_divisible_by=128,
                           transformer_impl=args.transformer_impl, fp8=args.fp8, fp8_recipe="delayed",
                           recompute_granularity=args.recompute)
    if args.ep > 1 and (not p.get("num_experts") or p["num_experts"] % args.ep):
        raise SystemExit(f"error: --ep {args.ep} needs an MoE preset whose experts it divides ({args.preset}: "
                         f"{p.get('num_experts', 0)} experts)")
    if p.get("num_experts") and args.tp > 1 and not args.sequence_parallel:
        raise SystemExit(f"error: the {args.preset} preset is an MoE model: at --tp > 1 it needs --sequence-parallel "
                         "(Megatron's MoE layer trains under tensor parallelism only with it)")
    pcfg = SimpleNamespace(tensor_parallel=args.tp, pipeline_parallel=args.pp, sequence_parallel=args.sequence_parallel,
                           expert_parallel=args.ep)
    ocfg = SimpleNamespace(lr=1e-6, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, grad_clip=1.0,
                           distributed_optimizer=args.distributed_optimizer)
    packing = dict(pack_tokens=args.pack_tokens, pad_id=0, fused_lm_head=args.fused_lm_head, offload=args.offload)
    policy = Policy(mcfg, pcfg, ocfg, p["vocab"], info.device, args.kernel_backend,
                    loss_grad_mode=args.loss_grad_mode, **packing)
    reference = None if args.no_reference else Policy(mcfg, pcfg, ocfg, p["vocab"], info.device, args.kernel_backend,
                                                       trainable=False, **packing)
    held = [q for q in (policy, reference) if q is not None]
    for q in held:  # (before the engine starts, as in the trainer)
        q.offload()
    eos = 1
    if not 0.0 <= args.stop_rate < 1.0:
        raise SystemExit(f"--stop-rate must be in [0, 1), got {args.stop_rate}")
    stops = range(2, 2 + int(args.stop_rate * p["vocab"]))
    rows = args.rollout_batch_size or args.prompts * args.n_samples
    try:
        if args.engine == "trtllm":
            from ..rollout.trtllm_engine import start_trtllm_engine

            engine = start_trtllm_engine(policy, mcfg, os.path.abspath(args.out) + ".trtllm_hf", [eos, *stops], eos,
                                         0, rows, args.trtllm_kv_cache_fraction, args.trtllm_bucket_mb,
                                         sleep=args.trtllm_sleep)
        else:
            engine = MegatronEngine(policy, eos_id=eos, pad_id=0, batch_size=rows, continuous=not args.lock_step,
                                    stop_ids=stops, decode_attention=args.decode_attention,
                                    cuda_graphs=args.cuda_graphs)
    except (ConfigError, TrtllmUnavailable) as e:  # e.g. --cuda-graphs without --decode-attention triton, on a CPU
        raise SystemExit(f"error: {e}") from None
    gen = torch.Generator().manual_seed(dp_rank())  # each data-parallel rank its own prompts
    spec = LossSpec(kl_coef=1e-4 if reference is not None else 0.0)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def one_step():
        t = {}
        prompts = torch.randint(2, p["vocab"], (args.prompts, args.prompt_len), generator=gen).tolist()
        sync()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if args.skip_rollout:
            resp = torch.randint(2, p["vocab"], (args.prompts * args.n_samples, args.response_len), generator=gen)
            if args.ragged:
                n_resp = torch.randint(1, args.response_len + 1, (len(resp),), generator=gen).tolist()
            else:
                n_resp = [args.response_len] * len(resp)
            rollouts = [SimpleNamespace(prompt_ids=prompts[i // args.n_samples], response_ids=resp[i, :n_resp[i]].tolist())
                        for i in range(len(resp))]
        else:
            engine.wake()  # as the trainer does, inside the rollout's time
            rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=args.response_len, n=args.n_samples,
                                                              temperature=1.0, seed=1))
        sync()
        t["rollout"] = time.perf_counter() - t0
        rollout_peak = torch.cuda.max_memory_allocated() / 1e9 if on_gpu else 0.0
        t0 = time.perf_counter()
        engine.sleep()  # the engine's memory released for the trainer (TensorRT-LLM; the embedded engine: nothing)
        sync()
        t["sleep"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rewards = torch.tensor([float(len(r.response_ids) % 2) for r in rollouts])
        t["reward"] = time.perf_counter() - t0
        batch = build_seq_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], 0)
        sync()
        t0 = time.perf_counter()
        batch.old_logp = policy.logprobs(batch, args.micro_batch_size)
        if reference is not None:
            with reference.on_device(changes=False):
                batch.ref_logp = reference.logprobs(batch, args.micro_batch_size)
        sync()
        t["logprob"] = time.perf_counter() - t0
        batch.advantages = (rewards - rewards.mean())[:, None].expand_as(batch.loss_mask).contiguous()
        batch.weights = aggregation_weights(batch.loss_mask, "token-mean", float(batch.loss_mask.sum()), len(batch))
        t0 = time.perf_counter()
        with policy.on_device():
            policy.train_step(batch, spec, args.micro_batch_size)
        sync()
        t["update"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.update_weights()
        sync()
        t["weight_sync"] = time.perf_counter() - t0
        # (the copies of --offload, inside the log-prob and update times above: not added to the total again)
        t["total"] = sum(t.values())
        t["offload"] = sum(q.offload_stats().get("seconds", 0.0) for q in held)
        t["rollout_peak_gb"] = rollout_peak
        t["response_tokens"] = float(batch.loss_mask.sum())
        lens = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
        t["tokens"] = float(sum(lens))
        t["flops"] = train_flops(p, lens)  # one forward and backward over the step's sequences, each its own length
        return t

    try:
        one_step()  # warm-up
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        runs = [one_step() for _ in range(args.repeats)]
        refit = refit_stream_time(policy, mcfg, p["vocab"], args.trtllm_bucket_mb, sync)
    finally:
        engine.close()
    med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    med["response_tokens"] *= info.dp  # every data-parallel rank ran a batch of the same size
    med["tokens"] *= info.dp
    med["flops"] *= info.dp
    device_name = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    peak = peak_tflops(device_name, args.peak_tflops)
    # training FLOPs: one fwd+bwd (update) and 2 forward passes (old + reference), a forward a third of a fwd+bwd;
    # attention by each sequence's own length (until 2026-12-07 by the longest's, which overstated --ragged MFU)
    n_fwd = 1 + (reference is not None)
    flops_train = med["flops"]
    flops_fwd = med["flops"] / 3.0 * n_fwd
    world_peak = peak * 1e12 * info.world_size
    mfu_update = flops_train / med["update"] / world_peak if peak else None
    mfu_trainer = (flops_train + flops_fwd) / (med["logprob"] + med["update"]) / world_peak if peak else None
    peak_mem = None
    if on_gpu:  # the largest over ranks
        m = torch.tensor([torch.cuda.max_memory_allocated() / 1e9], device=info.device)
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
        peak_mem = float(m)
    res = {
        "device": device_name, "preset": args.preset, "params": param_count(p),
        "active_params": param_count(p, active=True), "dtype": dtype,
        "prompts": args.prompts, "n_samples": args.n_samples, "prompt_len": args.prompt_len,
        "response_len": args.response_len, "micro_batch_size": args.micro_batch_size,
        "pack_tokens": args.pack_tokens, "ragged": args.ragged,
        "kernel_backend": args.kernel_backend, "loss_grad_mode": args.loss_grad_mode,
        "fused_lm_head": args.fused_lm_head,
        "skip_rollout": args.skip_rollout, "recompute": args.recompute,
        "engine_name": args.engine, "rollout_batch_size": getattr(engine, "batch_size", rows),
        "stop_rate": args.stop_rate,
        "continuous_batching": getattr(engine, "continuous", None),
        "decode_attention": getattr(engine, "decode_attention", None), "cuda_graphs": getattr(engine, "cuda_graphs", None),
        "transformer_engine": use_transformer_engine(mcfg), "fp8": args.fp8,
        "distributed_optimizer": args.distributed_optimizer,
        "world_size": info.world_size, "tp": args.tp, "pp": args.pp, "dp": info.dp,
        "sequence_parallel": args.sequence_parallel, "ep": args.ep,
        "times_s": med,
        "tokens_per_s_step": med["tokens"] / med["total"],
        "tokens_per_s_trainer": med["tokens"] / (med["logprob"] + med["update"]),
        # generated tokens per second of the embedded engine, and its decode rows of the last timed step
        "rollout_tokens_per_s": None if args.skip_rollout else med["response_tokens"] / med["rollout"],
        "engine": None if args.skip_rollout else dict(engine.stats),
        "mfu_update": mfu_update, "mfu_trainer": mfu_trainer, "peak_tflops": peak,
        "peak_memory_gb": peak_mem,
        # --offload: GB in host memory outside their use (the optimizer's state and gradients; the reference)
        "offload": args.offload, "offload_gb": [q.offload_stats().get("gib", 0.0) * 2 ** 30 / 1e9 for q in held],
        # one pass of convert.HFWeightStream in bf16 (what a refit by HF name costs on the trainer's side, before
        # the engine loads it; with --engine trtllm, weight_sync includes it)
        "refit_stream": refit,
    }
    if info.rank == 0:
        spec_name = ("TE" + (f" fp8={args.fp8}" if args.fp8 else "")) if res["transformer_engine"] else "local spec"
        size = f"{param_count(p) / 1e9:.2f} B params" + (f", {res['active_params'] / 1e9:.2f} B active"
                                                         if p.get("num_experts") else "")
        print(f"\nbench step: {args.preset} ({size}, {dtype}, {spec_name}) on {device_name}")
        print(f"  {args.prompts} prompts x {args.n_samples} samples per data-parallel rank, prompt {args.prompt_len} "
              f"+ response {args.response_len} tokens; {info.world_size} ranks: TP={args.tp} PP={args.pp} DP={info.dp}")
        print(f"  {'phase':<14}{'seconds':>10}{'share':>9}")
        for k in ("rollout", "sleep", "reward", "logprob", "update", "weight_sync", "total"):
            print(f"  {k:<14}{med[k]:>10.3f}{100 * med[k] / med['total']:>8.1f}%")
        print(f"  tokens/s (whole step) {res['tokens_per_s_step']:.0f}; trainer side {res['tokens_per_s_trainer']:.0f}")
        if on_gpu:
            print(f"  memory: rollout peak {med['rollout_peak_gb']:.2f} GB, step peak {peak_mem:.2f} GB")
        if args.offload:
            print(f"  offload: {' + '.join(f'{g:.2f}' for g in res['offload_gb'])} GB (optimizer and gradients"
                  f"{', reference' if reference is not None else ''}) copied out and back in {med['offload']:.3f} s "
                  "(within the log-prob and update times)")
        if res["rollout_tokens_per_s"] is not None and args.engine == "trtllm":
            print(f"  rollout (TensorRT-LLM): {res['rollout_tokens_per_s']:.0f} generated tokens/s; weight_sync is the "
                  f"refit in {engine.refit_buckets} buckets of {args.trtllm_bucket_mb:g} MB")
        elif res["rollout_tokens_per_s"] is not None:
            e = res["engine"]
            graphs = f", {e['graphs']} step graphs" if engine.cuda_graphs else ""
            print(f"  rollout: {res['rollout_tokens_per_s']:.0f} generated tokens/s; {e['decode_steps']} decode steps, "
                  f"decode rows {e['decode_row_steps']} of {e['dense_row_steps']} in lock-step, {e['admissions']} "
                  f"admissions, {e['compactions']} compactions; attention {engine.decode_attention}{graphs}, "
                  f"rows attended to "
                  f"{e['keys_own'] / max(e['keys_span'], 1):.2f} of the keys in their span")
        print(f"  refit stream (HF tensors, bf16, {args.trtllm_bucket_mb:g} MB buckets): {refit['gb'] * 1e3:.1f} MB in "
              f"{refit['seconds']:.3f} s, {refit['gb_per_s']:.1f} GB/s, {refit['buckets']} buckets")
        if mfu_update is not None:
            print(f"  MFU: update {100 * mfu_update:.1f}%, log-prob passes + update {100 * mfu_trainer:.1f}% "
                  f"(peak {peak:.0f} TFLOP/s)")
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"  wrote {os.path.abspath(args.out)}")
    return 0


def refit_stream_time(policy, mcfg, vocab: int, bucket_mb: float, sync) -> dict:
    """Seconds, GB and buckets of one ``HFWeightStream`` pass over the policy in bf16 (collective over its
    model-parallel group; every rank receives every bucket)."""
    from ..models.convert import HFWeightStream, hf_config_from_model_config

    stream = HFWeightStream(policy.model, hf_config_from_model_config(mcfg, vocab))
    for _ in stream.buckets(int(bucket_mb * (1 << 20)), dtype=torch.bfloat16):  # plans the names once
        pass
    sync()
    t0 = time.perf_counter()
    nbytes = buckets = 0
    for bucket in stream.buckets(int(bucket_mb * (1 << 20)), dtype=torch.bfloat16):
        nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        buckets += 1
    sync()
    secs = time.perf_counter() - t0
    return {"seconds": secs, "gb": nbytes / 1e9, "gb_per_s": nbytes / 1e9 / max(secs, 1e-9), "buckets": buckets}


if __name__ == "__main__":
    raise SystemExit(main())
