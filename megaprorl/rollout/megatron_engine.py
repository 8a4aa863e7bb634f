"""The embedded rollout engine: KV-cached sampling with the policy's own Megatron weights.

Prompts prefilled together are left-padded; padded key positions are masked.  RoPE makes attention
depend only on position differences, so left padding changes nothing but rounding.  The KV cache is
the buffers of a Megatron ``StaticInferenceContext`` (keys stored rotated).  Under tensor parallelism
every TP rank runs the same forward on the same prompts, gathers the logits, and draws with the same
uniforms, so all ranks produce identical tokens.

Under pipeline parallelism each stage runs its own layers with its own KV cache: the first stage
embeds the tokens, every stage but the last sends its hidden states [s, b, h] to the next one (prefill,
then one token per step), and the last stage samples and broadcasts the drawn tokens and their
log-probs to its pipeline, so every rank of every stage returns the same rollouts.

Under ``parallel.sequence_parallel`` the engine samples with sequence parallelism switched off: a decode
step has one token per row, which cannot be split over the TP ranks, so every TP rank runs the whole
(short) sequence as plain tensor parallelism does; the trainer's passes keep it.

The decode batch is a KV cache of ``batch_size`` rows.  Continuous batching (the default): rows decode at
their own positions, and once at least ``1/compact_every`` of them have drawn a stop token (EOS or another
end token) or reached the budget, the next waiting rollouts are prefilled into those rows (one forward
for the new rows, on a cache of their own whose keys and values are then copied in) while the others go
on decoding; the n samples of a prompt share one prefill row.  When no rollout waits, finished rows
leave the cache instead (a copy of the running rows' filled positions), so later steps run on the
running rows alone.  In RL the response lengths spread over the whole budget: lock-step batches decode
every row until the longest finishes and then start the tail again with every new batch.  Rows at
different positions need the lean decode step below (Megatron's own decode writes every row at one
offset); without it (or with ``compact_every=0``) the engine decodes lock-step batches, dropping their
finished rows the same way.

Every token is drawn by inverting its (temperature-scaled, top-p filtered) distribution's CDF at a
uniform that is a hash of (seed, rollout index, token index), so a rollout's tokens are a function of
the seed, its index and the weights: the same whatever the batch size, schedule or pipeline layout
(up to the rounding of batched matmuls).  With per-prompt seeds (``SamplingParams.seeds``), the pair is
(the prompt's seed, the sample's index among its prompt's), so a prompt's samples are also the same
whichever other prompts share the call (the evaluation sets share calls so).

Decode steps (one token per row) skip Megatron's module plumbing when the model allows it
(``lean_decode``, the local layer spec of the Qwen2 / Qwen3 / Llama shape): each layer is its norms, four
matmuls, the rotation of the new query and key, the KV-cache write and the same SDPA call, with the
same TP reductions (an MoE model's MLP: Megatron's MoE layer, called as its module); the embedding,
norms, attention module and output layer are Megatron's own modules, called directly.  A GPU decodes a small-batch model host-bound (one token per row per step,
every layer's kernels launched from Python), so the host time per layer is the decode rate: with
compute made negligible (tiny layers, one CPU thread) a step took 1.5-1.9x less time this way
(docs/benchmarks.md).  The prefill stays on Megatron's forward (one call per admission).  Same tokens
and log-probs as Megatron's path, bit for bit (tests/test_spine.py, tests/test_sequence_parallel.py
at TP=2 and TP=2 x PP=2).  On TransformerEngine's layer spec the linear layers (their norms fused in)
are TE's modules, called as modules, and the attention over the cache is the same SDPA call (or the
Triton kernel) in place of TE's core attention, so TE models get continuous batching too.  Only the
local spec has run here; tests/test_spine.py runs the lean step with every linear layer called as a
module, and tests/test_te_gpu.py has the TE case for a GPU.

The lean step's attention over the cache (``decode_attention``): ``sdpa`` gives the core attention module
the cache's first span positions (the furthest row's position + 1) and a mask, so every row reads the
whole span; ``triton`` runs ``triton_kernels.decode_attention``, where each row reads only its own keys
(``start`` to its position), once per query group.  The stats ``keys_span`` / ``keys_own`` count the two.

With ``cuda_graphs`` (and the Triton attention) each KV cache's decode step is captured once as a CUDA graph
and replayed for every later step of that cache (``_StepGraph``): the rows' tokens, positions and first key
positions are copied into the graph's input buffers, and the kernel reads each row's extent on the device, with
its split plan fixed for the cache's length.  A compaction (new tensors, fewer rows) or a new cache captures
anew; the stat ``graphs`` counts the captures.  Sampling stays outside the graph.

Under ``model.fp8`` the engine samples with FP8 switched off (the parameters' own dtype): FP8 GEMMs need
token counts divisible by 16 and a decode step has one token per row; the trainer's FP8 forward
recomputes the old-policy log-probs that the loss uses.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import torch.distributed as dist

from ..config import DECODE_ATTENTION
from ..parallel import max_over, wide_expert_group
from . import Rollout, SamplingParams, each_rollout


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
    the Qwen2 / Qwen3 / Llama shape on the local layer spec (torch RMSNorm, q/k norms too when present, SDPA
    core attention) and on TransformerEngine's (norms fused into the linear layers, TE's core attention,
    which the lean step replaces by SDPA or the Triton kernel on the same cache): rotary positions,
    grouped-query attention with whole query groups per TP rank, a SwiGLU MLP or Megatron's MoE layer (called as
    its module), no sliding window."""
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
        (cfg.num_query_groups % cfg.tensor_model_parallel_size == 0, "query groups split across TP ranks"),
        (not getattr(cfg, "attention_output_gate", False), "gated attention output"),
        (getattr(cfg, "window_size", None) is None and getattr(cfg, "softmax_type", "vanilla") == "vanilla"
         and not cfg.apply_query_key_layer_scaling, "sliding-window, off-by-one or layer-scaled softmax attention"),
    ]
    for layer in getattr(getattr(model, "decoder", None), "layers", []):
        att = layer.self_attention
        checks += [
            (type(layer) is TransformerLayer, f"layer type {type(layer).__name__}"),
            (isinstance(att.core_attention, SDPAttention) or type(att.core_attention).__name__ == "TEDotProductAttention",
             "core attention is neither SDPAttention (local spec) nor TransformerEngine's"),
            (all(n is None or isinstance(n, (IdentityOp, torch.nn.RMSNorm)) or type(n).__name__ == "RMSNorm"
                 for n in (att.q_layernorm, att.k_layernorm)), "q/k norms are not RMSNorm"),
            (type(layer.mlp).__name__ == "MoELayer" if cfg.num_moe_experts else
             hasattr(layer.mlp, "linear_fc1") and hasattr(layer.mlp, "linear_fc2"),
             "the MLP is neither Megatron's MLP nor its MoE layer"),
        ]
        pairs = [(layer.input_layernorm, att.linear_qkv)]
        if cfg.num_moe_experts:  # the router's norm is its own module in both specs (torch's or TE's RMSNorm)
            checks.append((type(layer.pre_mlp_layernorm).__name__ == "RMSNorm", "the MoE layer's norm is not RMSNorm"))
        else:
            pairs.append((layer.pre_mlp_layernorm, getattr(layer.mlp, "linear_fc1", None)))
        for norm, lin in pairs:
            # a torch RMSNorm before a linear layer, or TE's linear layer with its norm fused in
            fused = hasattr(lin, "layer_norm_weight")
            checks.append((isinstance(norm, torch.nn.RMSNorm) and not fused or isinstance(norm, IdentityOp) and fused,
                           "norms are neither torch RMSNorm nor fused into TransformerEngine's linear layers"))
    for ok, why in checks:
        if not ok:
            return why
    return None


