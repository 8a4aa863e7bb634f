"""The Megatron policy: log-prob passes and the train step through Megatron's schedules.

Sequences are laid out right-padded: ``tokens[b] = prompt + response + pad``; position ``t`` of the
``[B, L-1]`` per-token tensors refers to the prediction of ``tokens[:, t+1]`` from the logits at
``t``.  The model emits vocab-parallel logits ``[B, L, V/TP]``; every loss and log-prob goes through
``megaprorl.kernels.policy_loss`` with the TP group, so no rank ever gathers the vocabulary.

A trainable policy is wrapped in Megatron's ``DistributedDataParallel`` (contiguous fp32 grad buffers,
gradients summed over DP: the loss weights carry the global normaliser) and updated by Megatron's
optimizer (``get_megatron_optimizer``): Adam with decoupled weight decay (none on biases and norms),
fp32 main weights for bf16 parameters, gradient clipping by the global norm over all model-parallel
shards, and with ``optim.distributed_optimizer`` the ZeRO-1 distributed optimizer (Adam moments and
main weights sharded over DP, gradients reduce-scattered, parameters all-gathered after the step).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .. import kernels
from ..algo.loss import LossSpec, sequence_ratio_old_logp
from ..models.gpt import build_gpt, needs_explicit_causal_mask, use_transformer_engine
from ..parallel import all_reduce_grad_tp, dp_group, max_over, tp_group, tp_rank, tp_world, wide_expert_group
from .micro import IdleMicro, pack_micro_batches, padded_micro_batches
from .offload import HostOffload


@dataclass
class SeqBatch:
    """A batch of full sequences with per-token RL tensors aligned to ``tokens[:, 1:]``."""

    tokens: torch.Tensor  # [B, L] int64
    loss_mask: torch.Tensor  # [B, L-1] float, 1 where tokens[:, t+1] is a response token
    old_logp: Optional[torch.Tensor] = None  # [B, L-1]
    ref_logp: Optional[torch.Tensor] = None  # [B, L-1]
    advantages: Optional[torch.Tensor] = None  # [B, L-1]
    weights: Optional[torch.Tensor] = None  # [B, L-1], loss weights incl. the global normaliser
    lengths: Optional[torch.Tensor] = None  # [B], real (unpadded) length of each row
    # [B, L, MoE layers of this stage, k]: the experts the rollout engine sent each token to (the trainer's
    # forwards replay them: algo.moe_routing_replay); a row's last token and padding hold 0..k-1
    routing: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _map(self, f) -> "SeqBatch":
        g = lambda x: None if x is None else f(x)  # noqa: E731
        return SeqBatch(g(self.tokens), g(self.loss_mask), g(self.old_logp), g(self.ref_logp), g(self.advantages),
                        g(self.weights), g(self.lengths), g(self.routing))

    def slice(self, idx) -> "SeqBatch":
        return self._map(lambda x: x[idx])

    def to(self, device) -> "SeqBatch":
        return self._map(lambda x: x.to(device))


def build_seq_batch(prompts: List[List[int]], responses: List[List[int]], pad_id: int,
                    pad_to_multiple: int = 1) -> SeqBatch:
    """Right-padded ``prompt + response`` sequences and the response-token mask."""
    lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(lens)
    L = int(math.ceil(L / pad_to_multiple) * pad_to_multiple)
    tokens = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L - 1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        if r:
            tokens[i, len(p): len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, len(p) - 1: len(p) - 1 + len(r)] = 1.0
    return SeqBatch(tokens=tokens, loss_mask=mask, lengths=torch.tensor(lens, dtype=torch.long))


def routing_batch(routings: List[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """``SeqBatch.routing`` [B, L, layers, k] from each row's recorded routing [len - 1, layers, k] (its tokens but
    the last, which is never fed to the engine; the rows of ``tokens`` [B, L] in order), the rest 0..k-1."""
    B, L = tokens.shape
    _, n_layers, k = routings[0].shape
    out = torch.arange(k, dtype=routings[0].dtype).expand(B, L, n_layers, k).clone()
    for i, r in enumerate(routings):
        if r.shape[1:] != (n_layers, k) or r.shape[0] > L:
            raise ValueError(f"row {i}'s routing has shape {tuple(r.shape)}, not [<= {L}, {n_layers}, {k}]")
        out[i, : r.shape[0]] = r
    return out


class RoutingReplay:
    """An MoE model's routers (built with ``routing_replay``: Megatron's ``RouterReplay`` on each): ``record()``
    makes them keep the top-k they compute, read back by ``recorded()`` [tokens in the routers' order, layers, k];
    ``replay(mb, ...)`` makes the next forward send each token of micro-batch ``mb`` to ``mb``'s recorded experts
    (the gates are the router's own scores at those experts); ``clear()`` returns them to computing their top-k."""

    def __init__(self, model):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self.action = RouterReplayAction
        self.routers = [layer.mlp.router for layer in model.decoder.layers if hasattr(layer.mlp, "router")]
        if any(getattr(r, "router_replay", None) is None for r in self.routers):
            raise ValueError("the model's routers have no RouterReplay: build it with routing_replay=True")

    @property
    def layers(self) -> int:
        return len(self.routers)

    def record(self) -> None:
        for r in self.routers:
            r.router_replay.set_router_replay_action(self.action.RECORD)

    def recorded(self) -> torch.Tensor:
        return torch.stack([r.router_replay.get_recorded_indices() for r in self.routers], dim=1)

    def replay(self, mb, tp: int, tp_rank: int) -> None:
        for i, r in enumerate(self.routers):
            r.router_replay.clear_indices()  # one micro-batch's targets at a time (no recomputed backward here)
            r.router_replay.set_target_indices(mb.routing_targets(i, tp, tp_rank))
            r.router_replay.set_router_replay_action(self.action.REPLAY_FORWARD)

    def clear(self) -> None:
        for r in self.routers:
            r.router_replay.clear_indices()
            r.router_replay.clear_router_replay_action()


def causal_mask(L: int, device) -> torch.Tensor:
    """Megatron boolean mask [1, 1, L, L], True = masked (padding is to the right, so causal suffices)."""
    return torch.triu(torch.ones(L, L, dtype=torch.bool, device=device), diagonal=1)[None, None]


class ExpertLoad:
    """Counts, during a forward pass, the real tokens (not padding) each MoE layer's router sends to each expert,
    through forward hooks on the routers (their routing map [tokens, experts]).  ``next_micro_batch`` gives the
    micro-batch's real positions [b, s], turned into the router's token order: [s, b] flattened, and this TP
    rank's sequence chunk under sequence parallelism."""

    def __init__(self, model, pcfg):
        from megatron.core import parallel_state as mps

        self.routers = [layer.mlp.router for layer in model.decoder.layers if hasattr(layer.mlp, "router")]
        self.counts = [None] * len(self.routers)
        self.real: Optional[torch.Tensor] = None
        self.sp = bool(pcfg.sequence_parallel and pcfg.tensor_parallel > 1)
        self.tp, self.tp_rank = pcfg.tensor_parallel, (mps.get_tensor_model_parallel_rank() if self.sp else 0)
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def next_micro_batch(self, real_bs: torch.Tensor) -> None:
        real = real_bs.t()  # [s, b], the order of the hidden states the routers see
        if self.sp:
            real = real.chunk(self.tp, dim=0)[self.tp_rank]
        self.real = real.reshape(-1)

    def _hook(self, i: int):
        def hook(module, inputs, output):
            routing_map = output[1]  # [tokens, experts] bool
            real = self.real.to(routing_map.device)
            c = routing_map[real].sum(0, dtype=torch.float64)
            self.counts[i] = c if self.counts[i] is None else self.counts[i] + c
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def stats(self) -> Dict[str, float]:
        """Over the model's MoE layers (every pipeline stage's), the tensor-parallel chunks and the data-parallel
        replicas (collective over all ranks):
        ``moe/load_max_over_mean`` (the busiest expert's tokens over the mean, averaged over layers; 1 is an even
        load), ``moe/dead_experts_frac`` (experts that got no token) and ``moe/routed_tokens`` (token-expert
        assignments per layer: real tokens x top-k)."""
        from megatron.core import parallel_state as mps

        counts = torch.stack([c if c is not None else torch.zeros(self.routers[i].weight.shape[0],
                                                                  dtype=torch.float64)
                              for i, c in enumerate(self.counts)]) if self.routers else None
        if counts is not None and self.sp and dist.is_initialized():
            counts = counts.to(self.routers[0].weight.device)
            dist.all_reduce(counts, group=tp_group())
        if counts is not None and dist.is_initialized() and mps.get_data_parallel_world_size() > 1:
            counts = counts.to(self.routers[0].weight.device)  # every replica's tokens: the step's whole load
            dist.all_reduce(counts, group=mps.get_data_parallel_group())
        out = torch.zeros(4, dtype=torch.float64)
        if counts is not None:
            counts = counts.cpu()
            mean = counts.mean(1).clamp_min(1e-12)
            out += torch.tensor([float((counts.max(1).values / mean).sum()),
                                 float((counts == 0).double().mean(1).sum()), float(counts.sum()), float(len(counts))],
                                dtype=torch.float64)
        if dist.is_initialized() and mps.get_pipeline_model_parallel_world_size() > 1:
            dev = self.routers[0].weight.device if self.routers else (
                torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
            out = out.to(dev)
            dist.all_reduce(out, group=mps.get_pipeline_model_parallel_group())
            out = out.cpu()
        n = max(float(out[3]), 1.0)
        return {"moe/load_max_over_mean": float(out[0]) / n, "moe/dead_experts_frac": float(out[1]) / n,
                "moe/routed_tokens": float(out[2]) / n}


class Policy:
    """A Megatron GPTModel plus its optimizer; one instance per rank."""

    def __init__(self, model_cfg, parallel_cfg, optim_cfg, vocab_size: int, device: torch.device,
                 kernel_backend: str = "auto", trainable: bool = True, pack_tokens: int = 0, pad_id: int = 0,
                 loss_grad_mode: str = "inplace", fused_lm_head: bool = False, lm_head_token_chunk: int = 2048,
                 routing_replay: bool = False, freeze_router: bool = False, offload: bool = False):
        """``pack_tokens > 0`` packs sequences end to end into micro-batches of at most that many tokens
        (no compute on padding); 0 keeps right-padded micro-batches of ``micro_batch_size`` rows.
        ``loss_grad_mode`` (Triton loss only; see ``megaprorl.kernels.policy_loss``): ``inplace`` writes the
        logits gradient over the logits in the loss's forward call, so the loss holds one [T, V] buffer
        instead of two (the saved logits and the new gradient); ``recompute`` makes the gradient pass in
        backward; ``forward`` computes it in the forward call into a new buffer.
        ``fused_lm_head``: the log-prob passes and the RL loss take the final hidden states and the output
        layer's weight (``megaprorl.kernels.policy_loss_lm_head``) instead of logits, so no [T, V] logits
        exist; with the Triton backend the vocabulary is done in token chunks of ``lm_head_token_chunk``.
        The rollout engine and the SFT step still use logits.
        ``routing_replay`` (an MoE model): its forwards replay a batch's ``routing`` (``RoutingReplay``);
        ``freeze_router``: its routers' weights take no gradient and no update (before the optimizer is built).
        ``offload``: ``offload()`` moves the idle state to host memory (a trainable policy's optimizer state and
        gradient buffers, a frozen one's weights) and ``on_device()`` brings it back for a while
        (``megaprorl.policy.offload``)."""
        self.mcfg, self.pcfg, self.ocfg = model_cfg, parallel_cfg, optim_cfg
        self.device = device
        self.model = build_gpt(model_cfg, parallel_cfg, vocab_size, routing_replay=routing_replay)
        # an MoE policy whose forwards replay a batch's recorded routing (SeqBatch.routing), when it has one
        self.routing_replay = RoutingReplay(self.model) if routing_replay else None
        if freeze_router:
            routers = [layer.mlp.router for layer in self.model.decoder.layers if hasattr(layer.mlp, "router")]
            if not routers:
                raise ValueError("freeze_router needs an MoE model (model.num_experts > 0)")
            for r in routers:
                for q in r.parameters():
                    q.requires_grad_(False)
        self._explicit_mask = needs_explicit_causal_mask(model_cfg)
        self.pack_tokens, self.pad_id = int(pack_tokens), int(pad_id)
        # the local spec's SDPA attention takes packed-sequence bounds from a CPU copy (TE needs them on GPU)
        self._cpu_boundaries = not use_transformer_engine(model_cfg)
        if self.pack_tokens and self._explicit_mask:
            raise ValueError("packed sequences (train.pack_tokens > 0) need model.attention=sdpa or the "
                             "TransformerEngine spec; Megatron's local attention takes only a dense mask")
        self.kernel_backend = kernel_backend
        if loss_grad_mode not in kernels.GRAD_MODES:
            raise ValueError(f"loss_grad_mode must be one of {kernels.GRAD_MODES}, got {loss_grad_mode!r}")
        self.loss_grad_mode = loss_grad_mode
        self.fused_lm_head, self.lm_head_token_chunk = bool(fused_lm_head), int(lm_head_token_chunk)
        self._head_weight = None  # the output layer's weight, recorded while the fused LM head is on
        self._expert_load = None  # an MoE model's router counter, during a log-prob pass that asks for it
        self.last_expert_load: Dict[str, float] = {}  # its statistics (ExpertLoad.stats) from the last such pass
        self.idle_micro_batches = 0  # run to match the expert group's other ranks (parallel.wide_expert_group)
        self.vocab_size = vocab_size
        self.optimizer = None
        self.ddp = None
        self.distributed_optimizer = bool(getattr(optim_cfg, "distributed_optimizer", False))
        self._offload = HostOffload() if offload else None
        self._on_device_depth = 0
        if trainable:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

            self.ddp = DistributedDataParallel(
                config=self.model.config, module=self.model,
                ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                         use_distributed_optimizer=self.distributed_optimizer))
            self.reset_optimizer()
        else:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()

    def reset_optimizer(self) -> None:
        """A fresh Megatron optimizer (moments cleared; fp32 main weights copied from the model): built at
        construction, and again after warm-start and by v1-style reference resets."""
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        offloaded = self._offload is not None and self._offload.offloaded
        self.restore()  # (the old state's storages refilled before they are dropped; the new one offloaded below)
        o, mc = self.ocfg, self.model.config
        cfg = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=getattr(o, "min_lr", o.lr),
                              weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
                              adam_eps=o.adam_eps, clip_grad=float(o.grad_clip or 0.0), bf16=bool(mc.bf16),
                              fp16=bool(mc.fp16), params_dtype=mc.params_dtype,
                              use_distributed_optimizer=self.distributed_optimizer)
        with _quiet_megatron_log("megatron.core.optimizer"):
            self.optimizer = get_megatron_optimizer(cfg, [self.ddp])
        self._lr_scheduler = None  # built on the first schedule_lr for this optimizer's parameter groups
        self.set_lr(o.lr, o.weight_decay)
        self.updates = 0  # optimizer steps taken since this optimizer was built (or loaded)
        if offloaded:
            self.offload()

    def adam_states(self) -> List[Dict]:
        """This rank's Adam state dicts (``exp_avg``, ``exp_avg_sq``, ``step``), one per parameter it
        updates (under the distributed optimizer: per main-weight shard it owns)."""
        return [st for o in self.optimizer.chained_optimizers for st in o.optimizer.state.values()]

    def set_lr(self, lr: float, weight_decay: Optional[float] = None) -> None:
        """Learning rate (and weight decay) of every parameter group, times the group's multipliers:
        Megatron's groups carry ``wd_mult = 0`` for biases and norms (its LR scheduler applies them)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            if weight_decay is not None:
                g["weight_decay"] = weight_decay * g.get("wd_mult", 1.0)

    def schedule_lr(self, step: int, total_steps: int) -> float:
        """Set every parameter group's learning rate (and weight decay, times the group's ``wd_mult``) for RL
        step ``step`` (1-based) with Megatron's ``OptimizerParamScheduler``: ``optim.lr_warmup_steps`` of linear
        warmup from ``optim.lr_warmup_init`` (step k of w trains at init + (lr - init) k / w), then
        ``optim.lr_decay_style`` from ``optim.lr`` down to ``optim.min_lr`` at step ``optim.lr_decay_steps``
        (0: ``total_steps``) and ``min_lr`` after.  A function of ``step`` only: a resumed run, or an optimizer
        rebuilt by a reference reset, continues the schedule.  Returns the learning rate set."""
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.ocfg
        if self._lr_scheduler is None:
            warmup = int(getattr(o, "lr_warmup_steps", 0))
            style = getattr(o, "lr_decay_style", "constant")
            decay = int(getattr(o, "lr_decay_steps", 0)) or int(total_steps)
            with _quiet_megatron_log("megatron.core.optimizer_param_scheduler"):
                self._lr_scheduler = OptimizerParamScheduler(
                    self.optimizer, init_lr=float(getattr(o, "lr_warmup_init", 0.0)), max_lr=o.lr,
                    min_lr=float(getattr(o, "min_lr", o.lr)), lr_warmup_steps=warmup,
                    lr_decay_steps=max(decay, warmup + 1), lr_decay_style=style, start_wd=o.weight_decay,
                    end_wd=o.weight_decay, wd_incr_steps=1, wd_incr_style="constant")
        sched = self._lr_scheduler
        sched.num_steps = int(step)
        sched.step(0)
        return float(sched.get_lr({}))

    # ----------------------------------------------------------------------------------- helpers
    @property
    def vocab_start(self) -> int:
        # the shard's row count, which the layer knows even without a weight of its own (tied embeddings)
        head = getattr(self.model, "output_layer", None)
        return tp_rank() * (head.output_size_per_partition if head is not None else 0)

    def _attn_mask(self, L: int, device):
        return causal_mask(L, device) if self._explicit_mask else None

    def _mask_padded_vocab(self, flat: torch.Tensor) -> torch.Tensor:
        """Columns past the tokenizer's vocabulary (padding to a multiple of make_vocab_divisible_by x TP)
        leave the softmax, as the sampler leaves them out: written in place, only those columns."""
        local = flat.shape[-1]
        n_valid = self._n_valid_vocab(local)
        if n_valid < local:  # far below any logit, and finite after a temperature >= 0.01 (no inf - inf)
            flat[:, n_valid:] = torch.finfo(flat.dtype).min * 0.01
        return flat

    @contextlib.contextmanager
    def _fused_head(self):
        """With ``fused_lm_head``: for the duration, the output layer returns its input prepared as its own
        forward would prepare it (all-gathered under sequence parallelism, whose backward reduce-scatters,
        else its gradient all-reduced over the TP group: ``all_reduce_grad_tp``) instead of multiplying it
        by the weight, and records the weight it would have used (its own, or the shared embedding).
        GPTModel then returns hidden states [b, s, h]."""
        layer = getattr(self.model, "output_layer", None)
        if not self.fused_lm_head or layer is None:  # off, or a pipeline stage without the head
            yield
            return
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        def hidden_forward(input_, weight=None, runtime_gather_output=None):
            self._head_weight = layer.weight if weight is None else weight
            if getattr(layer, "sequence_parallel", False):
                return gather_from_sequence_parallel_region(input_), None
            return all_reduce_grad_tp(input_), None

        layer.forward = hidden_forward
        try:
            yield
        finally:
            del layer.forward
            self._head_weight = None

    def _token_loss(self, mb, output, spec, old, ref, adv, weights, temperature):
        """Per-token loss of a micro-batch from the model's output: logits [b, s, V_local], or under the
        fused LM head hidden states [b, s, h] and the recorded output weight (its padded rows left out)."""
        dev = output.device
        targets = mb.targets(dev)
        if self._head_weight is not None:
            hidden = mb.flat_logits(output)
            # padded rows left out; a shard of padding only (small vocabularies at high TP) keeps 0 rows
            weight = self._head_weight[: self._n_valid_vocab(self._head_weight.shape[0])]
            if not torch.is_grad_enabled():
                weight = weight.detach()
            if temperature != 1.0:
                hidden = hidden / temperature  # logits / T = (hidden / T) @ W^T
            return kernels.policy_loss_lm_head(hidden, weight, targets, old, ref, adv, weights, spec,
                                               backend=self.kernel_backend, tp_group=tp_group(),
                                               vocab_start_index=self.vocab_start,
                                               token_chunk=self.lm_head_token_chunk)
        flat = self._mask_padded_vocab(mb.flat_logits(output))
        if temperature != 1.0:
            flat = flat / temperature
        return kernels.policy_loss(flat, targets, old, ref, adv, weights, spec, backend=self.kernel_backend,
                                   tp_group=tp_group(), vocab_start_index=self.vocab_start,
                                   grad_mode=self.loss_grad_mode)

    def _sequence_ratio_old(self, mb, output, old, spec: LossSpec, temperature: float) -> torch.Tensor:
        """The old log-probs that give the loss sequence-level ratios (``algo.loss.sequence_ratio_old_logp``):
        the current log-probs first, from a pass of the loss kernel without gradient (it writes nothing over the
        logits in any grad mode), then each sequence's mean log-ratio."""
        zeros = old.new_zeros(old.shape)
        with torch.no_grad():
            logp = self._token_loss(mb, output.detach(), LossSpec(), zeros, None, zeros, zeros, temperature).logp
        return sequence_ratio_old_logp(logp, old, mb.field("loss_mask", old.device), mb.segments(old.device),
                                       spec.ratio_log_clamp)

    def _n_valid_vocab(self, local: int) -> int:
        return min(max(self.vocab_size - self.vocab_start, 0), local)

    def _micro_batches(self, batch: SeqBatch, micro_batch_size: int):
        # token counts divisible by 16 for FP8 GEMMs and by TP under sequence parallelism
        mult = 16 if self.mcfg.fp8 else 1
        if self.pcfg.sequence_parallel and self.pcfg.tensor_parallel > 1:
            mult = mult * self.pcfg.tensor_parallel // math.gcd(mult, self.pcfg.tensor_parallel)
        if self.pack_tokens:
            micro = pack_micro_batches(batch, self.pack_tokens, self.pad_id, pad_multiple=mult)
        else:
            micro = padded_micro_batches(batch, micro_batch_size, self.pad_id, pad_multiple=mult)
        group = wide_expert_group()
        if group is not None:  # experts across data-parallel replicas: as many forwards (and backwards) as the others
            n = max_over(len(micro), group, self.device)
            self.idle_micro_batches += n - len(micro)
            micro += [IdleMicro(batch, mult, self.pad_id) for _ in range(n - len(micro))]
        return micro

    def _run_schedule(self, micro, loss_fn, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            tokens, pos, mask, packed = mb.model_inputs(self.device, self._attn_mask, self._cpu_boundaries)
            if self._expert_load is not None:
                self._expert_load.next_micro_batch(mb.real_tokens())
            if self.routing_replay is not None:
                if mb.has_routing:
                    sp = self.pcfg.sequence_parallel and self.pcfg.tensor_parallel > 1
                    self.routing_replay.replay(mb, self.pcfg.tensor_parallel if sp else 1, tp_rank() if sp else 0)
                else:
                    self.routing_replay.clear()
            out = model(tokens, pos, mask, packed_seq_params=packed)
            return out, lambda output: loss_fn(mb, output)

        L = max(mb.seq_len for mb in micro)
        # micro-batches of their own lengths (and row counts): the stages exchange each activation's shape before
        # it (Megatron's variable_seq_lengths, one small message more per send); equal shapes skip that
        self.model.config.variable_seq_lengths = (self.pcfg.pipeline_parallel > 1 and any(
            mb.seq_len != L or len(mb) != len(micro[0]) for mb in micro))
        fb = get_forward_backward_func()
        model = self.ddp if (self.ddp is not None and not forward_only) else self.model
        try:
            return fb(forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
                      num_microbatches=len(micro), seq_length=L, micro_batch_size=len(micro[0]),
                      forward_only=forward_only)
        finally:
            if self.routing_replay is not None:
                self.routing_replay.clear()

    # ----------------------------------------------------------------------------- log-prob pass
    @torch.no_grad()
    def logprobs(self, batch: SeqBatch, micro_batch_size: int, temperature: float = 1.0,
                 with_entropy: bool = False, expert_load: bool = False):
        """Teacher-forced log-probs [B, L-1] (fp32) of ``tokens[:, 1:]`` (and entropies).  ``expert_load`` (an MoE
        model): count the tokens each layer's router sends to each expert, for ``expert_load_stats``."""
        if expert_load and self.model.config.num_moe_experts:
            self._expert_load = ExpertLoad(self.model, self.pcfg)
        was_training = self.model.training
        self.model.eval()
        spec = LossSpec()

        B, L = batch.tokens.shape
        logp_out = torch.zeros(B, L - 1)
        ent_out = torch.zeros(B, L - 1) if with_entropy else None

        done = []  # (micro-batch, its log-probs, entropies): brought to the host together after the last one

        def loss_fn(mb, output):
            zeros = output.new_zeros(output.shape[0] * output.shape[1], dtype=torch.float32)  # one per position
            out = self._token_loss(mb, output, spec, zeros, None, zeros, zeros, temperature)
            done.append((mb, out.logp.detach().clone(), out.entropy.detach().clone() if with_entropy else None))
            return out.loss * 0.0, torch.tensor(1, dtype=torch.int), {}

        try:
            with self._fused_head():
                self._run_schedule(self._micro_batches(batch, micro_batch_size), loss_fn, forward_only=True)
            # one copy to the host, not one per micro-batch: each would wait for its micro-batch to finish
            # before the next one's kernels were launched
            for k, out in ((1, logp_out), (2, ent_out)):
                if out is not None and done:
                    host = torch.cat([d[k].reshape(-1) for d in done]).cpu().split([d[k].numel() for d in done])
                    for d, values in zip(done, host):
                        d[0].scatter_into(out, values)
        finally:
            if self._expert_load is not None:
                self._expert_load.close()
                self.last_expert_load, self._expert_load = self._expert_load.stats(), None
        self.model.train(was_training)
        logp_out, ent_out = self._from_last_stage(logp_out, ent_out)
        return (logp_out, ent_out) if with_entropy else logp_out

    def _from_last_stage(self, *tensors):
        """Under pipeline parallelism only the last stage computes the loss: broadcast its CPU results
        (tensors, or None) to the other stages of its pipeline."""
        if self.pcfg.pipeline_parallel == 1:
            return tensors
        from megatron.core import parallel_state as mps

        group, src = mps.get_pipeline_model_parallel_group(), mps.get_pipeline_model_parallel_last_rank()
        out = []
        for t in tensors:
            if t is not None:
                buf = t.to(self.device)
                dist.broadcast(buf, src=src, group=group)
                t = buf.cpu()
            out.append(t)
        return tuple(out)

    # ------------------------------------------------------------------------------- train step
    def train_step(self, batch: SeqBatch, spec: LossSpec, micro_batch_size: int, temperature: float = 1.0) -> Dict:
        """One optimizer step over ``batch`` (a mini-batch) in micro-batches.

        ``batch.weights`` carry the global normaliser, so the summed micro-batch losses are the
        global-batch token mean whatever the micro-batch split; gradients are summed over DP ranks.
        """
        assert self.optimizer is not None, "policy was built frozen"
        self.model.train()
        self._zero_grad()
        sums: Dict[str, float] = {}

        def loss_fn(mb, output):
            dev = output.device
            old = ratio_old = mb.field("old_logp", dev)
            if spec.ratio_level == "sequence":  # GSPO-token: each token's ratio is its sequence's (algo.loss)
                ratio_old = self._sequence_ratio_old(mb, output, old, spec, temperature)
            out = self._token_loss(mb, output, spec, ratio_old, mb.field("ref_logp", dev),
                                   mb.field("advantages", dev), mb.field("weights", dev), temperature)
            _accumulate_stats(sums, out, mb, spec, ratio_old)
            return out.loss, torch.tensor(1, dtype=torch.int), {}

        with self._fused_head():
            self._run_schedule(self._micro_batches(batch, micro_batch_size), loss_fn, forward_only=False)
        grad_norm, finite = self._reduce_clip_step()
        stats = _finish_stats(self._stats_from_last_stage(_floats(sums)))
        stats["grad_norm"] = grad_norm
        stats["skipped_update"] = 0.0 if finite else 1.0
        return stats

    def sft_step(self, batch: SeqBatch, micro_batch_size: int = 0) -> float:
        """One supervised step with the policy's optimizer (its learning rate as set by ``set_lr``):
        token-mean cross entropy of the response tokens (vocab-parallel, over all data-parallel ranks),
        through Megatron's schedule like ``train_step`` (so pipeline stages and packing apply).
        ``micro_batch_size`` 0: the whole batch in one micro-batch.  Returns this rank's mean NLL."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        self.model.train()
        self._zero_grad()
        local = float(batch.loss_mask.sum())
        counts = torch.tensor([local], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size(dp_group()) > 1:
            dist.all_reduce(counts, group=dp_group())
        norm = max(float(counts), 1.0)
        sums = {"nll": 0.0}

        def loss_fn(mb, logits):
            flat = self._mask_padded_vocab(mb.flat_logits(logits)).float()
            mask = mb.field("loss_mask", flat.device)
            nll = (vocab_parallel_cross_entropy(flat, mb.targets(flat.device)) * mask).sum()
            sums["nll"] += float(nll.detach())
            return nll / norm, torch.tensor(1, dtype=torch.int), {}

        self._run_schedule(self._micro_batches(batch, micro_batch_size or len(batch)), loss_fn, forward_only=False)
        self._reduce_clip_step()
        sums = self._stats_from_last_stage(sums)
        return sums["nll"] / max(local, 1.0)

    def _stats_from_last_stage(self, sums: Dict[str, float]) -> Dict[str, float]:
        """Under pipeline parallelism the loss statistics live on the last stage: give them to every stage."""
        if self.pcfg.pipeline_parallel == 1:
            return sums
        from megatron.core import parallel_state as mps

        box = [sums]
        dist.broadcast_object_list(box, src=mps.get_pipeline_model_parallel_last_rank(),
                                   group=mps.get_pipeline_model_parallel_group())
        return box[0]

    def _zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _reduce_clip_step(self):
        """Gradients summed over DP (reduce-scattered under the distributed optimizer), then the global
        norm; a non-finite norm skips the update, a finite one clips to ``optim.grad_clip`` and steps.
        The pieces of Megatron's ``optimizer.step()``, with the finiteness check between them (its own
        step would clip and apply a NaN); each runs once.  Returns (norm, updated)."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import clip_grads

        finalize_model_grads([self.ddp])  # DP reduction, plus SP layer-norm and PP embedding grads
        self.optimizer.prepare_grads()  # model grads -> the main (fp32 / this rank's shard) grads
        grad_norm = float(self.optimizer.get_grad_norm())
        finite = math.isfinite(grad_norm)
        if finite:
            for opt in self.optimizer.chained_optimizers:
                params = opt.get_parameters()
                if params and opt.config.clip_grad > 0.0:
                    clip_grads.clip_grad_by_total_norm_fp32(
                        params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                        use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
            self.optimizer.step_with_ready_grads()  # Adam, main -> model weights, parameter all-gather
            self.updates += 1
        return grad_norm, finite

    # ---------------------------------------------------------------------------------- host offload
    def _main_params(self) -> List[torch.Tensor]:
        """The parameters the optimizer steps: fp32 main weights (this rank's shards under the distributed
        optimizer), or the model's own weights where they are fp32 and not sharded."""
        return [p for o in self.optimizer.chained_optimizers for g in o.optimizer.param_groups for p in g["params"]]

    def _grad_buffers(self) -> List[torch.Tensor]:
        """DDP's contiguous fp32 gradient buffers (the ``main_grad`` of every parameter is a view into one)."""
        return [b.grad_data for b in self.ddp.buffers + self.ddp.expert_parallel_buffers]

    def _offload_tensors(self):
        """(keep, drop, spare) for ``HostOffload.offload``: a frozen policy's weights; a trainable one's
        optimizer state and main weights (kept), its gradients (dropped), never its model's weights."""
        weights = list(self.model.parameters())
        if self.optimizer is None:
            return weights, [], []
        main = self._main_params()
        keep = main + [v for st in self.adam_states() for v in st.values() if torch.is_tensor(v)]
        drop = self._grad_buffers() + [p.grad for p in main if p.grad is not None]
        return keep, drop, weights + list(self.model.buffers())

    def offload(self, copy: bool = True) -> None:
        """The idle state to host memory (with ``offload`` on; else nothing).  ``copy=False``: it did not
        change since it came back, so the host copy is still current and only the device storage is freed."""
        if self._offload is not None and self._on_device_depth == 0:
            self._offload.offload(*self._offload_tensors(), copy=copy)

    def restore(self) -> None:
        if self._offload is not None:
            self._offload.restore()

    @contextlib.contextmanager
    def on_device(self, changes: bool = True):
        """The offloaded state on the device for the duration (nested uses: the outermost's), then offloaded
        again; ``changes=False`` promises that nothing in it changes meanwhile (no copy back)."""
        self.restore()
        self._on_device_depth += 1
        try:
            yield
        finally:
            self._on_device_depth -= 1
            self.offload(copy=changes)

    def memory_bytes(self) -> Dict[str, int]:
        """What this rank holds of the policy, in bytes, counted from its tensors: ``weights``; for a trainable
        policy also ``gradients`` (the DDP buffers, fp32) and ``optimizer`` as it will be once Adam has stepped:
        the main weights that are not the model's own, and two fp32 moments per main weight (this rank's shard
        under the distributed optimizer).  Counted the same whether or not the state is offloaded."""
        size = lambda t: t.numel() * t.element_size()  # noqa: E731  (offloaded storages are empty; shapes remain)
        out = {"weights": sum(size(p) for p in self.model.parameters())}
        if self.optimizer is None:
            return out
        own = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        out["gradients"] = sum(size(g) for g in self._grad_buffers())
        out["optimizer"] = sum((0 if p.untyped_storage().data_ptr() in own else size(p)) + 2 * 4 * p.numel()
                               for p in self._main_params())
        return out

    def offload_stats(self) -> Dict[str, float]:
        """The seconds spent offloading and restoring since the last call, and the bytes offloaded (GiB)."""
        if self._offload is None:
            return {}
        s = self._offload.seconds
        self._offload.seconds = 0.0
        return {"seconds": s, "gib": self._offload.bytes / 2 ** 30}

    # ---------------------------------------------------------------------------------- weights
    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}

    def load_weights_from(self, other: "Policy") -> None:
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), other.model.parameters()):
                p.copy_(q)


