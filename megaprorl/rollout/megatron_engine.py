"""The embedded rollout engine: KV-cached sampling with the policy's own Megatron weights.

Prompts are left-padded so that every row decodes in lock-step; padded key positions are masked.
RoPE makes attention depend only on position differences, so left padding changes nothing but
rounding.  The KV cache is Megatron's ``StaticInferenceContext``.  Under tensor parallelism every TP
rank runs the same forward on the same prompts, gathers the logits, and draws with a generator
seeded identically on all ranks, so all ranks produce identical tokens.
"""

from __future__ import annotations

from typing import List, Optional

import torch

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


class MegatronEngine:
    def __init__(self, policy, eos_id: int, pad_id: int, batch_size: int = 64):
        self.policy = policy
        self.eos_id, self.pad_id = eos_id, pad_id
        self.batch_size = batch_size
        self.weights_version = 0
        self._awake = True

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
        out: List[Rollout] = []
        model = self.policy.model
        was_training = model.training
        model.eval()
        try:
            for s in range(0, len(expanded), self.batch_size):
                out.extend(self._generate_batch(expanded[s: s + self.batch_size], params, gen))
        finally:
            model.train(was_training)
        return out

    def _generate_batch(self, items, params: SamplingParams, gen: torch.Generator) -> List[Rollout]:
        from megatron.core.inference.contexts import StaticInferenceContext

        model = self.policy.model
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
        logits = model(tokens[:, :P], pos[:, :P], prefill_mask, inference_context=ctx, runtime_gather_output=True)
        del prefill_mask
        ctx.sequence_len_offset += P
        done = torch.zeros(B, dtype=torch.bool, device=device)
        resp = [[] for _ in range(B)]
        lps = [[] for _ in range(B)]
        finished = [False] * B
        for t in range(N):
            z = logits[:, -1, : self.policy.vocab_size].float()  # padded vocabulary rows are never drawn
            if params.greedy or params.temperature == 0.0:
                logp_all = torch.log_softmax(z, -1)
                nxt = z.argmax(-1)
            else:
                logp_all = torch.log_softmax(z / params.temperature, -1)
                probs = _top_p_filter(logp_all.exp(), params.top_p)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            lp = logp_all.gather(-1, nxt[:, None]).squeeze(-1)
            nxt_l, lp_l, done_l = nxt.tolist(), lp.tolist(), done.tolist()  # one device->host copy per step
            for b in range(B):
                if not done_l[b]:
                    resp[b].append(nxt_l[b])
                    lps[b].append(lp_l[b])
                    if nxt_l[b] == self.eos_id:
                        finished[b] = True
            done |= nxt == self.eos_id
            if bool(done.all()) or t == N - 1:
                break
            cur = P + t
            tokens[:, cur] = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            logits = model(tokens[:, cur: cur + 1], pos[:, cur: cur + 1], pad_mask[..., : cur + 1],
                           inference_context=ctx, runtime_gather_output=True)
            ctx.sequence_len_offset += 1
        return [Rollout(prompt_index=i, prompt_ids=list(p), response_ids=resp[b], logprobs=lps[b], finished=finished[b])
                for b, (i, p) in enumerate(items)]
