"""Rollout engines behind one protocol: the embedded Megatron engine and a TensorRT-LLM engine refit in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    n: int = 1  # samples per prompt
    greedy: bool = False
    seed: int = 0
    # one seed per prompt: prompt i's samples then draw from their own stream, whatever else shares the call
    seeds: Optional[Sequence[int]] = None

    def check(self, n_prompts: int) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seeds is not None and len(self.seeds) != n_prompts:
            raise ValueError(f"SamplingParams.seeds holds {len(self.seeds)} seeds for {n_prompts} prompts")

    def stream(self, prompt_index: int, sample: int) -> Tuple[int, int]:
        """The (seed, counter) that sample ``sample`` of prompt ``prompt_index`` draws its tokens from: with
        per-prompt ``seeds``, (seeds[prompt_index], sample), so the prompt's samples do not depend on the other
        prompts of the call; else (seed, the rollout's index in the call, prompt_index * n + sample)."""
        if self.seeds is not None:
            return int(self.seeds[prompt_index]), sample
        return int(self.seed), prompt_index * self.n + sample


@dataclass
class Rollout:
    """One sampled response."""

    prompt_index: int  # index into the prompt list given to generate
    prompt_ids: List[int]
    response_ids: List[int]  # includes the end-of-sequence token when it was produced
    logprobs: List[float]  # sampling log-probs (of the temperature-scaled, untruncated distribution)
    finished: bool  # True when a stop token (EOS or another end token) was produced within max_new_tokens
    extra: dict = field(default_factory=dict)


def each_rollout(calls: Sequence[Tuple[List[List[int]], SamplingParams]]):
    """The rollouts of ``generate_many``'s calls in their order (call by call, prompt-major), as
    (call, prompt's index in its call, sample, prompt, params); each engine lays its requests out from this."""
    for c, (prompts, params) in enumerate(calls):
        for i, p in enumerate(prompts):
            for s in range(params.n):
                yield c, i, s, p, params


@runtime_checkable
class Engine(Protocol):
    def generate(self, prompts: List[List[int]], params: SamplingParams,
                 on_finish: Optional[Callable[[int, Rollout], None]] = None) -> List[Rollout]:
        """``params.n`` rollouts per prompt, ordered prompt-major (prompt 0's n samples first);
        ``on_finish(index, rollout)``, when given, for each rollout as soon as it has finished."""

    def generate_many(self, calls: Sequence[Tuple[List[List[int]], SamplingParams]],
                      on_finish: Optional[Callable[[int, int, Rollout], None]] = None) -> List[List[Rollout]]:
        """Several ``generate`` calls [(prompts, params)] decoded together; one list of rollouts per call, each as
        ``generate`` returns it; ``on_finish(call, index, rollout)``."""

    def update_weights(self, step: Optional[int] = None) -> None:
        """Make the engine sample from the trainer's current weights."""

    def sleep(self) -> None:
        """Release generation memory (KV cache) while the trainer runs."""

    def wake(self) -> None:
        """Re-acquire what sleep released."""

    def close(self) -> None:
        """Stop what the engine started (worker processes); the engine is not used after."""


def build_engine(cfg, policy, tokenizer) -> Engine:
    name = cfg.rollout.engine
    if name == "megatron":
        from .megatron_engine import MegatronEngine

        return MegatronEngine(policy, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                              batch_size=cfg.rollout.batch_size, compact_every=cfg.rollout.compact_every,
                              lean_decode=cfg.rollout.lean_decode, stop_ids=tokenizer.stop_ids,
                              continuous=cfg.rollout.continuous_batching,
                              kv_cache_fraction=cfg.rollout.kv_cache_fraction,
                              decode_attention=cfg.rollout.decode_attention,
                              prefill_tokens=cfg.rollout.prefill_tokens, cuda_graphs=cfg.rollout.cuda_graphs)
    if name == "trtllm":
        from .trtllm_engine import build_trtllm_engine

        return build_trtllm_engine(cfg, policy, tokenizer)
    raise ValueError(f"rollout.engine must be 'megatron' or 'trtllm', got {name!r}")
