"""The embedded rollout engine: KV-cached sampling with the policy's own Megatron weights.

Prompts are left-padded so that every row decodes in lock-step; padded key positions are masked.
RoPE makes attention depend only on position differences, so left padding changes nothing but
rounding.  The KV cache is Megatron's ``StaticInferenceContext``.  Under tensor parallelism every TP
rank runs the same forward on the same prompts, gathers the logits, and draws with a generator
seeded identically on all ranks, so all ranks produce identical tokens.

Under pipeline parallelism each stage runs its own layers with its own KV cache: the first stage
embeds the tokens, every stage but the last sends its hidden states [s, b, h] to the next one (prefill,
then one token per step), and the last stage samples and broadcasts the drawn tokens and their
log-probs to its pipeline, so every rank of every stage returns the same rollouts.

Under ``parallel.sequence_parallel`` the engine samples with sequence parallelism switched off: a decode
step has one token per row, which cannot be split over the TP ranks, so every TP rank runs the whole
(short) sequence as plain tensor parallelism does; the trainer's passes keep it.

Rows that have finished leave the decode batch: once at least ``1/compact_every`` of the rows still in
the KV cache have drawn a stop token (EOS or another end token), the cache keeps only the running rows
(a copy of their filled positions), so the forward of every later step runs on those rows alone.  In RL the response lengths
are spread over the whole budget, and without this every row would be decoded until the longest
finishes.  Sampling still draws for all rows (finished ones from placeholder logits), so the random
stream, and with it every row's tokens, does not depend on when rows leave.

Decode steps (one token per row) skip Megatron's module plumbing when the model allows it
(``lean_decode``, the local layer spec of the Qwen2 / Qwen3 / Llama shape): each layer is its norms, four
matmuls, the rotation of the new query and key, the KV-cache write and the same SDPA call, with the
same TP reductions; the embedding, norms, attention module and output layer are Megatron's own
modules, called directly.  A GPU decodes a small-batch model host-bound (one token per row per step,
every layer's kernels launched from Python), so the host time per layer is the decode rate: with
compute made negligible (tiny layers, one CPU thread) a step took 1.5-1.9x less time this way
(docs/benchmarks.md).  The prefill stays on Megatron's forward (one call per batch).  Same tokens
and log-probs as Megatron's path, bit for bit (tests/test_spine.py, tests/test_sequence_parallel.py
at TP=2 and TP=2 x PP=2).

Under ``model.fp8`` the engine samples with FP8 switched off (the parameters' own dtype): FP8 GEMMs need
token counts divisible by 16 and a decode step has one token per row; the trainer's FP8 forward
recomputes the old-policy log-probs that the loss uses.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch

import torch.distributed as dist

from . import Rollout, SamplingParams


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    drop = cum - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return out / out.sum(-1, keepdim=True)


@contextlib.contextmanager
def _fp8_off(config):
    """Megatron enters its FP8 context on every forward while ``config.fp8`` is set (the TransformerConfig
    that all modules share): unset it for the duration."""
    saved = getattr(config, "fp8", None)
    if not saved:
        yield
        return
    config.fp8 = None
    try:
        yield
    finally:
        config.fp8 = saved


def lean_decode_unsupported(model) -> Optional[str]:
    """Why the engine's lean decode step cannot stand in for this model's forward (None: it can).  It covers
    the local layer spec of the Qwen2 / Qwen3 / Llama shape: torch RMSNorm (q/k norms too, when present), SDPA
    core attention, rotary positions, grouped-query attention with whole query groups per TP rank, a SwiGLU
    MLP, no MoE."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayer

    import megatron.core.transformer.attention as mattention

    from ..models import rope
    from ..models.attention import SDPAttention

    cfg = model.config
    checks = [
        # the prefill (Megatron's forward) must store its keys rotated, as the lean steps do
        (mattention.Attention._adjust_key_value_for_inference is rope.adjust_key_value_rotating_once,
         "megaprorl.models.rope is not installed (keys are cached unrotated)"),
        (getattr(model, "position_embedding_type", None) == "rope", "positions are not plain RoPE"),
        (not cfg.apply_rope_fusion and not cfg.rotary_interleaved and not cfg.multi_latent_attention
         and not cfg.flash_decode, "fused, interleaved or latent RoPE, or flash decode"),
        (cfg.gated_linear_unit and cfg.activation_func_clamp_value is None, "the MLP is not a plain GLU"),
        (not cfg.num_moe_experts, "mixture of experts"),
        (cfg.num_query_groups % cfg.tensor_model_parallel_size == 0, "query groups split across TP ranks"),
        (not getattr(cfg, "attention_output_gate", False), "gated attention output"),
    ]
    for layer in getattr(getattr(model, "decoder", None), "layers", []):
        att = layer.self_attention
        checks += [
            (type(layer) is TransformerLayer, f"layer type {type(layer).__name__}"),
            (isinstance(att.core_attention, SDPAttention), "core attention is not SDPAttention (local spec)"),
            (all(n is None or isinstance(n, (IdentityOp, torch.nn.RMSNorm)) for n in (att.q_layernorm, att.k_layernorm)),
             "q/k norms are not torch RMSNorm"),
            (isinstance(layer.input_layernorm, torch.nn.RMSNorm)
             and isinstance(layer.pre_mlp_layernorm, torch.nn.RMSNorm), "norms are not torch RMSNorm"),
            (hasattr(layer.mlp, "linear_fc1") and hasattr(layer.mlp, "linear_fc2"), "the MLP is not Megatron's MLP"),
        ]
    for ok, why in checks:
        if not ok:
            return why
    return None


