"""The Megatron policy: log-prob passes and the train step through Megatron's schedules.

Sequences are laid out right-padded: ``tokens[b] = prompt + response + pad``; position ``t`` of the
``[B, L-1]`` per-token tensors refers to the prediction of ``tokens[:, t+1]`` from the logits at
``t``.  The model emits vocab-parallel logits ``[B, L, V/TP]``; every loss and log-prob goes through
``megaprorl.kernels.policy_loss`` with the TP group, so no rank ever gathers the vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .. import kernels
from ..algo.loss import LossSpec
from ..models.gpt import build_gpt, needs_explicit_causal_mask, use_transformer_engine
from ..parallel import dp_group, tp_group, tp_rank, tp_world
from .micro import pack_micro_batches, padded_micro_batches


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

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _map(self, f) -> "SeqBatch":
        g = lambda x: None if x is None else f(x)  # noqa: E731
        return SeqBatch(g(self.tokens), g(self.loss_mask), g(self.old_logp), g(self.ref_logp), g(self.advantages),
                        g(self.weights), g(self.lengths))

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


def causal_mask(L: int, device) -> torch.Tensor:
    """Megatron boolean mask [1, 1, L, L], True = masked (padding is to the right, so causal suffices)."""
    return torch.triu(torch.ones(L, L, dtype=torch.bool, device=device), diagonal=1)[None, None]


class Policy:
    """A Megatron GPTModel plus its optimizer; one instance per rank."""

    def __init__(self, model_cfg, parallel_cfg, optim_cfg, vocab_size: int, device: torch.device,
                 kernel_backend: str = "auto", trainable: bool = True, pack_tokens: int = 0, pad_id: int = 0):
        """``pack_tokens > 0`` packs sequences end to end into micro-batches of at most that many tokens
        (no compute on padding); 0 keeps right-padded micro-batches of ``micro_batch_size`` rows."""
        self.mcfg, self.pcfg, self.ocfg = model_cfg, parallel_cfg, optim_cfg
        self.device = device
        self.model = build_gpt(model_cfg, parallel_cfg, vocab_size)
        self._explicit_mask = needs_explicit_causal_mask(model_cfg)
        self.pack_tokens, self.pad_id = int(pack_tokens), int(pad_id)
        # the local spec's SDPA attention takes packed-sequence bounds from a CPU copy (TE needs them on GPU)
        self._cpu_boundaries = not use_transformer_engine(model_cfg)
        if self.pack_tokens and self._explicit_mask:
            raise ValueError("packed sequences (train.pack_tokens > 0) need model.attention=sdpa or the "
                             "TransformerEngine spec; Megatron's local attention takes only a dense mask")
        self.kernel_backend = kernel_backend
        self.vocab_size = vocab_size
        self.optimizer = None
        if trainable:
            self.reset_optimizer()
        else:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()

    def reset_optimizer(self) -> None:
        """A fresh AdamW (moments cleared): used after warm-start and by v1-style reference resets."""
        o = self.ocfg
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                           betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                           weight_decay=o.weight_decay)

    # ----------------------------------------------------------------------------------- helpers
    @property
    def vocab_start(self) -> int:
        local = self.model.output_layer.weight.shape[0] if hasattr(self.model, "output_layer") else 0
        return tp_rank() * local

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        pos = torch.arange(L, device=tokens.device)[None].expand(tokens.shape[0], -1)
        return self.model(tokens, pos, self._attn_mask(L, tokens.device))

    def _attn_mask(self, L: int, device):
        return causal_mask(L, device) if self._explicit_mask else None

    def _mask_padded_vocab(self, flat: torch.Tensor) -> torch.Tensor:
        """Columns past the tokenizer's vocabulary (padding to a multiple of make_vocab_divisible_by x TP)
        leave the softmax, as the sampler leaves them out: written in place, only those columns."""
        local = flat.shape[-1]
        n_valid = min(max(self.vocab_size - self.vocab_start, 0), local)
        if n_valid < local:  # far below any logit, and finite after a temperature >= 0.01 (no inf - inf)
            flat[:, n_valid:] = torch.finfo(flat.dtype).min * 0.01
        return flat

    def _micro_batches(self, batch: SeqBatch, micro_batch_size: int):
        # token counts divisible by 16 for FP8 GEMMs and by TP under sequence parallelism
        mult = 16 if self.mcfg.fp8 else 1
        if self.pcfg.sequence_parallel and self.pcfg.tensor_parallel > 1:
            mult = mult * self.pcfg.tensor_parallel // math.gcd(mult, self.pcfg.tensor_parallel)
        if self.pack_tokens:
            return pack_micro_batches(batch, self.pack_tokens, self.pad_id, pad_multiple=mult,
                                      equal_length=self.pcfg.pipeline_parallel > 1)
        return padded_micro_batches(batch, micro_batch_size, self.pad_id, pad_multiple=mult)

    def _run_schedule(self, micro, loss_fn, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            tokens, pos, mask, packed = mb.model_inputs(self.device, self._attn_mask, self._cpu_boundaries)
            out = model(tokens, pos, mask, packed_seq_params=packed)
            return out, lambda output: loss_fn(mb, output)

        L = max(mb.seq_len for mb in micro)
        if self.pcfg.pipeline_parallel > 1 and any(mb.seq_len != L or len(mb) != len(micro[0]) for mb in micro):
            raise ValueError("pipeline parallelism needs equal micro-batch shapes; pad to one length")
        fb = get_forward_backward_func()
        return fb(forward_step_func=forward_step, data_iterator=iter(micro), model=[self.model],
                  num_microbatches=len(micro), seq_length=L, micro_batch_size=len(micro[0]),
                  forward_only=forward_only)

    # ----------------------------------------------------------------------------- log-prob pass
    @torch.no_grad()
    def logprobs(self, batch: SeqBatch, micro_batch_size: int, temperature: float = 1.0,
                 with_entropy: bool = False):
        """Teacher-forced log-probs [B, L-1] (fp32) of ``tokens[:, 1:]`` (and entropies)."""
        was_training = self.model.training
        self.model.eval()
        spec = LossSpec()

        B, L = batch.tokens.shape
        logp_out = torch.zeros(B, L - 1)
        ent_out = torch.zeros(B, L - 1) if with_entropy else None

        def loss_fn(mb, logits):
            flat = self._mask_padded_vocab(mb.flat_logits(logits))
            if temperature != 1.0:
                flat = flat / temperature
            targets = mb.targets(flat.device)
            zeros = torch.zeros(targets.shape[0], device=flat.device)
            out = kernels.policy_loss(flat, targets, zeros, None, zeros, zeros, spec, backend=self.kernel_backend,
                                      tp_group=tp_group(), vocab_start_index=self.vocab_start)
            mb.scatter_into(logp_out, out.logp.cpu())
            if with_entropy:
                mb.scatter_into(ent_out, out.entropy.cpu())
            return out.loss * 0.0, torch.tensor(1, dtype=torch.int), {}

        self._run_schedule(self._micro_batches(batch, micro_batch_size), loss_fn, forward_only=True)
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
        self.optimizer.zero_grad(set_to_none=True)
        sums: Dict[str, float] = {}

        def loss_fn(mb, logits):
            flat = self._mask_padded_vocab(mb.flat_logits(logits))
            if temperature != 1.0:
                flat = flat / temperature
            dev = flat.device
            out = kernels.policy_loss(flat, mb.targets(dev), mb.field("old_logp", dev), mb.field("ref_logp", dev),
                                      mb.field("advantages", dev), mb.field("weights", dev), spec,
                                      backend=self.kernel_backend, tp_group=tp_group(),
                                      vocab_start_index=self.vocab_start)
            _accumulate_stats(sums, out, mb, spec)
            return out.loss, torch.tensor(1, dtype=torch.int), {}

        self._run_schedule(self._micro_batches(batch, micro_batch_size), loss_fn, forward_only=False)
        self._reduce_grads_over_dp()
        grad_norm = self.clip_grad_norm(self.ocfg.grad_clip)
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.pcfg.pipeline_parallel > 1:  # the loss statistics live on the last stage
            from megatron.core import parallel_state as mps

            box = [sums]
            dist.broadcast_object_list(box, src=mps.get_pipeline_model_parallel_last_rank(),
                                       group=mps.get_pipeline_model_parallel_group())
            sums = box[0]
        stats = _finish_stats(sums)
        stats["grad_norm"] = grad_norm
        stats["skipped_update"] = 0.0 if finite else 1.0
        return stats

    def sft_step(self, batch: SeqBatch, optimizer: torch.optim.Optimizer) -> float:
        """One supervised step: token-mean cross entropy of the response tokens (vocab-parallel)."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        self.model.train()
        optimizer.zero_grad(set_to_none=True)
        b = batch.to(self.device)
        logits = self._logits(b.tokens)[:, :-1].float()
        nll = vocab_parallel_cross_entropy(logits.clone(), b.tokens[:, 1:])
        counts = torch.tensor([float(b.loss_mask.sum())], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size(dp_group()) > 1:
            dist.all_reduce(counts, group=dp_group())
        loss = (nll * b.loss_mask).sum() / counts.clamp_min(1.0).item()
        loss.backward()
        self._reduce_grads_over_dp()
        self.clip_grad_norm(1.0)
        optimizer.step()
        return float(loss.detach()) * float(counts) / max(float(b.loss_mask.sum()), 1.0)

    def _reduce_grads_over_dp(self) -> None:
        g = dp_group()
        if dist.get_world_size(g) == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([x.reshape(-1) for x in grads])
        dist.all_reduce(flat, group=g)  # weights hold the global normaliser: sum, not mean
        off = 0
        for x in grads:
            n = x.numel()
            x.copy_(flat[off: off + n].view_as(x))
            off += n

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm over all model-parallel shards (TP duplicates counted once); clip to max_norm."""
        from megatron.core import parallel_state as mps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        params = [p for p in self.model.parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            if param_is_not_tensor_parallel_duplicate(p) or mps.get_tensor_model_parallel_rank() == 0:
                sq += p.grad.detach().double().pow(2).sum()
        mp_group = mps.get_model_parallel_group()
        if dist.get_world_size(mp_group) > 1:
            dist.all_reduce(sq, group=mp_group)
        norm = float(sq.sqrt())
        if max_norm and max_norm > 0 and math.isfinite(norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for p in params:
                p.grad.mul_(scale)
        return norm

    # ---------------------------------------------------------------------------------- weights
    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}

    def load_weights_from(self, other: "Policy") -> None:
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), other.model.parameters()):
                p.copy_(q)


def _accumulate_stats(sums: Dict[str, float], out, mb: SeqBatch, spec: LossSpec) -> None:
    from ..algo.loss import clipped_pg_loss

    dev = out.logp.device
    m, old, adv = mb.field("loss_mask", dev), mb.field("old_logp", dev), mb.field("advantages", dev)
    _, clo, chi = clipped_pg_loss(out.logp, old, adv, spec.eps_low, spec.eps_high, spec.dual_clip, spec.ratio_log_clamp)
    log_ratio = (out.logp - old).clamp(-spec.ratio_log_clamp, spec.ratio_log_clamp)
    add = {
        "tokens": float(m.sum()),
        "loss": float(out.loss.detach()),
        "entropy_sum": float((out.entropy * m).sum()),
        "clip_low_sum": float((clo.float() * m).sum()),
        "clip_high_sum": float((chi.float() * m).sum()),
        # k3 estimate of KL(pi_old || pi) from samples of pi_old
        "approx_kl_old_sum": float(((torch.exp(log_ratio) - 1 - log_ratio) * m).sum()),
    }
    if out.kl is not None:
        add["kl_ref_sum"] = float((out.kl * m).sum())
    for k, v in add.items():
        sums[k] = sums.get(k, 0.0) + v


def _finish_stats(sums: Dict[str, float]) -> Dict[str, float]:
    n = max(sums.get("tokens", 0.0), 1.0)
    out = {"loss": sums.get("loss", 0.0), "entropy": sums.get("entropy_sum", 0.0) / n,
           "clip_frac_low": sums.get("clip_low_sum", 0.0) / n, "clip_frac_high": sums.get("clip_high_sum", 0.0) / n,
           "approx_kl_old": sums.get("approx_kl_old_sum", 0.0) / n, "tokens": sums.get("tokens", 0.0)}
    if "kl_ref_sum" in sums:
        out["kl_ref"] = sums["kl_ref_sum"] / n
    return out