@contextlib.contextmanager
def _quiet_megatron_log(name: str):
    """Megatron's INFO lines of one logger off for the duration (get_megatron_optimizer logs its whole config
    on every (re)build, the LR scheduler its decay style)."""
    import logging

    log = logging.getLogger(name)
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def _accumulate_stats(sums: Dict[str, torch.Tensor], out, mb: SeqBatch, spec: LossSpec, ratio_old=None) -> None:
    """The step's loss statistics; the clip fractions from the ratios the loss clipped (``ratio_old``: the old
    log-probs it was given, the sequence-level ones under ``ratio_level`` sequence), the KL to the old policy
    from the true old log-probs.  Summed on the device in float64 (each micro-batch's fp32 sum widened, as a
    Python float would be): ``_floats`` brings them to the host once, after the step's last micro-batch."""
    from ..algo.loss import clipped_pg_loss

    dev = out.logp.device
    m, old, adv = mb.field("loss_mask", dev), mb.field("old_logp", dev), mb.field("advantages", dev)
    ratio_old = old if ratio_old is None else ratio_old.to(dev)
    _, clo, chi = clipped_pg_loss(out.logp, ratio_old, adv, spec.eps_low, spec.eps_high, spec.dual_clip,
                                  spec.ratio_log_clamp)
    log_ratio = (out.logp - old).clamp(-spec.ratio_log_clamp, spec.ratio_log_clamp)
    add = {
        "tokens": m.sum(),
        "loss": out.loss.detach(),
        "entropy_sum": (out.entropy * m).sum(),
        "clip_low_sum": (clo.float() * m).sum(),
        "clip_high_sum": (chi.float() * m).sum(),
        # k3 estimate of KL(pi_old || pi) from samples of pi_old
        "approx_kl_old_sum": ((torch.exp(log_ratio) - 1 - log_ratio) * m).sum(),
    }
    if out.kl is not None:
        add["kl_ref_sum"] = (out.kl * m).sum()
    for k, v in add.items():
        v = v.detach().double()
        sums[k] = sums[k] + v if k in sums else v


def _floats(sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """``_accumulate_stats``'s sums on the host, in one copy."""
    if not sums:
        return {}
    return dict(zip(sums, torch.stack([v.reshape(()) for v in sums.values()]).tolist()))


def _finish_stats(sums: Dict[str, float]) -> Dict[str, float]:
    n = max(sums.get("tokens", 0.0), 1.0)
    out = {"loss": sums.get("loss", 0.0), "entropy": sums.get("entropy_sum", 0.0) / n,
           "clip_frac_low": sums.get("clip_low_sum", 0.0) / n, "clip_frac_high": sums.get("clip_high_sum", 0.0) / n,
           "approx_kl_old": sums.get("approx_kl_old_sum", 0.0) / n, "tokens": sums.get("tokens", 0.0)}
    if "kl_ref_sum" in sums:
        out["kl_ref"] = sums["kl_ref_sum"] / n
    return out