@contextlib.contextmanager
def _sequence_parallel_off(model):
    """Megatron reads sequence parallelism from the shared TransformerConfig (embedding scatter, block RNG
    fork) and from attributes that layers copy at build time: ``sequence_parallel`` on each parallel linear
    layer (all-gather of its input / reduce-scatter of its output) and ``reduce_scatter_embeddings`` on the
    embeddings (reduce-scatter instead of all-reduce of the vocab-parallel lookup).  Unset them all for the
    duration (no-grad forwards only: the layers' gradient reductions are decided at build time too)."""
    flipped = {}
    for m in model.modules():
        for obj, name in ((getattr(m, "config", None), "sequence_parallel"), (m, "sequence_parallel"),
                          (m, "reduce_scatter_embeddings")):
            if getattr(obj, name, None) is True:
                flipped[id(obj), name] = obj
    flipped = [(obj, name) for (_, name), obj in flipped.items()]
    for obj, name in flipped:
        setattr(obj, name, False)
    try:
        yield
    finally:
        for obj, name in flipped:
            setattr(obj, name, True)


class MegatronEngine:
    def __init__(self, policy, eos_id: int, pad_id: int, batch_size: int = 64, compact_every: int = 8,
                 lean_decode: bool = True, stop_ids: Sequence[int] = ()):
        """A response ends at ``eos_id`` or any of ``stop_ids`` (the token is kept in the response).
        ``compact_every``: drop finished rows from the KV cache once they are at least 1/compact_every
        of the rows in it (each drop copies the running rows' cache once); 0 never drops them.
        ``lean_decode``: decode steps through ``_lean_stage`` where ``lean_decode_unsupported`` finds
        nothing against it (else, and with False, through Megatron's forward)."""
        self.policy = policy
        self.eos_id, self.pad_id = eos_id, pad_id
        self.stop_ids = sorted({int(eos_id), *(int(i) for i in stop_ids)})
        self.batch_size = batch_size
        self.compact_every = int(compact_every)
        self.lean_decode = bool(lean_decode) and lean_decode_unsupported(policy.model) is None
        self.stats = {"decode_row_steps": 0, "dense_row_steps": 0, "compactions": 0}  # of the last generate()
        self.weights_version = 0
        self._awake = True
        self.pp = int(getattr(policy.pcfg, "pipeline_parallel", 1))

    # The engine shares the policy's parameters, so new weights are visible at once.
    def update_weights(self, step: Optional[int] = None) -> None:
        self.weights_version = step if step is not None else self.weights_version + 1

    def sleep(self) -> None:
        self._awake = False

    def wake(self) -> None:
        self._awake = True

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], params: SamplingParams) -> List[Rollout]:
        if not self._awake:
            raise RuntimeError("engine is asleep; call wake() before generate()")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt given to the rollout engine")
        expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(params.n)]
        gen = torch.Generator(device=self.policy.device)
        gen.manual_seed(int(params.seed))
        self.stats = dict.fromkeys(self.stats, 0)
        out: List[Rollout] = []
        model = self.policy.model
        was_training = model.training
        model.eval()
        try:
            with _fp8_off(model.config), _sequence_parallel_off(model):
                for s in range(0, len(expanded), self.batch_size):
                    out.extend(self._generate_batch(expanded[s: s + self.batch_size], params, gen))
        finally:
            model.train(was_training)
        return out

    def _forward(self, tokens, pos, mask, ctx, lean: bool = False):
        """This stage's forward (Megatron's, or with ``lean`` a decode step through ``_lean_stage``); returns
        the gathered logits [b, s, V] on the last stage, None on the others."""
        model = self.policy.model
        if self.pp == 1:
            if lean:
                return self._lean_stage(tokens, pos, mask, ctx, None, True, True)
            return model(tokens, pos, mask, inference_context=ctx, runtime_gather_output=True)
        from megatron.core import parallel_state as mps

        dtype = model.config.pipeline_dtype or model.config.params_dtype
        first, last = mps.is_pipeline_first_stage(), mps.is_pipeline_last_stage()
        hidden = None
        if not first:
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size, dtype=dtype,
                                 device=self.policy.device)
            dist.recv(hidden, src=mps.get_pipeline_model_parallel_prev_rank())
        if lean:
            out = self._lean_stage(tokens, pos, mask, ctx, hidden, first, last)
        else:
            if hidden is not None:
                model.set_input_tensor(hidden)
            out = model(tokens if first else None, pos, mask, inference_context=ctx, runtime_gather_output=True)
        if last:
            return out
        dist.send(out.to(dtype).contiguous(), dst=mps.get_pipeline_model_parallel_next_rank())
        return None

    def _lean_stage(self, tokens, pos, mask, ctx, hidden, first: bool, last: bool):
        """One decode step of this stage's layers, as Megatron's forward computes it (same modules for the
        embedding, norms, core attention and output layer; the linear layers as their no-grad forward:
        matmul, bias, TP all-reduce of the row-parallel ones), without its plumbing.  ``hidden`` [1, b, h]
        from the previous stage when not ``first``.  Returns logits [b, 1, V] when ``last``, else hidden."""
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
        from megatron.core.transformer.enums import AttnMaskType

        from ..models.rope import attention_factor, rotate_bshd

        model = self.policy.model
        cfg = model.config
        x = model.embedding(input_ids=tokens, position_ids=pos) if first else hidden  # [1, b, h]
        b, cur = x.shape[1], ctx.sequence_len_offset
        freqs = model.rotary_pos_emb(ctx.max_sequence_length)[cur: cur + 1]  # the table Megatron's path uses
        mscale = attention_factor(cfg)  # YaRN's scale of cos and sin (1 otherwise), as Megatron's attention applies

        def linear(layer, inp, reduce):
            out = torch.matmul(inp, layer.weight.t())
            if reduce:
                out = reduce_from_tensor_model_parallel_region(out)
            return out if layer.bias is None else out + layer.bias

        for layer in model.decoder.layers:
            att, mlp = layer.self_attention, layer.mlp
            ng, hn = att.num_query_groups_per_partition, att.hidden_size_per_attention_head
            npg = att.num_attention_heads_per_partition // ng
            qkv = linear(att.linear_qkv, layer.input_layernorm(x), False).view(1, b, ng, (npg + 2) * hn)
            q, k, v = torch.split(qkv, [npg * hn, hn, hn], dim=3)
            q = q.reshape(1, b, -1, hn)
            if isinstance(att.q_layernorm, torch.nn.RMSNorm):  # Qwen3's per-head norms, before RoPE as Megatron's
                q, k = att.q_layernorm(q), att.k_layernorm(k)
            q = rotate_bshd(q, freqs, cfg, mscale)
            k = rotate_bshd(k, freqs, cfg, mscale)  # stored rotated, as megaprorl.models.rope makes Megatron's path store it
            key_mem, val_mem = ctx.key_value_memory_dict[att.layer_number]
            key_mem[cur: cur + 1, :b] = k
            val_mem[cur: cur + 1, :b] = v
            o = att.core_attention(q, key_mem[: cur + 1, :b], val_mem[: cur + 1, :b], mask,
                                   attn_mask_type=AttnMaskType.no_mask)
            x = x + linear(att.linear_proj, o, True)
            gate, up = torch.chunk(linear(mlp.linear_fc1, layer.pre_mlp_layernorm(x), False), 2, dim=-1)
            x = x + linear(mlp.linear_fc2, cfg.activation_func(gate) * (up + cfg.glu_linear_offset), True)
        if not last:
            return x
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(model.decoder.final_layernorm(x), weight=weight, runtime_gather_output=True)
        return logits.transpose(0, 1)

    def _from_last_stage(self, nxt, lp, B):
        """The last stage's drawn tokens and log-probs, on every stage of the pipeline (one broadcast)."""
        if self.pp == 1:
            return nxt, lp
        from megatron.core import parallel_state as mps

        buf = torch.empty(2, B, dtype=torch.float64, device=self.policy.device)  # ids < 2^53: exact
        if nxt is not None:
            buf[0], buf[1] = nxt, lp
        dist.broadcast(buf, src=mps.get_pipeline_model_parallel_last_rank(),
                       group=mps.get_pipeline_model_parallel_group())
        return buf[0].long(), buf[1].float()

    def _generate_batch(self, items, params: SamplingParams, gen: torch.Generator) -> List[Rollout]:
        from megatron.core.inference.contexts import StaticInferenceContext

        device = self.policy.device
        B = len(items)
        P = max(len(p) for _, p in items)
        N = params.max_new_tokens
        total = P + N
        tokens = torch.full((B, total), self.pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(B, total, dtype=torch.bool, device=device)
        for b, (_, p) in enumerate(items):
            tokens[b, P - len(p): P] = torch.tensor(p, dtype=torch.long)
            valid[b, P - len(p):] = True
        pos = torch.arange(total, device=device)[None].expand(B, -1)
        # Megatron's masks: True = masked.  Prefill [B, 1, P, P]: causal within each row's prompt, the
        # left padding hidden (a padded query position attends to itself only, so no row is all -inf).
        # Decode [B, 1, 1, t]: only the left padding is hidden (one query sees every earlier key).  No
        # [total, total] mask is ever built: at 1K + 8K tokens and 512 rows that alone is 43 GB.
        causal = torch.tril(torch.ones(P, P, dtype=torch.bool, device=device))
        allowed = causal[None] & valid[:, None, :P]
        allowed |= torch.eye(P, dtype=torch.bool, device=device)[None] & ~valid[:, :P, None]
        prefill_mask = ~allowed[:, None]
        del causal, allowed
        pad_mask = ~valid[:, None, None, :]

        ctx = StaticInferenceContext(B, total)
        logits = self._forward(tokens[:, :P], pos[:, :P], prefill_mask, ctx)
        del prefill_mask
        ctx.sequence_len_offset += P
        done = torch.zeros(B, dtype=torch.bool, device=device)
        resp = [[] for _ in range(B)]
        lps = [[] for _ in range(B)]
        finished = [False] * B
        rows = None  # the batch rows in the KV cache, in cache order (None: all B, unpermuted)
        pending = n_finished = 0  # finished rows still in the KV cache; all finished rows
        stops, stop_t = set(self.stop_ids), torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        for t in range(N):
            nxt = lp = None
            if logits is not None:  # this rank holds the last pipeline stage
                z = logits[:, -1, : self.policy.vocab_size].float()
                if rows is not None:  # finished rows draw from placeholder logits: the same random stream
                    z = z.new_zeros(B, z.shape[1]).index_copy_(0, rows, z)
                nxt, lp = self._sample(z, params, gen)
            nxt, lp = self._from_last_stage(nxt, lp, B)
            nxt_l, lp_l = nxt.tolist(), lp.tolist()  # the step's device->host copies (``done`` = ``finished``)
            for b in range(B):
                if not finished[b]:
                    resp[b].append(nxt_l[b])
                    lps[b].append(lp_l[b])
                    if nxt_l[b] in stops:
                        finished[b] = True
                        pending += 1
                        n_finished += 1
            if n_finished == B or t == N - 1:  # counted on the host: no device sync
                break
            done |= torch.isin(nxt, stop_t)
            cur = P + t
            tokens[:, cur] = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            if self._should_compact(pending, B if rows is None else len(rows)):
                rows, pending = self._compact(ctx, rows, done, cur), 0
            step = (slice(None) if rows is None else rows, slice(cur, cur + 1))
            logits = self._forward(tokens[step], pos[step], pad_mask[step[0], ..., : cur + 1], ctx, self.lean_decode)
            ctx.sequence_len_offset += 1
            self.stats["decode_row_steps"] += B if rows is None else len(rows)
            self.stats["dense_row_steps"] += B
        if self.pp > 1:
            self.policy.model.set_input_tensor(None)
        return [Rollout(prompt_index=i, prompt_ids=list(p), response_ids=resp[b], logprobs=lps[b], finished=finished[b])
                for b, (i, p) in enumerate(items)]

    def _should_compact(self, pending: int, in_cache: int) -> bool:
        return self.compact_every > 0 and pending > 0 and pending * self.compact_every >= in_cache

    def _compact(self, ctx, rows, done, cur: int):
        """Drop the finished rows from the KV cache; returns the batch rows left in it (cache order).
        Every rank and stage holds the same ``done``, so all compact alike."""
        base = torch.arange(len(done), device=done.device) if rows is None else rows
        keep_pos = (~done[base]).nonzero().squeeze(1)
        for layer, kv in ctx.key_value_memory_dict.items():
            ctx.key_value_memory_dict[layer] = tuple(self._cache_rows(m, keep_pos, cur) for m in kv)
        self.stats["compactions"] += 1
        return base[keep_pos]

    @staticmethod
    def _cache_rows(mem: torch.Tensor, keep: torch.Tensor, filled: int) -> torch.Tensor:
        """A KV cache buffer [max_seq, rows, ...] with only the ``keep`` rows, their first ``filled``
        positions copied (the later ones are written by the coming steps)."""
        out = mem.new_empty(mem.shape[0], len(keep), *mem.shape[2:])
        out[:filled] = mem[:filled].index_select(1, keep)
        return out

    @staticmethod
    def _sample(z: torch.Tensor, params: SamplingParams, gen: torch.Generator):
        """Next tokens and their log-probs from fp32 logits [B, V] (padded vocabulary columns removed)."""
        if params.greedy or params.temperature == 0.0:
            logp_all = torch.log_softmax(z, -1)
            nxt = z.argmax(-1)
        else:
            logp_all = torch.log_softmax(z / params.temperature, -1)
            probs = _top_p_filter(logp_all.exp(), params.top_p)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        return nxt, logp_all.gather(-1, nxt[:, None]).squeeze(-1)