def _raw_linear_types():
    """Megatron's own (local-spec) linear layers, which the lean step runs as their no-grad forward (matmul,
    bias, TP all-reduce) without the module call; any other linear layer (TE's) is called as a module."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return (ColumnParallelLinear, RowParallelLinear)


def _softmax_scale(core_attention, head_dim: int) -> float:
    scale = getattr(core_attention, "softmax_scale", None)
    return float(scale) if scale is not None else head_dim ** -0.5


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


# of the last generate(): rollouts, rows of the first KV cache, the bytes of the largest on this rank,
# generated tokens (a rollout's first comes from its prefill, each later one from a decode step that ran its
# row), decode steps (forwards), the rows they ran (running or finished, until refilled or dropped), what
# lock-step batches without dropping would run, prefill rows (distinct prompts per admission) and their padded
# tokens, admissions (rows refilled together), prefills (their forwards: more than admissions under
# prefill_tokens), compactions
# graphs: decode-step graphs built (rollout.cuda_graphs: one per cache, a new one after each compaction)
# keys_span: key positions a masked SDPA decode step reads (every row over the furthest row's span), summed over
# steps and rows; keys_own: those each row attends to (its own extent), what decode_attention='triton' reads
_STATS = ("rollouts", "rows", "kv_cache_bytes", "tokens", "decode_steps", "decode_row_steps", "dense_row_steps",
          "prefill_rows", "prefill_tokens", "admissions", "prefills", "compactions", "keys_span", "keys_own",
          "graphs", "idle_forwards")


class _Extents:
    """A decode step's attention extents for the Triton kernel, instead of a mask: row r attends to the cache
    positions start[r] <= s < end[r]; ``longest`` = max(end - start) (host-side, saves the kernel a sync)."""

    def __init__(self, start: torch.Tensor, end: torch.Tensor, longest: int):
        self.start, self.end, self.longest = start, end, longest


_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers whose every output bit depends on every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def draw_uniform(seed: int, rollout: int, t: int) -> float:
    """The uniform in [0, 1) (53 bits) that draws token ``t`` of rollout ``rollout`` of a ``generate`` call under
    ``seed``: a counter-based stream, so a rollout's tokens are a function of the seed, its index and the
    weights alone, not of which rows it shared a decode batch with or when they left or joined."""
    h = _mix64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _M64)
    h = _mix64((h ^ (rollout * 0xD1B54A32D192ED03 + 0x8CB92BA72F3D8DD7)) & _M64)
    h = _mix64((h ^ (t * 0xAEF17502108EF2D9 + 0x9E6C63D0676A9A99)) & _M64)
    return (h >> 11) * 2.0 ** -53


def _cuda_free_memory() -> Optional[int]:
    """Bytes free on the current CUDA device, counting what torch's caching allocator holds unused (None
    without CUDA: no limit)."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())


def _engine_context(rows: int, seq: int):
    """A Megatron static inference context whose masks the attention must apply as given (see
    ``megaprorl.models.rope.adjust_key_value_rotating_once``)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    ctx = StaticInferenceContext(rows, seq)
    ctx.explicit_masks = True
    return ctx


class _Cache:
    """The decode batch: a KV cache of ``rows`` rows and ``seq`` positions per layer ([seq, rows, groups,
    head dim], keys rotated), and per row the rollout in it (-1: free), its first valid key position
    (``start``: left padding before it) and the position of its next token (``pos``)."""

    def __init__(self, rows: int, seq: int):
        self.ctx = _engine_context(rows, seq)  # Megatron's forward reads its buffers and offset
        self.graph: Optional[_StepGraph] = None  # its decode step, captured (rollout.cuda_graphs)
        self.item = [-1] * rows
        self.start = [0] * rows
        self.pos = [0] * rows

    @property
    def rows(self) -> int:
        return len(self.item)

    def free(self) -> List[int]:
        return [r for r, i in enumerate(self.item) if i < 0]

    def live(self) -> List[int]:
        return [r for r, i in enumerate(self.item) if i >= 0]


class _StepGraph:
    """One cache's decode step as a CUDA graph (``cuda_graphs``): the lean stage with the Triton attention, on
    static input buffers (each row's last token, its position and its first key position), with the kernel's
    split plan fixed for the cache's length, so one capture serves every step of the cache's life (its rows,
    tensors and shapes stay until a compaction makes new ones).  A GPU decodes a small model host-bound, every
    layer's kernels launched from Python; a replay launches them all at once.  Each row's extent is read on the
    device, so nothing of a step's host state is baked into the graph.  The logits come back in the graph's
    output buffer, valid until the next replay.  Without CUDA (tests) the same function runs eagerly on the
    same buffers."""

    def __init__(self, engine: "MegatronEngine", cache: _Cache, pool):
        dev = engine.policy.device
        self.tokens = torch.zeros(cache.rows, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(cache.rows, 1, dtype=torch.long, device=dev)
        self.start = torch.zeros(cache.rows, dtype=torch.long, device=dev)
        self._engine, self._cache, self._pool = engine, cache, pool
        self._graph = None
        self._out = None

    def _run(self) -> torch.Tensor:
        e, ctx = self._engine, self._cache.ctx
        extents = _Extents(self.start, self.pos[:, 0] + 1, ctx.max_sequence_length)  # plan: the cache's length
        logits = e._lean_stage(self.tokens, self.pos, extents, ctx, None, True, True)
        return logits[:, -1, : e.policy.vocab_size].float()

    def __call__(self, tokens: List[int], pos: List[int], start: List[int]) -> torch.Tensor:
        """One step: the rows' last tokens, positions and first key positions copied from the host into the
        input buffers, then the graph (or, without CUDA, its function) run; returns the logits [rows, V]."""
        for buf, values in ((self.tokens, tokens), (self.pos, pos), (self.start, start)):
            buf.copy_(torch.tensor(values, dtype=torch.long).view(buf.shape))
        if self.tokens.device.type != "cuda":
            return self._run()
        if self._graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compiles, the GEMM libraries choose their kernels
                self._run()  # (it writes this step's keys and values, which the replay writes again alike)
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (NCCL's watchdog) may touch CUDA while this one captures
            with torch.cuda.graph(self._graph, pool=self._pool, capture_error_mode="thread_local"):
                self._out = self._run()
        self._graph.replay()
        return self._out


class MegatronEngine:
    def __init__(self, policy, eos_id: int, pad_id: int, batch_size: int = 64, compact_every: int = 8,
                 lean_decode: bool = True, stop_ids: Sequence[int] = (), continuous: bool = True,
                 kv_cache_fraction: float = 0.0, free_memory: Optional[Callable[[], Optional[int]]] = None,
                 decode_attention: str = "sdpa", prefill_tokens: int = 0, cuda_graphs: bool = False):
        """A response ends at ``eos_id`` or any of ``stop_ids`` (the token is kept in the response).
        ``batch_size``: rows decoded together.  ``compact_every``: act on finished rows once they are at
        least 1/compact_every of the rows in the KV cache: with ``continuous`` batching and rollouts still
        waiting, prefill waiting rollouts into their rows; otherwise drop them from the cache (each drop
        copies the running rows' cache once); 0 never acts (every batch decodes in lock-step to its
        longest row).  ``lean_decode``: decode steps through ``_lean_stage`` where
        ``lean_decode_unsupported`` finds nothing against it (else, and with False, through Megatron's
        forward, which decodes every row at one position, so continuous batching needs the lean step).
        ``kv_cache_fraction`` > 0: at most the rows whose KV cache fits in that fraction of ``free_memory()``
        (bytes free on the device when a cache is made; default: CUDA's free memory, None on a CPU: no
        limit), the smallest count over the model-parallel group so that every stage and TP rank agrees.
        ``decode_attention``: the lean decode step's attention over the cache: ``sdpa`` (the core attention
        module with a mask over the furthest row's span) or ``triton`` (``triton_kernels.decode_attention``:
        each row reads its own keys, once per query group; CUDA, or the CPU under TRITON_INTERPRET=1).
        ``prefill_tokens`` > 0: an admission's prefill runs in forwards of at most that many padded tokens
        (distinct prompts x the admission's longest), which bounds its activations and mask; 0: one forward.
        ``cuda_graphs``: the lean decode steps replay a CUDA graph, one per cache (``_StepGraph``); needs
        ``decode_attention='triton'``, a CUDA device and one pipeline stage; off where the model does not take
        the lean step."""
        self.policy = policy
        self.eos_id, self.pad_id = eos_id, pad_id
        self.stop_ids = sorted({int(eos_id), *(int(i) for i in stop_ids)})
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"rollout batch_size must be >= 1, got {batch_size}")
        self.compact_every = int(compact_every)
        self.lean_decode = bool(lean_decode) and lean_decode_unsupported(policy.model) is None
        self.continuous = bool(continuous) and self.lean_decode and self.compact_every > 0
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"rollout.decode_attention must be one of {DECODE_ATTENTION}, got {decode_attention!r}")
        self.decode_attention = decode_attention if self.lean_decode else "sdpa"  # Megatron's forward: its own
        if self.decode_attention == "triton":
            # a config this machine cannot run: ConfigError, the CLI's clean error naming the key
            from ..config import ConfigError

            try:
                from triton_kernels.decode_attention import FEATURE, INSTEAD
                from triton_kernels.policy_loss import TritonUnavailable, check_device
            except ImportError as e:
                raise ConfigError(f"config key 'rollout.decode_attention': triton: the triton_kernels package does "
                                  f"not import ({e}); use 'sdpa'") from None
            try:
                check_device(torch.empty(0, device=policy.device), FEATURE, INSTEAD)
            except TritonUnavailable as e:
                raise ConfigError(f"config key 'rollout.decode_attention': {e}") from None
        self.cuda_graphs = bool(cuda_graphs) and self.lean_decode
        self.pp = int(getattr(policy.pcfg, "pipeline_parallel", 1))
        if self.cuda_graphs:
            from ..config import ConfigError, cuda_graphs_problem

            why = cuda_graphs_problem(self.decode_attention, self.pp, policy.model.config.num_moe_experts or 0)
            if why is not None:
                raise ConfigError(f"config key 'rollout.cuda_graphs': {why}")
            if policy.device.type != "cuda":
                raise ConfigError(f"config key 'rollout.cuda_graphs': CUDA graphs need a CUDA device; the model is "
                                  f"on {policy.device}")
        self._graph_pool = None  # the memory pool that a generate() call's step graphs share
        # the experts spread over data-parallel replicas: every forward is matched over this group (_any_forward)
        self._expert_group = wide_expert_group()
        # an MoE policy built with routing replay: record the experts each rollout's tokens went to, as
        # Rollout.extra["routing"] [len - 1, this stage's MoE layers, k] (algo.moe_routing_replay)
        self.record_routing = False
        self._routing_log: Optional[list] = None  # (rollout ids, positions, experts) per forward, while recording
        self.kv_cache_fraction = float(kv_cache_fraction)
        self.prefill_tokens = int(prefill_tokens)
        if self.prefill_tokens < 0:
            raise ValueError(f"rollout.prefill_tokens must be >= 0, got {prefill_tokens}")
        self.free_memory = free_memory if free_memory is not None else _cuda_free_memory
        self.stats = dict.fromkeys(_STATS, 0)  # of the last generate()
        self.weights_version = 0
        self._awake = True

    # The engine shares the policy's parameters, so new weights are visible at once.
    def update_weights(self, step: Optional[int] = None) -> None:
        self.weights_version = step if step is not None else self.weights_version + 1

    def sleep(self) -> None:
        self._awake = False

    def wake(self) -> None:
        self._awake = True

    def close(self) -> None:
        """Nothing to stop: the engine runs in the trainer's processes, on the policy's own weights."""

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], params: SamplingParams,
                 on_finish: Optional[Callable[[int, Rollout], None]] = None,
                 claim: Optional[Callable[[int], List[int]]] = None) -> List[Rollout]:
        """``params.n`` rollouts per prompt, prompt-major; ``on_finish(index, rollout)`` is called for each as
        soon as it has finished (a stop token or the budget), in the order they finish, so that its scoring
        can start while the others decode.

        ``claim`` (prompts shared by the data-parallel ranks, ``rollout.share_prompts_over_dp``): decode only the
        prompts that ``claim(k)`` hands out (up to ``k`` indices into ``prompts`` each call; fewer once they run
        out), asked for whenever rows are free and no claimed rollout waits, so a rank whose rollouts finish
        sooner takes more prompts.  Returns the claimed prompts' rollouts, prompt-major in claim order, each
        with its index into ``prompts``.  Every rank of a model-parallel group must be handed the same indices."""
        self._check_call(prompts, params)
        items, streams, pidx, _, _ = self._flatten([] if claim is not None else [(prompts, params)])
        pull = None if claim is None or not prompts else \
            (lambda k: [(i, list(prompts[i])) for i in claim(-(-k // params.n)) for _ in range(params.n)])
        return self._run(items, [params], pidx, streams, on_finish, pull, max((len(p) for p in prompts), default=0))

    @torch.no_grad()
    def generate_many(self, calls: Sequence[Tuple[List[List[int]], SamplingParams]],
                      on_finish: Optional[Callable[[int, int, Rollout], None]] = None) -> List[List[Rollout]]:
        """Several ``generate`` calls decoded together through one KV cache: ``calls`` [(prompts, params)], each
        with its own sampling settings and token budget.  Returns one list per call, as ``generate(prompts,
        params)`` returns it: the same tokens and log-probs, since each rollout draws from its own stream and its
        rows' results do not depend on the others in the cache.  ``on_finish(call, index, rollout)`` as each
        finishes.  The calls share one admission order and one tail (the last long rollouts decoding with most
        rows empty), where one call after another has a tail each: an evaluation's greedy and sampled sets.
        Lock-step batching (``continuous=False``) decodes the calls one after another: a batch lasts as long as
        its longest rollout, so mixing budgets in a batch would only lengthen it."""
        calls = [(prompts, params) for prompts, params in calls]
        for prompts, params in calls:  # every call checked before any is decoded
            self._check_call(prompts, params)
        if not self.continuous:
            out, stats = [], dict.fromkeys(_STATS, 0)
            for c, (prompts, params) in enumerate(calls):
                cb = None if on_finish is None else (lambda k, r, c=c: on_finish(c, k, r))
                out.append(self.generate(prompts, params, on_finish=cb))
                for key, v in self.stats.items():
                    stats[key] = max(stats[key], v) if key in ("rows", "kv_cache_bytes") else stats[key] + v
            self.stats = stats
            return out
        items, streams, pidx, where, local = self._flatten(calls)
        cb = None if on_finish is None else (lambda k, r: on_finish(where[k][0], where[k][1], r))
        flat = self._run(items, [params for _, params in calls], pidx, streams, cb, None,
                         max((len(p) for prompts, _ in calls for p in prompts), default=0), local)
        out: List[List[Rollout]] = [[None] * (len(prompts) * params.n) for prompts, params in calls]
        for (c, j), r in zip(where, flat):
            out[c][j] = r
        return out

    @staticmethod
    def _flatten(calls):
        """The rollouts of ``calls`` [(prompts, params)] in decode order (call by call, prompt-major): their items
        (prompt index, prompt ids), the index being unique over the calls (each prompt of each call has its own
        prefill); their streams; their call; their (call, place in the call's list); their prompt's index in
        its call."""
        items, streams, pidx, where, local = [], [], [], [], []
        base = [0]  # each call's first prompt's index over the calls
        for prompts, _ in calls:
            base.append(base[-1] + len(prompts))
        for c, i, s, p, params in each_rollout(calls):
            items.append((base[c] + i, list(p)))
            streams.append(params.stream(i, s))
            pidx.append(c)
            where.append((c, i * params.n + s))
            local.append(i)
        return items, streams, pidx, where, local

    def _check_call(self, prompts: List[List[int]], params: SamplingParams) -> None:
        if not self._awake:
            raise RuntimeError("engine is asleep; call wake() before generate()")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt given to the rollout engine")
        params.check(len(prompts))

    def _run(self, items, plist: List[SamplingParams], pidx: List[int], streams, on_finish, pull, longest: int,
             local: Optional[List[int]] = None) -> List[Rollout]:
        """The body of ``generate`` and ``generate_many``: decode ``items`` (``_decode``) with the model in eval
        mode, FP8 and sequence parallelism off, MoE routing recorded when asked; the call's stats."""
        self.stats = dict.fromkeys(_STATS, 0)
        if not items and pull is None:
            if self._expert_group is not None:  # nothing to decode here: run the forwards the others need
                was_training = self.policy.model.training
                self.policy.model.eval()
                try:
                    with _fp8_off(self.policy.model.config), _sequence_parallel_off(self.policy.model):
                        self._drain()
                finally:
                    self.policy.model.train(was_training)
            return []
        model = self.policy.model
        was_training = model.training
        model.eval()
        try:
            replay = getattr(self.policy, "routing_replay", None) if self.record_routing else None
            if self.record_routing and replay is None:
                raise ValueError("record_routing needs an MoE policy built with routing_replay=True")
            if replay is not None:
                replay.record()
                self._routing_log = []
            with _fp8_off(model.config), _sequence_parallel_off(model):
                out = self._decode(items, plist, pidx, streams, on_finish, pull, longest, local)
                self._drain()
            if replay is not None:
                self._attach_routing(out, replay.layers)
        finally:
            model.train(was_training)
            if self._routing_log is not None:
                self.policy.routing_replay.clear()
                self._routing_log = None
            self._graph_pool = None  # the call's graphs went with its caches
            if self.pp > 1:
                model.set_input_tensor(None)
        self.stats["rollouts"] = len(out)
        lens, rows = [len(r.response_ids) for r in out], self.stats["rows"]
        self.stats["dense_row_steps"] = sum(len(c) * (max(c) - 1)
                                            for c in (lens[s: s + rows] for s in range(0, len(lens), max(rows, 1))))
        return out

    def _any_forward(self, mine: bool) -> bool:
        """Experts across data-parallel replicas (``parallel.wide_expert_group``): whether any rank of the expert
        group has a forward to run now.  Every forward of the engine, real or idle, follows this call on every
        rank of the group, so the MoE layers' token exchanges pair up one forward with one forward."""
        return max_over(int(mine), self._expert_group, self.policy.device) > 0

    def _drain(self) -> None:
        """After this rank's last forward of a generate() call: idle forwards (one pad token) while any other rank
        of the expert group still decodes.  Without such a group: nothing."""
        if self._expert_group is None:
            return
        model, dev = self.policy.model, self.policy.device
        tok = torch.full((1, 1), int(self.pad_id), dtype=torch.long, device=dev)
        pos = torch.zeros(1, 1, dtype=torch.long, device=dev)
        while self._any_forward(False):
            self.stats["idle_forwards"] += 1
            model(tok, pos, self.policy._attn_mask(1, dev))

    def _forward(self, tokens, pos, mask, ctx, lean: bool = False):
        """This stage's forward (Megatron's, or with ``lean`` a decode step through ``_lean_stage``); returns
        the gathered logits [b, s, V] on the last stage, None on the others."""
        if self._expert_group is not None:
            self._any_forward(True)
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
        from the previous stage when not ``first``; ``pos`` [b, 1] each row's position (rows decode at their own
        positions: the new keys are written there, ``mask`` [b, 1, 1, span] hides the keys a row does not
        see; or the rows' ``_Extents`` for the Triton kernel).  Returns logits [b, 1, V] when ``last``, else hidden."""
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
        from megatron.core.transformer.enums import AttnMaskType

        from megatron.core.transformer.identity_op import IdentityOp

        from ..models.attention import SDPAttention, sdpa_sbhd
        from ..models.rope import attention_factor, rotate_bshd

        if isinstance(mask, _Extents):
            from triton_kernels.decode_attention import decode_attention

        model = self.policy.model
        cfg = model.config
        x = model.embedding(input_ids=tokens, position_ids=pos) if first else hidden  # [1, b, h]
        b, p = x.shape[1], pos[:, 0]  # each row's position
        rows = torch.arange(b, device=p.device)
        table = model.rotary_pos_emb(ctx.max_sequence_length)  # [seq, 1, 1, d]: the table Megatron's path uses
        freqs = table.index_select(0, p).view(1, b, 1, table.shape[-1])
        mscale = attention_factor(cfg)  # YaRN's scale of cos and sin (1 otherwise), as Megatron's attention applies

        raw = _raw_linear_types()

        def linear(layer, inp, reduce):
            if type(layer) in raw:
                out = torch.matmul(inp, layer.weight.t())
                if reduce:
                    out = reduce_from_tensor_model_parallel_region(out)
                return out if layer.bias is None else out + layer.bias
            out, bias = layer(inp)  # TE's: the module (its fused norm, its TP communication)
            return out if bias is None else out + bias

        for layer in model.decoder.layers:
            att, mlp = layer.self_attention, layer.mlp
            ng, hn = att.num_query_groups_per_partition, att.hidden_size_per_attention_head
            npg = att.num_attention_heads_per_partition // ng
            qkv = linear(att.linear_qkv, layer.input_layernorm(x), False).view(1, b, ng, (npg + 2) * hn)
            q, k, v = torch.split(qkv, [npg * hn, hn, hn], dim=3)
            q = q.reshape(1, b, -1, hn)
            if att.q_layernorm is not None and not isinstance(att.q_layernorm, IdentityOp):  # Qwen3's per-head norms,
                # before RoPE as Megatron's
                q, k = att.q_layernorm(q), att.k_layernorm(k)
            q = rotate_bshd(q, freqs, cfg, mscale)
            k = rotate_bshd(k, freqs, cfg, mscale)  # stored rotated, as megaprorl.models.rope makes Megatron's path store it
            key_mem, val_mem = ctx.key_value_memory_dict[att.layer_number]
            key_mem.index_put_((p, rows), k[0])
            val_mem.index_put_((p, rows), v[0])
            if isinstance(mask, _Extents):  # each row's own keys, through the Triton kernel
                o = decode_attention(q[0], key_mem, val_mem, mask.start, mask.end, _softmax_scale(att.core_attention, hn),
                                     max_len=mask.longest).view(1, b, -1)
            else:
                span = mask.shape[-1]  # the keys up to the furthest row's position; the mask hides the rest
                if isinstance(att.core_attention, SDPAttention):
                    o = att.core_attention(q, key_mem[:span], val_mem[:span], mask, attn_mask_type=AttnMaskType.no_mask)
                else:  # TE's core attention: the same SDPA call on the cache
                    o = sdpa_sbhd(q, key_mem[:span], val_mem[:span], mask, _softmax_scale(att.core_attention, hn))
            x = x + linear(att.linear_proj, o, True)
            if cfg.num_moe_experts:  # Megatron's MoE layer, as a module: its router, dispatch and experts
                out, bias = mlp(layer.pre_mlp_layernorm(x))
                x = x + (out if bias is None else out + bias)
                continue
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

    def _decode(self, items, plist: List[SamplingParams], pidx: List[int], streams, on_finish=None, pull=None,
                longest: int = 0, local: Optional[List[int]] = None) -> List[Rollout]:
        """Every rollout of ``items`` ([(prompt index, prompt ids)], in order) decoded through one KV cache of
        at most ``batch_size`` rows: rollouts enter it in order when rows are free (a prefill per
        admission), leave it at a stop token or its token budget.  Item ``k`` samples with ``plist[pidx[k]]``
        from ``streams[k]``; its rollout's ``prompt_index`` is ``local[k]`` (default: its prompt index).
        ``pull(rows)``: more items (sampled with ``plist[0]``), asked for when rows could take them and none
        waits, until it gives none (``generate``'s ``claim``); ``longest``: the longest prompt it may give."""
        device = self.policy.device
        items, pidx, streams = list(items), list(pidx), list(streams)
        budget = [int(plist[c].max_new_tokens) for c in pidx]
        N = max([int(p.max_new_tokens) for p in plist])  # the KV cache's room for responses
        resp = [[] for _ in items]
        lps = [[] for _ in items]
        out: List[Optional[Rollout]] = [None] * len(items)
        stops = set(self.stop_ids)
        longest = max([longest] + [len(p) for _, p in items])
        nxt_item = 0  # the next rollout to enter the cache
        cache: Optional[_Cache] = None
        z = None  # the last stage's logits [rows, V] for each row's next token
        last = []  # each row's last token (the next decode step's input)
        while True:
            live = [] if cache is None else cache.live()
            admit = not live or (self.continuous and self._acts(len(cache.free()), cache.rows))
            if pull is not None and admit and nxt_item == len(items):  # claim rollouts for the free rows
                new = pull(self.batch_size if not live else len(cache.free()))
                if not new:
                    pull = None  # none left to claim: from here on as if all had been given at the start
                for k, (i, p) in enumerate(new):  # whole prompts, their n samples in a row
                    streams.append(plist[0].stream(i, k % plist[0].n))
                    pidx.append(0)
                    budget.append(int(plist[0].max_new_tokens))
                    items.append((i, p))
                    resp.append([])
                    lps.append([])
                    out.append(None)
            if nxt_item < len(items) and admit:
                if not live:  # a new cache: the first batch (in lock-step batching, every batch)
                    rows = min(self.batch_size, len(items) - nxt_item)
                    batch = range(nxt_item, nxt_item + rows)
                    seq = (longest + N if self.continuous else max(len(items[k][1]) + budget[k] for k in batch))
                    rows = self._rows_that_fit(rows, seq)
                    if not self.continuous:  # the batch's own longest prompt and budget
                        seq = max(len(items[k][1]) + budget[k] for k in range(nxt_item, nxt_item + rows))
                    self.stats["rows"] = self.stats["rows"] or rows
                    self.stats["kv_cache_bytes"] = max(self.stats["kv_cache_bytes"], rows * self.kv_bytes_per_row(seq))
                    cache, z, last = _Cache(rows, seq), None, [self.pad_id] * rows
                slots = cache.free()[: len(items) - nxt_item]
                z = self._admit(cache, slots, list(range(nxt_item, nxt_item + len(slots))), items, z)
                nxt_item += len(slots)
                live = cache.live()
            if not live:
                break
            # draw each running row's next token (the last stage draws; its pipeline receives them)
            nxt = lp = None
            if z is not None:
                nxt, lp = self._sample_rows(z, live, [cache.item[r] for r in live], plist, pidx, streams, resp)
            nxt, lp = self._from_last_stage(nxt, lp, len(live))
            nxt_l, lp_l = nxt.tolist(), lp.tolist()  # the step's device->host copy
            self.stats["tokens"] += len(live)
            for r, tok, l in zip(live, nxt_l, lp_l):
                k = cache.item[r]
                resp[k].append(tok)
                lps[k].append(l)
                last[r] = tok
                if tok in stops or len(resp[k]) == budget[k]:
                    out[k] = Rollout(prompt_index=items[k][0] if local is None else local[k],
                                     prompt_ids=list(items[k][1]), response_ids=resp[k],
                                     logprobs=lps[k], finished=tok in stops)
                    if on_finish is not None:
                        on_finish(k, out[k])
                    cache.item[r] = -1
                    last[r] = self.pad_id
                    if self.continuous:  # a free row attends to its position 0 only until it is refilled
                        cache.start[r] = cache.pos[r] = 0
            live = cache.live()
            if not live:
                continue  # the next batch, or the end
            free = cache.rows - len(live)
            waiting = nxt_item < len(items) or pull is not None
            if free and (not waiting or not self.continuous) and self._acts(free, cache.rows):
                last, z = self._compact(cache, last), None
            z = self._step(cache, last)
            if self._routing_log is not None:  # the tokens just fed: each live row's last, at its position
                rows = cache.live()
                ids = [cache.item[r] for r in rows]
                pos = [len(items[k][1]) + len(resp[k]) - 1 for k in ids]
                rec = self.policy.routing_replay.recorded()  # [rows of the cache, layers, k]
                self._routing_log.append((torch.tensor(ids), torch.tensor(pos),
                                          rec.index_select(0, torch.tensor(rows, device=rec.device)).to(torch.int16)))
        return out

    def _attach_routing(self, out: List[Rollout], n_layers: int) -> None:
        """Each rollout's recorded experts, from the prefills' and steps' records: ``extra["routing"]``
        [len(prompt) + len(response) - 1, layers, k] int16 on the CPU (every token but the last, which no forward
        was fed)."""
        log = self._routing_log
        ids = torch.cat([e[0] for e in log])
        pos = torch.cat([e[1] for e in log])
        rec = torch.cat([e[2].cpu() for e in log])
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=len(out)).tolist()
        for k, (sel, r) in enumerate(zip(torch.split(order, counts), out)):
            n = len(r.prompt_ids) + len(r.response_ids) - 1
            routing = torch.full((n, n_layers, rec.shape[-1]), -1, dtype=torch.int16)
            p = pos[sel]
            keep = p < n  # a position past the end: none (a finished row is not fed again)
            routing[p[keep]] = rec[sel][keep]
            missing = int((routing[:, 0, 0] < 0).sum())
            if missing:
                raise RuntimeError(f"rollout {k}: the engine recorded no routing for {missing} of its {n} fed tokens")
            r.extra["routing"] = routing

    def kv_bytes_per_row(self, seq: int) -> int:
        """Bytes of one row's KV cache of ``seq`` positions on this rank (its stage's layers, its query groups)."""
        model = self.policy.model
        dtype = model.config.params_dtype
        per_position = sum(2 * layer.self_attention.num_query_groups_per_partition
                           * layer.self_attention.hidden_size_per_attention_head for layer in model.decoder.layers)
        return per_position * seq * torch.empty((), dtype=dtype).element_size()

    def _rows_that_fit(self, rows: int, seq: int) -> int:
        """``rows``, or fewer under ``kv_cache_fraction`` (the minimum over the model-parallel group)."""
        free = self.free_memory() if self.kv_cache_fraction > 0 else None
        per_row = self.kv_bytes_per_row(seq)
        fit = rows if free is None else min(rows, int(self.kv_cache_fraction * free) // max(per_row, 1))
        if self.kv_cache_fraction > 0 and dist.is_initialized():  # the same config on every rank
            from megatron.core import parallel_state as mps

            t = torch.tensor([fit], dtype=torch.long, device=self.policy.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=mps.get_model_parallel_group())
            fit = int(t)
        if fit < 1:
            raise RuntimeError(
                f"rollout.kv_cache_fraction={self.kv_cache_fraction} of the "
                f"{'?' if free is None else f'{free / 2**30:.2f}'} GiB free holds no "
                f"row of the embedded engine's KV cache ({per_row / 2**20:.1f} MiB per row of {seq} positions on this "
                "rank, or on another rank of its model-parallel group): raise rollout.kv_cache_fraction, lower "
                "rollout.max_new_tokens, or spread the layers over more ranks")
        return fit

    def _acts(self, free: int, rows: int) -> bool:
        """Whether ``free`` finished rows of ``rows`` are enough to refill or drop them."""
        return self.compact_every > 0 and free > 0 and free * self.compact_every >= rows

    def _admit(self, cache: _Cache, slots: List[int], new: List[int], items, z):
        """Prefill rollouts ``new`` into the free rows ``slots`` of ``cache``: each distinct prompt once (the
        n samples of a prompt share its prefill), through Megatron's forward on a cache of their own, whose
        keys and values are then copied into the rows; with ``prefill_tokens``, in chunks of at most that many
        padded tokens (every chunk padded to the admission's longest prompt, so the rows' positions do not
        depend on the chunking).  Returns the logits with the new rows' filled in."""
        device = self.policy.device
        first = {}  # prompt index -> its row in the prefill
        for k in new:
            first.setdefault(items[k][0], len(first))
        prompts = [None] * len(first)
        for k in new:
            prompts[first[items[k][0]]] = items[k][1]
        P = max(len(p) for p in prompts)
        u = len(prompts)
        per = max(1, self.prefill_tokens // P) if self.prefill_tokens > 0 else u  # distinct prompts per forward
        kv = cache.ctx.key_value_memory_dict
        for c0 in range(0, u, per):
            chunk = prompts[c0: c0 + per]
            rows = [i for i, k in enumerate(new) if c0 <= first[items[k][0]] < c0 + per]
            src = torch.tensor([first[items[new[i]][0]] - c0 for i in rows], device=device)
            slot_t = torch.tensor([slots[i] for i in rows], device=device)
            logits, ctx = self._prefill(chunk, P)
            if self._routing_log is not None:  # each new rollout's prompt tokens (not the left padding)
                rec = self.policy.routing_replay.recorded()
                rec = rec.view(P, len(chunk), *rec.shape[1:])  # the routers' order: [P, prompts] flattened
                for i in rows:
                    k = new[i]
                    n = len(items[k][1])
                    self._routing_log.append((torch.full((n,), k), torch.arange(n),
                                              rec[P - n:, first[items[k][0]] - c0].cpu().to(torch.int16)))
            for layer, mems in ctx.key_value_memory_dict.items():
                if layer not in kv:  # zeros: rows attend over positions other rows filled, masked but finite
                    kv[layer] = tuple(m.new_zeros(cache.ctx.max_sequence_length, cache.rows, *m.shape[2:]) for m in mems)
                for dst, m in zip(kv[layer], mems):
                    dst[:P].index_copy_(1, slot_t, m.index_select(1, src))
            del ctx
            self.stats["prefills"] += 1
            if logits is not None:  # the last pipeline stage
                new_z = logits[:, -1, : self.policy.vocab_size].float().index_select(0, src)
                if z is None:
                    z = new_z.new_zeros(cache.rows, new_z.shape[1])
                z.index_copy_(0, slot_t, new_z)
        for r, k in zip(slots, new):
            cache.item[r] = k
            cache.start[r], cache.pos[r] = P - len(items[k][1]), P
        self.stats["admissions"] += 1
        self.stats["prefill_rows"] += u
        self.stats["prefill_tokens"] += u * P
        return z

    def _prefill(self, prompts: List[List[int]], P: int):
        """One Megatron forward over ``prompts`` left-padded to ``P`` on an inference context of their own:
        (logits [b, P, V] on the last stage, else None; the context, whose cache holds their keys and values)."""
        device = self.policy.device
        u = len(prompts)
        tokens = torch.full((u, P), self.pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(u, P, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            tokens[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[b, P - len(p):] = True
        # Megatron's masks: True = masked.  Causal within each row's prompt, the left padding hidden (a
        # padded query position attends to itself only, so no row is all -inf).
        allowed = torch.tril(torch.ones(P, P, dtype=torch.bool, device=device))[None] & valid[:, None, :]
        allowed |= torch.eye(P, dtype=torch.bool, device=device)[None] & ~valid[:, :, None]
        pos = torch.arange(P, device=device)[None].expand(u, -1)
        ctx = _engine_context(u, P)
        return self._forward(tokens, pos, ~allowed[:, None], ctx), ctx

    def _step(self, cache: _Cache, last: List[int]):
        """One decode step of every row of the cache (each at its own position: through the lean stage, or its
        CUDA graph; all at one: through Megatron's forward, which writes the cache at ``sequence_len_offset``)."""
        device = self.policy.device
        R = cache.rows
        self.stats["keys_span"] += R * (max(cache.pos) + 1)
        self.stats["keys_own"] += sum(cache.pos) - sum(cache.start) + R
        if self.cuda_graphs:
            if cache.graph is None:
                if self._graph_pool is None and device.type == "cuda":
                    self._graph_pool = torch.cuda.graph_pool_handle()
                cache.graph = _StepGraph(self, cache, self._graph_pool)
                self.stats["graphs"] += 1
            z = cache.graph(last, cache.pos, cache.start)
        else:
            tokens = torch.tensor(last, dtype=torch.long, device=device)[:, None]
            pos = torch.tensor(cache.pos, dtype=torch.long, device=device)
            start = torch.tensor(cache.start, dtype=torch.long, device=device)
            if self.decode_attention == "triton":
                mask = _Extents(start, pos + 1, max(p - s for p, s in zip(cache.pos, cache.start)) + 1)
            else:
                span = torch.arange(max(cache.pos) + 1, device=device)[None]
                mask = ~((span >= start[:, None]) & (span <= pos[:, None]))[:, None, None, :]  # True = masked
            if not self.lean_decode:
                assert len(set(cache.pos)) == 1, "Megatron's forward decodes every row at one position"
                cache.ctx.sequence_len_offset = cache.pos[0]
            logits = self._forward(tokens, pos[:, None], mask, cache.ctx, self.lean_decode)
            z = None if logits is None else logits[:, -1, : self.policy.vocab_size].float()
        for r in range(R):
            if cache.item[r] >= 0 or not self.continuous:
                cache.pos[r] += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_row_steps"] += R
        return z

    def _compact(self, cache: _Cache, last: List[int]) -> List[int]:
        """Drop the free rows from the KV cache (a copy of the running rows' filled positions).  Every rank
        and stage holds the same rows, so all compact alike.  Returns the running rows' last tokens."""
        keep = cache.live()
        keep_t = torch.tensor(keep, device=self.policy.device)
        filled = max(cache.pos[r] for r in keep)
        kv = cache.ctx.key_value_memory_dict
        for layer, mems in kv.items():
            kv[layer] = tuple(self._cache_rows(m, keep_t, filled) for m in mems)
        cache.item, cache.start, cache.pos = ([v[r] for r in keep] for v in (cache.item, cache.start, cache.pos))
        cache.ctx.max_batch_size = len(keep)
        cache.graph = None  # new tensors and fewer rows: the next step builds its graph anew
        self.stats["compactions"] += 1
        return [last[r] for r in keep]

    @staticmethod
    def _cache_rows(mem: torch.Tensor, keep: torch.Tensor, filled: int) -> torch.Tensor:
        """A KV cache buffer [max_seq, rows, ...] with only the ``keep`` rows, their first ``filled``
        positions copied (the later ones, zeros, are written by the coming steps)."""
        out = mem.new_zeros(mem.shape[0], len(keep), *mem.shape[2:])
        out[:filled] = mem[:filled].index_select(1, keep)
        return out

    def _sample_rows(self, z: torch.Tensor, live: List[int], ks: List[int], plist: List[SamplingParams],
                     pidx: List[int], streams, resp) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next token and its log-prob of each running row ``live`` (rollout ``ks[j]`` in row ``live[j]``),
        each drawn from the row's logits with its rollout's sampling settings at its stream's next uniform: one
        draw per settings among the rows (every row of a ``generate`` call shares one)."""
        device = self.policy.device
        u = torch.tensor([draw_uniform(*streams[k], len(resp[k])) for k in ks], dtype=torch.float64, device=device)
        groups = sorted({pidx[k] for k in ks})
        rows = z.index_select(0, torch.tensor(live, device=device))
        if len(groups) == 1:
            return self._sample(rows, plist[groups[0]], u)
        nxt = torch.empty(len(live), dtype=torch.long, device=device)
        lp = torch.empty(len(live), dtype=torch.float32, device=device)
        for c in groups:
            js = torch.tensor([j for j, k in enumerate(ks) if pidx[k] == c], device=device)
            n_c, lp_c = self._sample(rows.index_select(0, js), plist[c], u.index_select(0, js))
            nxt.index_copy_(0, js, n_c)
            lp.index_copy_(0, js, lp_c.to(lp.dtype))
        return nxt, lp

    @staticmethod
    def _sample(z: torch.Tensor, params: SamplingParams, u: torch.Tensor):
        """Next tokens and their log-probs from fp32 logits [B, V] (padded vocabulary columns removed), each row
        drawn by inverting its (top-p filtered) distribution's CDF at its uniform ``u`` (float64 [B])."""
        if params.greedy or params.temperature == 0.0:
            logp_all = torch.log_softmax(z, -1)
            nxt = z.argmax(-1)
        else:
            logp_all = torch.log_softmax(z / params.temperature, -1)
            cdf = torch.cumsum(_top_p_filter(logp_all.exp(), params.top_p).double(), -1)
            total = cdf[:, -1:]
            x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
            # the first token whose CDF exceeds x: x < the total, so one does, and its probability is > 0
            nxt = torch.searchsorted(cdf, x, right=True).squeeze(-1)
        return nxt, logp_all.gather(-1, nxt[:, None]).squeeze(-1)
