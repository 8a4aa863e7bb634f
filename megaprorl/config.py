"""Typed configuration: dataclasses, loaded from YAML with dotted command-line overrides.

    cfg = load_config("examples/demo.yaml", ["algo.kl.coef=1e-4", "train.steps=10"])

An unknown or misspelled key is an error naming it and the nearest valid key; a value of the wrong
type names the key and the expected type.  One config object is passed down; there are no globals.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf  # noqa: F401
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .algo.dynamic_sampling import DynamicSamplingConfig
from .algo.entropy_control import EntropyControlConfig
from .algo.length_penalty import LengthPenaltyConfig, OverlongPenaltyConfig
from .algo.loss import AGGREGATIONS, RATIO_LEVELS
from .algo.reset import ReferenceResetConfig
from .algo.rollout_correction import LEVELS as RC_LEVELS
from .algo.rollout_correction import MODES as RC_MODES
from .algo.rollout_correction import RolloutCorrectionConfig
from .data.sources import DataSourceConfig, EvalSetConfig
from .rewards import RewardConfig


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the key (and file) at fault."""


DECODE_ATTENTION = ("sdpa", "triton")  # rollout.decode_attention's choices, for the config check and the engine's


def cuda_graphs_problem(decode_attention: str, pipeline_parallel: int, num_experts: int = 0):
    """Why ``rollout.cuda_graphs`` cannot run with these settings (None: it can), for the config check at load
    time and the engine's, which guards callers that build one directly."""
    if num_experts:
        return ("an MoE model's decode step (model.num_experts) has shapes that depend on the routing (the "
                "tokens each expert receives), which a CUDA graph cannot replay; set rollout.cuda_graphs=false")
    if decode_attention != "triton":
        return ("needs rollout.decode_attention=triton (a step of fixed shapes; the SDPA path's span grows with the "
                "rows' positions)")
    if pipeline_parallel > 1:
        return ("the pipeline-parallel decode step is not captured; set parallel.pipeline_parallel=1 or "
                "rollout.cuda_graphs=false")
    return None


def require_wandb() -> None:
    """``logging.wandb_project`` needs wandb: a ConfigError naming the key and the install when it is missing
    (checked when a config is loaded, and by ``RunLogger`` for callers that build one directly)."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("config key 'logging.wandb_project': wandb is not installed (pip install wandb, or "
                          "pip install -e .[wandb])")


@dataclass
class RopeScalingConfig:
    """HF config.json's ``rope_scaling``, same names: none, ``linear`` (positions / factor), Llama-3.x's
    ``llama3`` (defaults: Llama-3.1's; Llama-3.2 has factor 32) or ``yarn`` (Qwen3 / Qwen2.5 beyond their
    32K: factor 4, original_max_position_embeddings 32768)."""
    rope_type: str = ""  # "" (none) | linear | llama3 | yarn
    factor: float = 8.0
    low_freq_factor: float = 1.0  # llama3 only, as the next one
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192  # llama3 and yarn
    beta_fast: float = 32.0  # yarn only, as the next four
    beta_slow: float = 1.0
    mscale: float = 0.0  # with mscale_all_dim (both non-zero): attention factor mscale(f, m) / mscale(f, m_all)
    mscale_all_dim: float = 0.0
    truncate: bool = True  # round the correction range to whole dimensions


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 512
    num_attention_heads: int = 4
    num_query_groups: int = 2  # grouped-query attention; = heads for MHA
    head_dim: int = 0  # channels per attention head; 0 = hidden_size / num_attention_heads (Qwen3 sets 128)
    max_position_embeddings: int = 32768
    rotary_base: float = 1000000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_epsilon: float = 1e-6
    add_qkv_bias: bool = True
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    tie_embeddings: bool = False
    # mixture of experts (Qwen3-MoE, Qwen2-MoE): routed experts per layer (0: dense), experts per token, each
    # expert's FFN width (0: ffn_hidden_size), whether the k routing weights are renormalised (HF's norm_topk_prob),
    # and the width of Qwen2-MoE's shared expert, sigmoid-gated (0: none)
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = True
    moe_shared_expert_ffn_hidden_size: int = 0
    init_std: float = 0.02
    params_dtype: str = "fp32"  # fp32 | bf16 | fp16
    make_vocab_divisible_by: int = 128
    tokenizer: str = "builtin"  # builtin | builtin-ascii (character tokenizers) | a local HF tokenizer directory
    use_chat_template: bool = True
    # extra variables for the chat template (Qwen3: {enable_thinking: false} renders its empty think block)
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    hf_path: str = ""  # local HF checkpoint to initialise from (see `megaprorl convert`)
    # initialise the policy (and reference) from a megaprorl checkpoint's weights, at this run's layout (a
    # step directory, or a run / checkpoints directory: its newest); the optimizer and run state start fresh.
    # With model.hf_path too, the HF directory gives the architecture check and end tokens, not the weights
    load: str = ""
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    attention: str = "sdpa"  # local spec's core attention: sdpa (torch SDPA / flash) | megatron
    fp8: str = ""  # "" | e4m3 | hybrid (needs TransformerEngine)
    fp8_recipe: str = "delayed"
    recompute_granularity: str = ""  # "" | selective (the core attention) | full (every layer)


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    # an MoE policy: its experts spread over this many ranks of each tensor-parallel group (each rank holds
    # num_experts / expert_parallel whole experts, split over the tensor_parallel / expert_parallel ranks that
    # share them); attention and the dense parts stay split over all tensor_parallel ranks
    expert_parallel: int = 1
    timeout_s: float = 1800.0  # collective timeout: a dead rank brings the job down instead of hanging
    # at data-parallel > 1: share each step's prompt groups out afresh so that every rank gets about the same model
    # FLOPs in every mini-batch (each rank draws its own; the longest responses can land on one)
    balance_batch: bool = True


LR_DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass
class OptimConfig:
    lr: float = 2e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # learning-rate schedule over RL steps (Megatron's OptimizerParamScheduler; ProRL: constant, no warmup)
    lr_warmup_steps: int = 0  # RL steps of linear warmup from lr_warmup_init to lr (step k trains at k / this)
    lr_warmup_init: float = 0.0
    lr_decay_style: str = "constant"  # constant | linear | cosine: after the warmup, down to min_lr
    lr_decay_steps: int = 0  # the RL step at which the decay reaches min_lr (0: train.steps)
    min_lr: float = 0.0
    max_nonfinite_in_a_row: int = 3
    distributed_optimizer: bool = False  # Megatron's ZeRO-1: Adam state and fp32 main weights sharded over DP


@dataclass
class RolloutConfig:
    engine: str = "megatron"  # megatron (the embedded engine) | trtllm (TensorRT-LLM, refit in place; not run yet)
    n_samples: int = 16  # the group size
    temperature: float = 1.2
    top_p: float = 1.0
    max_new_tokens: int = 8192
    batch_size: int = 64  # sequences decoded together
    # embedded engine: act on finished rows once they are >= 1/this of the KV cache's rows (0: never, lock-step
    # batches): refill them with waiting rollouts (continuous_batching), or drop them from the cache
    compact_every: int = 8
    continuous_batching: bool = True  # embedded engine: rows decode at their own positions (needs lean_decode)
    # embedded engine on a GPU: at most the rows whose KV cache fits in this fraction of the device memory free
    # when generation starts (never more than batch_size; the same on every rank of a model-parallel group); 0: off
    kv_cache_fraction: float = 0.0
    lean_decode: bool = True  # embedded engine: decode steps without Megatron's module plumbing (local or TE spec)
    # embedded engine, lean decode steps: attention over the KV cache through "sdpa" (masked, every row over the
    # furthest row's span) or "triton" (triton_kernels.decode_attention: each row its own keys; CUDA)
    decode_attention: str = "sdpa"
    # embedded engine, lean decode steps: replay each KV cache's decode step as a CUDA graph (one capture per
    # cache; needs decode_attention=triton, a CUDA device and parallel.pipeline_parallel=1)
    cuda_graphs: bool = False
    # embedded engine: an admission's prefill runs in forwards of at most this many padded tokens (distinct
    # prompts x the admission's longest prompt), bounding its activations and mask; 0: one forward per admission
    prefill_tokens: int = 0
    # token ids that also end a response, besides the tokenizer's EOS and the eos_token_id list of the
    # generation_config.json in model.tokenizer and model.hf_path
    stop_token_ids: List[int] = field(default_factory=list)
    # embedded engine at data-parallel > 1: each round's prompts of all ranks in one pool, from which every rank's
    # engine claims whole prompts whenever its rows are free (a counter in the job's TCP store), so a rank whose
    # responses run short takes more; the ranks then hold different numbers of groups until parallel.balance_batch
    # evens them out
    share_prompts_over_dp: bool = False
    # engine=trtllm: the refit's bucket (full HF tensors shared with the engine's workers per call), and the share
    # of the GPU memory free after the engine loaded that its KV cache takes (the trainer shares the GPUs)
    trtllm_bucket_mb: int = 1024
    trtllm_kv_cache_fraction: float = 0.3
    # engine=trtllm: release the engine's KV cache and weights while the trainer runs (TensorRT-LLM's sleep tags)
    trtllm_sleep: bool = True


@dataclass
class LossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: Optional[float] = None
    ratio_log_clamp: float = 20.0
    # token-mean | sequence-mean | token-sum-norm (Dr. GRPO: each response's token sum / rollout.max_new_tokens)
    aggregation: str = "token-mean"
    entropy_coef: float = 0.0
    # token (PPO's per-token ratio) | sequence (GSPO-token: each token takes its sequence's geometric-mean ratio,
    # clipped per sequence; GSPO's own bounds are ~3e-4 / 4e-4 with aggregation sequence-mean)
    ratio_level: str = "token"


@dataclass
class KLConfig:
    coef: float = 1e-4  # beta; 0 disables the KL term and the reference policy's forward
    estimator: str = "k3"  # k1 | k2 | k3
    log_ratio_clamp: float = 20.0
    output_clamp: float = 10.0
    placement: str = "loss"  # loss | reward


@dataclass
class AlgoConfig:
    advantage: str = "reinforce_pp_baseline"  # reinforce_pp_baseline | grpo | rloo
    whiten_advantages: bool = True
    # the old policy's log-probs in the clipped ratio: "recompute" (a forward pass of the trainer over the batch;
    # logs rollout/logprob_mismatch against the engine's) or "engine" (the log-probs the rollout engine drew the
    # tokens with: the same weights, so one forward pass fewer per RL step)
    old_logprobs: str = "recompute"
    # an MoE policy (model.num_experts): the trainer's forwards (old log-probs, updates) send each token to the
    # experts the rollout engine chose for it (R3, rollout routing replay); the embedded engine records them
    moe_routing_replay: bool = False
    # an MoE policy: its routers' weights are kept fixed during RL (the experts and the rest train)
    moe_freeze_router: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    length_penalty: LengthPenaltyConfig = field(default_factory=LengthPenaltyConfig)
    # DAPO's overlong filtering: responses truncated at rollout.max_new_tokens take no part in the loss
    overlong_filter: bool = False
    # DAPO's soft overlong punishment: 0 down to -factor over the last `buffer` tokens of rollout.max_new_tokens
    overlong_penalty: OverlongPenaltyConfig = field(default_factory=OverlongPenaltyConfig)
    reference_reset: ReferenceResetConfig = field(default_factory=ReferenceResetConfig)
    # the gap between the engine's sampling distribution and the trainer's old policy: each token's policy-
    # gradient term weighted by pi_old / pi_engine, truncated or masked (TIS / MIS; needs old_logprobs=recompute)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    # an entropy bonus whose coefficient steers the mean token entropy toward a target (algo/entropy_control.py)
    entropy_control: EntropyControlConfig = field(default_factory=EntropyControlConfig)


@dataclass
class TrainConfig:
    steps: int = 100  # RL steps
    prompts_per_step: int = 256  # B: groups per RL step (after dynamic sampling)
    mini_batch_prompts: int = 64  # prompts per optimizer step (v1: 256 / 64 = 4 updates per RL step)
    # passes over each RL step's batch, each in its own mini-batch order, against the same old log-probs
    # (PPO's epochs; ProRL: 1)
    ppo_epochs: int = 1
    micro_batch_size: int = 8  # sequences per forward/backward
    logprob_micro_batch_size: int = 16
    # > 0: pack sequences end to end into micro-batches of at most this many tokens (Megatron THD packed
    # sequences; no compute on padding; micro_batch_size / logprob_micro_batch_size are then unused)
    pack_tokens: int = 0
    kernel_backend: str = "auto"  # auto | torch | triton | cuda
    # Triton loss: where the logits gradient is made. inplace: over the logits, in the loss's forward (one
    # [T, V] buffer at the loss instead of two); recompute: a second pass in backward; forward: new buffer.
    # CUDA loss: inplace = its in-place backward (over the saved logits); torch backends ignore it
    loss_grad_mode: str = "inplace"
    # log-prob passes and the RL loss from hidden states and the output weight, no [T, V] logits (the
    # Triton fused LM head, token chunks of lm_head_token_chunk); rollouts and the SFT step keep logits
    fused_lm_head: bool = False
    lm_head_token_chunk: int = 2048
    # host offload (megaprorl/policy/offload.py): the optimizer's state (Adam moments, fp32 main weights) and
    # the gradient buffers in host memory outside the update, the reference's weights outside its log-prob
    # pass, so that the rollouts' KV cache can use their device memory
    offload_optimizer: bool = False
    offload_reference: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class WarmStartConfig:
    """Short supervised warm-start so that RL has signal (used by the built-in task)."""

    steps: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    examples: int = 20000


@dataclass
class EvalConfig:
    interval: int = 0  # RL steps between validations; 0 = only before and after training
    n_prompts: int = 256
    samples_per_prompt: int = 1  # k samples for pass@1 averaging / pass@k
    ks: List[int] = field(default_factory=lambda: [1])
    temperature: float = 0.6
    top_p: float = 0.95
    greedy: bool = False
    max_new_tokens: int = 0  # 0 = rollout.max_new_tokens
    source: str = ""  # name of a data source for validation; "" = the built-in task's held-out split
    # named benchmarks, each read in full and reported as eval/<name>/... (data/sources.py: EvalSetConfig); when
    # given they replace `source` and `n_prompts`, and eval/accuracy is the greedy accuracy over all their prompts
    sets: List[EvalSetConfig] = field(default_factory=list)
    at_start: bool = True  # evaluate before the first RL step (not on a resume)
    write_results: bool = True  # each evaluation's per-prompt results to RUN/eval/step_XXXXXXXX.jsonl
    write_responses: bool = False  # ... with each prompt's greedy response text


@dataclass
class DataConfig:
    sources: List[DataSourceConfig] = field(default_factory=list)
    builtin_min_digits: int = 1
    builtin_max_digits: int = 2
    seed: int = 0
    # training prompts longer than this many tokens (as the policy sees them, chat template included) are skipped,
    # counted (data/skipped_long_prompts) and replaced by others from the sources; 0: no limit
    max_prompt_tokens: int = 0
    # a prompt whose every sample was solved (verifier reward >= retire_solved_reward) in this many draws in a
    # row leaves the training pool for the rest of the run (data/retire.py); 0: never
    retire_solved_after: int = 0
    retire_solved_reward: float = 1.0


@dataclass
class CheckpointConfig:
    interval: int = 0  # RL steps; 0 = only at the end
    keep_last: int = 3
    resume: str = ""  # "" | auto | a checkpoint directory
    # also keep the checkpoints of the keep_best evaluations with the highest best_metric (an evaluation that
    # enters them saves a checkpoint at its step); listed in RUN/checkpoints/best.json; 0: off
    keep_best: int = 0
    best_metric: str = "eval/accuracy"


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True
    plot: bool = True
    wandb_project: str = ""
    # prompt groups per RL step whose samples (prompt, response, reward, shaped reward, advantage, length) go to
    # RUN/rollouts/step_XXXXXXXX.jsonl, taken evenly from the data-parallel ranks; 0: none, -1: every group
    rollouts: int = 0
    # the device's peak TFLOP/s for perf/mfu_*; 0: the dense bf16 peak of a known GPU (H100, H200, A100, B200), none
    # on others (perf/tflops_* are logged either way)
    peak_tflops: float = 0.0


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------------- loading
def _all_keys(cls, prefix: str = "") -> List[str]:
    out = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        typ = f.type if not isinstance(f.type, str) else None
        default = f.default_factory() if f.default_factory is not Any and callable(f.default_factory) else None
        sub = type(default) if is_dataclass(default) else (typ if is_dataclass(typ) else None)
        if sub is not None:
            out.extend(_all_keys(sub, key + "."))
    return out


def _nearest(key: str) -> str:
    keys = _all_keys(Config)
    leaf = key.split(".")[-1]
    cands = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not cands:
        by_leaf = {k.split(".")[-1]: k for k in keys}
        leaf_match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        cands = [by_leaf[leaf_match[0]]] if leaf_match else []
    return f"; did you mean '{cands[0]}'?" if cands else ""


def _declared_type(key: str) -> Any:
    """The declared type of a config key (``eval.sets[0].ks``); None when it cannot be told."""
    t: Any = Config
    for part in key.split("."):
        m = re.fullmatch(r"([A-Za-z_]\w*)((?:\[\d+\])*)", part)
        if m is None or not is_dataclass(t):
            return None
        t = typing.get_type_hints(t).get(m.group(1))
        for _ in re.findall(r"\[\d+\]", m.group(2)):  # an element of a list
            args = typing.get_args(t)
            t = args[0] if typing.get_origin(t) is list and args else None
        if t is None:
            return None
    return t


def _declared(key: str) -> str:
    """The declared type of a config key, in words; "" when it cannot be told."""
    t = _declared_type(key)
    return "" if t is None else _in_words(t)


def _in_words(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is list:
        if not args:
            return "a list"
        each = args[0]
        if is_dataclass(each):
            return f"a list of mappings of {each.__name__}'s keys"
        return "a list of " + {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(each, str(each))
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_in_words(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin is dict:
        return "a mapping"
    if is_dataclass(t):
        return f"a mapping of {t.__name__}'s keys"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, str(t))


def _explain(e: OmegaConfBaseException, where: str, prefix: str = "") -> ConfigError:
    """``prefix``: where the node the error came from sits (a list entry merged on its own)."""
    key = (prefix + (getattr(e, "full_key", None) or "")).rstrip(".")
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(f"{where}: unknown config key '{key}'{_nearest(key)}")
    if isinstance(e, ValidationError):
        expected = _declared(key)  # (omegaconf's object_type is the section the key is in, not the key's type)
        msg = str(e).splitlines()[0]
        return ConfigError(f"{where}: bad value for '{key}': {msg}" + (f" (expected {expected})" if expected else ""))
    return ConfigError(f"{where}: {str(e).splitlines()[0]} (key '{key}')")


def _open_free_dicts(node) -> None:
    """Struct mode refuses unknown keys everywhere; a ``Dict[str, Any]`` field (``model.chat_template_kwargs``)
    takes any key, so it is opened again."""
    from omegaconf import DictConfig

    for k in node:
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_free_dicts(child)


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None, text: Optional[str] = None,
                where: str = "", installed: bool = True) -> Config:
    """Structured config from defaults <- YAML file (or the YAML ``text``, e.g. a checkpoint's resolved
    config; ``where`` names it in errors) <- dotted ``key=value`` overrides.  ``installed=False`` skips the
    checks of what this machine has installed (TransformerEngine for FP8, TensorRT-LLM, wandb): for a saved
    config that is read, not run (``megaprorl convert checkpoint-to-hf`` of an FP8 run on a machine without TE)."""
    base = OmegaConf.structured(Config)
    OmegaConf.set_struct(base, True)
    _open_free_dicts(base)
    if text is not None:
        path = where or "config text"
        try:
            file_cfg = OmegaConf.create(text)
        except Exception as e:
            raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    elif path:
        file_cfg = _load_yaml_chain(path, ())
    if path:
        _check_list_entries(file_cfg, path)
        try:
            base = OmegaConf.merge(base, file_cfg)
        except OmegaConfBaseException as e:
            raise _explain(e, path) from None
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        key, _, value = ov.partition("=")
        if not value.strip() and _declared_type(key.strip()) is str:  # `algo.rollout_correction.level=`: ''
            ov = f"{key}=''"  # (omegaconf reads an empty value as null, which a string key refuses)
        try:
            dotlist = OmegaConf.from_dotlist([ov])
            _check_list_entries(dotlist, f"override {ov!r}")
            base = OmegaConf.merge(base, dotlist)
        except OmegaConfBaseException as e:
            raise _explain(e, f"override {ov!r}") from None
    try:
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as e:
        raise _explain(e, path or "config") from None
    validate(cfg, installed)
    return cfg


# lists of structured entries: OmegaConf reports an unknown key inside one without its list and index
_LIST_ENTRIES = (("data.sources", DataSourceConfig), ("eval.sets", EvalSetConfig))


def _check_list_entries(node, where: str) -> None:
    """An unknown key in a ``data.sources`` / ``eval.sets`` entry, named with its list and index."""
    for key, cls in _LIST_ENTRIES:
        entries = OmegaConf.select(node, key, default=None)
        if not OmegaConf.is_list(entries):
            continue
        names = [f.name for f in fields(cls)]
        for i, entry in enumerate(entries):
            for k in (entry.keys() if OmegaConf.is_dict(entry) else ()):
                if k not in names:
                    near = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
                    hint = f"; did you mean '{key}[{i}].{near[0]}'?" if near else f" (valid: {', '.join(names)})"
                    raise ConfigError(f"{where}: unknown config key '{key}[{i}].{k}'{hint}")
            try:  # each entry's values against its fields, so that an error names the entry
                OmegaConf.merge(OmegaConf.structured(cls), entry)
            except ValidationError as e:
                raise _explain(e, where, prefix=f"{key}[{i}].") from None


def _load_yaml_chain(path: str, seen: tuple):
    """A YAML config, merged over the file its top-level ``base:`` key names (relative to its own
    directory; chains allowed, cycles are an error).  Lists are replaced, not concatenated."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist" + (f" (the base of {seen[-1]})" if seen else ""))
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"{path}: 'base' chain is circular: {' -> '.join(seen + (real,))}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors carry the line
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    if "base" not in cfg:
        return cfg
    base_name = cfg.pop("base")
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"{path}: 'base' must name another YAML config file")
    parent = _load_yaml_chain(os.path.join(os.path.dirname(path), base_name), seen + (real,))
    return OmegaConf.merge(parent, cfg)


def _local_spec(m: ModelConfig, installed: bool = True) -> bool:
    """The model is built with Megatron's local layer spec (as ``megaprorl.models.gpt.use_transformer_engine``
    decides, without importing TransformerEngine: ``auto`` takes TE on a CUDA machine where it is installed;
    ``installed=False``: whatever this machine has, ``auto`` counts as TE's)."""
    if m.transformer_impl != "auto" or not installed:
        return m.transformer_impl == "local"
    import torch

    return importlib.util.find_spec("transformer_engine") is None or not torch.cuda.is_available()


# numeric keys and their ranges: (key, lowest value, whether the lowest is allowed, what the lowest allowed means);
# checked first, so that nothing below divides by a zero or loops over a negative count
_RANGES = (
    ("model.num_layers", 1, True, ""), ("model.hidden_size", 1, True, ""), ("model.ffn_hidden_size", 1, True, ""),
    ("model.num_attention_heads", 1, True, ""), ("model.num_query_groups", 0, True, "0: one per head"),
    ("model.max_position_embeddings", 2, True, ""), ("model.rotary_base", 0, False, ""),
    ("model.norm_epsilon", 0, False, ""), ("model.init_std", 0, True, ""),
    ("model.make_vocab_divisible_by", 1, True, ""),
    ("train.steps", 0, True, "0: evaluate only"), ("train.prompts_per_step", 1, True, ""),
    ("train.mini_batch_prompts", 1, True, ""), ("train.micro_batch_size", 1, True, ""),
    ("train.logprob_micro_batch_size", 1, True, ""),
    ("train.optim.lr", 0, False, ""), ("train.optim.weight_decay", 0, True, ""), ("train.optim.adam_eps", 0, False, ""),
    ("train.optim.grad_clip", 0, True, "0: no clipping"), ("train.optim.max_nonfinite_in_a_row", 1, True, ""),
    ("rollout.batch_size", 1, True, ""), ("rollout.max_new_tokens", 1, True, ""),
    ("parallel.tensor_parallel", 1, True, ""), ("parallel.pipeline_parallel", 1, True, ""),
    ("parallel.timeout_s", 0, False, ""),
    ("warmstart.steps", 0, True, "0: none"), ("warmstart.batch_size", 1, True, ""), ("warmstart.examples", 1, True, ""),
    ("warmstart.lr", 0, False, ""),
    ("data.builtin_min_digits", 1, True, ""),
    ("eval.interval", 0, True, "0: before and after training only"), ("eval.n_prompts", 1, True, ""),
    ("eval.max_new_tokens", 0, True, "0: rollout.max_new_tokens"), ("eval.temperature", 0, True, "0: greedy"),
    ("checkpoint.interval", 0, True, "0: at the end only"), ("checkpoint.keep_last", 0, True, "0: keep every one"),
    ("algo.loss.eps_low", 0, True, ""), ("algo.loss.eps_high", 0, True, ""),
    ("algo.loss.ratio_log_clamp", 0, False, ""),
    ("algo.kl.coef", 0, True, "0: no KL term"), ("algo.kl.log_ratio_clamp", 0, False, ""),
    ("algo.kl.output_clamp", 0, False, ""),
    ("algo.dynamic_sampling.max_extra_draws", 0, True, ""),
    ("algo.reference_reset.interval", 0, True, "0: off"), ("algo.reference_reset.kl_spike_factor", 0, True, "0: off"),
    ("algo.reference_reset.kl_warmup_steps", 0, True, ""), ("algo.reference_reset.stall_evals", 0, True, "0: off"),
    ("algo.reference_reset.min_gap", 0, True, ""),
    ("algo.length_penalty.max_length", 0, True, "0: rollout.max_new_tokens"),
    ("algo.length_penalty.on_steps", 0, True, ""), ("algo.length_penalty.off_steps", 0, True, ""),
    ("rewards.num_workers", 0, True, "0: scored in the trainer's process"), ("rewards.timeout_s", 0, False, ""),
    ("rewards.code_timeout_s", 0, False, ""), ("rewards.math_timeout_s", 0, True, "0: no limit"),
    ("rewards.code_memory_mb", 1, True, ""), ("rewards.max_tasks_per_worker", 0, True, "0: never recycled"),
    ("rewards.code_max_procs", 1, True, ""), ("rewards.code_max_output_kb", 1, True, ""),
    ("rewards.code_tmp_mb", 1, True, ""), ("rewards.max_response_chars", 1, True, ""),
)


def _check_ranges(cfg: Config, need) -> None:
    for key, low, inclusive, note in _RANGES:
        v = _attr(cfg, key)
        ok = v >= low if inclusive else v > low
        need(ok, key, f"must be {'>=' if inclusive else '>'} {low}{f' ({note})' if note else ''}, got {v}")
    for key in ("train.optim.adam_beta1", "train.optim.adam_beta2", "algo.reference_reset.kl_ema"):
        v = _attr(cfg, key)
        need(0.0 <= v < 1.0, key, f"must be in [0, 1), got {v}")
    need(cfg.algo.loss.eps_low < 1.0, "algo.loss.eps_low", f"must be < 1 (the ratio's lower bound is 1 - eps_low), "
                                                           f"got {cfg.algo.loss.eps_low}")
    dc = cfg.algo.loss.dual_clip
    need(dc is None or dc > 1.0, "algo.loss.dual_clip", f"must be > 1 (or null: off), got {dc}")
    need(0.0 < cfg.eval.top_p <= 1.0, "eval.top_p", f"must be in (0, 1], got {cfg.eval.top_p}")
    d = cfg.data
    need(d.builtin_max_digits >= d.builtin_min_digits, "data.builtin_max_digits",
         f"must be >= data.builtin_min_digits={d.builtin_min_digits}, got {d.builtin_max_digits}")


def _attr(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config, installed: bool = True) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}': {msg}")

    _check_ranges(cfg, need)
    need(cfg.rollout.engine in ("megatron", "trtllm"), "rollout.engine", "must be 'megatron' or 'trtllm'")
    if cfg.rollout.engine == "trtllm":
        from .rollout.trtllm_engine import INSTALL

        need(not installed or importlib.util.find_spec("tensorrt_llm") is not None, "rollout.engine",
             f"'trtllm' needs TensorRT-LLM, which is not installed: {INSTALL}")
        need(not cfg.rollout.cuda_graphs, "rollout.cuda_graphs",
             "graphs the embedded engine's decode step; TensorRT-LLM has its own (rollout.engine=trtllm)")
        need(cfg.algo.old_logprobs != "engine" or cfg.rollout.top_p == 1.0, "algo.old_logprobs",
             "'engine' with rollout.engine=trtllm needs rollout.top_p=1: TensorRT-LLM's processed log-probs under "
             "top-p are renormalised over the kept tokens, the trainer's are of the whole distribution")
    o = cfg.train.optim
    need(o.lr_decay_style in LR_DECAY_STYLES, "train.optim.lr_decay_style",
         f"must be one of {', '.join(LR_DECAY_STYLES)}")
    need(o.lr_warmup_steps >= 0, "train.optim.lr_warmup_steps", "must be >= 0")
    need(0.0 <= o.lr_warmup_init <= o.lr, "train.optim.lr_warmup_init", f"must be in [0, train.optim.lr={o.lr}]")
    need(0.0 <= o.min_lr <= o.lr, "train.optim.min_lr", f"must be in [0, train.optim.lr={o.lr}]")
    need(o.lr_decay_steps >= 0, "train.optim.lr_decay_steps", "must be >= 0 (0: train.steps)")
    if o.lr_decay_style != "constant":
        decay = o.lr_decay_steps or cfg.train.steps
        need(decay > o.lr_warmup_steps, "train.optim.lr_decay_steps",
             f"the decay must end after the warmup: {decay} (0 = train.steps) <= lr_warmup_steps={o.lr_warmup_steps}")
    _validate_eval(cfg.eval, need)
    for i, src in enumerate(cfg.data.sources):
        need(src.weight >= 0, f"data.sources[{i}].weight", f"must be >= 0 (its share of the mixture), got {src.weight}")
        need(src.size >= 1, f"data.sources[{i}].size", f"must be >= 1, got {src.size}")
    need(not cfg.data.sources or sum(src.weight for src in cfg.data.sources) > 0, "data.sources",
         "the weights must not all be 0")
    ec = cfg.algo.entropy_control
    for k in ("target", "delta", "init_coef", "max_coef"):
        need(getattr(ec, k) >= 0, f"algo.entropy_control.{k}", "must be >= 0")
    if ec.target > 0:
        need(ec.delta > 0, "algo.entropy_control.delta", "must be > 0 when algo.entropy_control.target is set")
        need(not ec.max_coef or ec.init_coef <= ec.max_coef, "algo.entropy_control.init_coef",
             f"must be <= algo.entropy_control.max_coef={ec.max_coef}")
        need(cfg.algo.loss.entropy_coef == 0, "algo.loss.entropy_coef",
             "a fixed entropy bonus and algo.entropy_control (which sets the bonus each step) exclude each other")
    need(cfg.checkpoint.keep_best >= 0, "checkpoint.keep_best", "must be >= 0 (0: off)")
    need(cfg.logging.rollouts >= -1, "logging.rollouts", "must be >= -1 (0: none, -1: every group)")
    need(cfg.logging.peak_tflops >= 0, "logging.peak_tflops", "must be >= 0 (0: from the device's name)")
    need(cfg.data.max_prompt_tokens >= 0, "data.max_prompt_tokens", "must be >= 0 (0: no limit)")
    need(cfg.data.retire_solved_after >= 0, "data.retire_solved_after", "must be >= 0 (0: never)")
    need(cfg.rollout.trtllm_bucket_mb >= 1, "rollout.trtllm_bucket_mb", "must be >= 1")
    need(0.0 < cfg.rollout.trtllm_kv_cache_fraction < 1.0, "rollout.trtllm_kv_cache_fraction", "must be in (0, 1)")
    need(cfg.rollout.n_samples >= 2, "rollout.n_samples", f"must be >= 2, got {cfg.rollout.n_samples}: the advantages "
         f"are taken against the group's other samples ({cfg.algo.advantage}), so a group of one has no signal")
    need(cfg.rollout.temperature > 0, "rollout.temperature", "must be > 0")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(all(i >= 0 for i in cfg.rollout.stop_token_ids), "rollout.stop_token_ids", "token ids must be >= 0")
    need(cfg.rollout.compact_every >= 0, "rollout.compact_every", "must be >= 0 (0 = keep finished rows)")
    need(0.0 <= cfg.rollout.kv_cache_fraction < 1.0, "rollout.kv_cache_fraction", "must be in [0, 1) (0 = off)")
    need(cfg.rollout.decode_attention in DECODE_ATTENTION, "rollout.decode_attention",
         f"must be one of {list(DECODE_ATTENTION)}")
    if cfg.rollout.cuda_graphs:
        why = cuda_graphs_problem(cfg.rollout.decode_attention, cfg.parallel.pipeline_parallel, cfg.model.num_experts)
        need(why is None, "rollout.cuda_graphs", why or "")
    need(cfg.rollout.prefill_tokens >= 0, "rollout.prefill_tokens", "must be >= 0 (0 = one forward per admission)")
    if cfg.logging.wandb_project and installed:
        require_wandb()
    need(cfg.algo.advantage in ("reinforce_pp_baseline", "grpo", "rloo"), "algo.advantage",
         "must be reinforce_pp_baseline, grpo or rloo")
    need(cfg.algo.old_logprobs in ("recompute", "engine"), "algo.old_logprobs", "must be recompute or engine")
    rc = cfg.algo.rollout_correction
    need(rc.level in ("",) + RC_LEVELS, "algo.rollout_correction.level",
         f"must be '' (off) or one of {', '.join(RC_LEVELS)}, got {rc.level!r}")
    if rc.level:
        need(cfg.algo.old_logprobs == "recompute", "algo.rollout_correction.level",
             "needs algo.old_logprobs=recompute: with 'engine' the old policy is the engine's own, so every "
             "importance weight is 1")
        need(rc.mode in RC_MODES, "algo.rollout_correction.mode", f"must be one of {', '.join(RC_MODES)}")
        need(rc.cap > 0, "algo.rollout_correction.cap", f"must be > 0, got {rc.cap}")
        need(rc.cap_low >= 0, "algo.rollout_correction.cap_low", f"must be >= 0 (0: 1 / cap), got {rc.cap_low}")
        need(rc.mode != "mask" or (rc.cap_low or 1.0 / rc.cap) < rc.cap, "algo.rollout_correction.cap_low",
             f"the band kept, [{rc.cap_low or 1.0 / rc.cap:g}, {rc.cap:g}], is empty")
        need(rc.log_ratio_clamp > 0, "algo.rollout_correction.log_ratio_clamp", "must be > 0")
    need(cfg.algo.loss.aggregation in AGGREGATIONS, "algo.loss.aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
    need(cfg.algo.loss.ratio_level in RATIO_LEVELS, "algo.loss.ratio_level", "must be token or sequence")
    need(cfg.algo.kl.estimator in ("k1", "k2", "k3"), "algo.kl.estimator", "must be k1, k2 or k3")
    need(cfg.algo.kl.placement in ("loss", "reward"), "algo.kl.placement", "must be loss or reward")
    from .rewards.base import THINK_MODES

    need(cfg.rewards.think_mode in THINK_MODES, "rewards.think_mode", f"must be one of {', '.join(THINK_MODES)}")
    from .kernels import BACKENDS, GRAD_MODES

    need(cfg.train.kernel_backend in BACKENDS, "train.kernel_backend", f"must be one of {', '.join(BACKENDS)}")
    need(cfg.train.loss_grad_mode in GRAD_MODES, "train.loss_grad_mode", f"must be one of {', '.join(GRAD_MODES)}")
    need(cfg.train.lm_head_token_chunk >= 1, "train.lm_head_token_chunk", "must be >= 1")
    need(cfg.train.pack_tokens >= 0, "train.pack_tokens", "must be >= 0 (0 = right-padded micro-batches)")
    need(not (cfg.train.pack_tokens and cfg.model.attention == "megatron" and _local_spec(cfg.model, installed)),
         "train.pack_tokens", "packed sequences need model.attention=sdpa or the TransformerEngine spec "
         "(model.attention=megatron is the local spec's attention, which takes only a dense mask)")
    need(cfg.train.prompts_per_step % cfg.train.mini_batch_prompts == 0, "train.mini_batch_prompts",
         f"must divide train.prompts_per_step ({cfg.train.prompts_per_step})")
    need(cfg.train.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1 (ProRL: 1)")
    need(not cfg.train.offload_reference or cfg.algo.kl.coef > 0, "train.offload_reference",
         "there is no reference policy to offload (algo.kl.coef is 0)")
    ds = cfg.algo.dynamic_sampling
    need(not ds.first_draw_oversample or ds.enabled, "algo.dynamic_sampling.first_draw_oversample",
         "needs algo.dynamic_sampling.enabled (it sizes dynamic sampling's first draw)")
    need(not (ds.enabled and ds.share_over_dp) or cfg.parallel.balance_batch, "algo.dynamic_sampling.share_over_dp",
         "needs parallel.balance_batch (the ranks' shares of the pool differ until the batch is shared out); "
         "set both false to draw and train per rank")
    if cfg.rollout.share_prompts_over_dp:
        need(cfg.rollout.engine == "megatron", "rollout.share_prompts_over_dp",
             "needs rollout.engine=megatron (the embedded engine claims prompts as its rows free up)")
        need(cfg.parallel.balance_batch, "rollout.share_prompts_over_dp",
             "needs parallel.balance_batch (the ranks hold different numbers of groups until it evens them out)")
        need(not (ds.enabled and not ds.share_over_dp), "rollout.share_prompts_over_dp",
             "needs algo.dynamic_sampling.share_over_dp (one pool over the ranks) when dynamic sampling is on")
        need(not (cfg.parallel.expert_parallel > 1 and cfg.parallel.tensor_parallel == 1),
             "rollout.share_prompts_over_dp", "is not supported with experts across data-parallel replicas "
             "(parallel.expert_parallel > 1 at parallel.tensor_parallel = 1)")
    room = cfg.model.max_position_embeddings
    budgets = [("rollout.max_new_tokens", cfg.rollout.max_new_tokens), ("eval.max_new_tokens", cfg.eval.max_new_tokens)]
    budgets += [(f"eval.sets[{i}].max_new_tokens", s.max_new_tokens) for i, s in enumerate(cfg.eval.sets)]
    for key, n in budgets:  # prompt + response must fit the positions the model is built for
        need(n < room, key, f"{n} leaves no room for a prompt under model.max_position_embeddings={room} (the "
                            "longest sequence the model is built for; TensorRT-LLM's max_seq_len)")
    op = cfg.algo.overlong_penalty
    need(0 <= op.buffer <= cfg.rollout.max_new_tokens, "algo.overlong_penalty.buffer",
         f"must be in [0, rollout.max_new_tokens={cfg.rollout.max_new_tokens}] (0: off), got {op.buffer}")
    need(op.factor >= 0, "algo.overlong_penalty.factor", f"must be >= 0, got {op.factor}")
    from .models.rope import rope_scaling_spec

    try:
        rope_scaling_spec(cfg.model.rope_scaling, "config key 'model.rope_scaling'")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    need(cfg.model.head_dim >= 0, "model.head_dim", "must be >= 0 (0 = hidden_size / num_attention_heads)")
    need(cfg.model.head_dim or cfg.model.hidden_size % cfg.model.num_attention_heads == 0,
         "model.num_attention_heads", "must divide model.hidden_size (or set model.head_dim)")
    need(cfg.model.num_attention_heads % max(cfg.model.num_query_groups, 1) == 0, "model.num_query_groups",
         "must divide model.num_attention_heads")
    need(cfg.model.num_query_groups % cfg.parallel.tensor_parallel == 0 or cfg.model.num_query_groups == 0,
         "parallel.tensor_parallel", "must divide model.num_query_groups")
    m = cfg.model
    for key, value, allowed in (("params_dtype", m.params_dtype, ("fp32", "bf16", "fp16")),
                                ("transformer_impl", m.transformer_impl, ("auto", "local", "transformer_engine")),
                                ("attention", m.attention, ("sdpa", "megatron")),
                                ("recompute_granularity", m.recompute_granularity, ("", "selective", "full")),
                                ("fp8", m.fp8, ("", "e4m3", "hybrid")),
                                ("fp8_recipe", m.fp8_recipe, ("delayed",))):
        need(value in allowed, f"model.{key}", f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if m.fp8:
        need(m.transformer_impl != "local", "model.fp8", "needs the TransformerEngine layer spec "
             "(model.transformer_impl: auto or transformer_engine), not the local one")
        need(not installed or importlib.util.find_spec("transformer_engine") is not None, "model.fp8",
             "needs TransformerEngine, which is not installed: pip install -e .[gpu] (transformer-engine[pytorch]) "
             "on a CUDA machine")
    need(m.num_experts >= 0, "model.num_experts", "must be >= 0 (0: a dense model)")
    need(m.num_experts > 0 or not cfg.algo.moe_routing_replay, "algo.moe_routing_replay",
         "needs an MoE model (model.num_experts > 0)")
    need(m.num_experts > 0 or not cfg.algo.moe_freeze_router, "algo.moe_freeze_router",
         "needs an MoE model (model.num_experts > 0)")
    ep = cfg.parallel.expert_parallel
    need(ep >= 1, "parallel.expert_parallel", f"must be >= 1, got {ep}")
    need(ep == 1 or m.num_experts > 0, "parallel.expert_parallel",
         f"is {ep}, but the model has no experts (model.num_experts = 0)")
    if m.num_experts:
        need(1 <= m.moe_topk <= m.num_experts, "model.moe_topk",
             f"must be in 1..model.num_experts ({m.num_experts}) for an MoE model, got {m.moe_topk}")
        tp = cfg.parallel.tensor_parallel
        need(tp % ep == 0 or tp == 1, "parallel.expert_parallel",
             f"({ep}) must divide parallel.tensor_parallel ({tp}), the experts spread over the ranks of a "
             "tensor-parallel group; or, at parallel.tensor_parallel = 1, span that many data-parallel replicas")
        if tp == 1 and ep > 1:  # across data-parallel replicas: every forward is matched over the expert group
            need(cfg.parallel.pipeline_parallel == 1, "parallel.expert_parallel",
                 f"({ep}) across data-parallel replicas (parallel.tensor_parallel = 1) needs "
                 "parallel.pipeline_parallel = 1")
            need(cfg.rollout.engine == "megatron", "parallel.expert_parallel",
                 f"({ep}) across data-parallel replicas (parallel.tensor_parallel = 1) needs rollout.engine=megatron:"
                 " the refit stream to TensorRT-LLM gathers a replica's experts from its own ranks")
            need(not cfg.algo.moe_routing_replay, "algo.moe_routing_replay",
                 "is not supported with parallel.expert_parallel > 1 at parallel.tensor_parallel = 1 (experts "
                 "across data-parallel replicas)")
        need(m.num_experts % ep == 0, "parallel.expert_parallel",
             f"({ep}) must divide model.num_experts ({m.num_experts})")
        etp = max(1, cfg.parallel.tensor_parallel // ep)
        need((m.moe_ffn_hidden_size or m.ffn_hidden_size) % etp == 0,
             "model.moe_ffn_hidden_size", f"must be divisible by parallel.tensor_parallel / parallel.expert_parallel "
             f"({etp}: each expert is split over that many ranks)")
        need(cfg.parallel.tensor_parallel == 1 or cfg.parallel.sequence_parallel, "parallel.sequence_parallel",
             "must be true for an MoE model (model.num_experts) at parallel.tensor_parallel > 1: Megatron's MoE "
             "layer trains under tensor parallelism only with sequence parallelism")
        need(cfg.rollout.engine == "megatron" or not cfg.algo.moe_routing_replay, "algo.moe_routing_replay",
             "needs the routing the embedded engine records (rollout.engine=megatron)")
        need(not (cfg.algo.moe_routing_replay and cfg.parallel.pipeline_parallel > 1 and m.recompute_granularity),
             "algo.moe_routing_replay", "with parallel.pipeline_parallel > 1 and model.recompute_granularity: the "
             "recomputed forward of a micro-batch would replay a later micro-batch's routing")
        need(not m.fp8, "model.fp8", "is not supported with model.num_experts yet (FP8 experts need their token "
             "counts padded, which megaprorl does not do)")
        shared = m.moe_shared_expert_ffn_hidden_size
        need(shared >= 0, "model.moe_shared_expert_ffn_hidden_size", "must be >= 0 (0: no shared expert)")
        need(shared % cfg.parallel.tensor_parallel == 0, "model.moe_shared_expert_ffn_hidden_size",
             "must be divisible by parallel.tensor_parallel (the shared expert is split as a dense MLP)")
        qwen3 = m.qk_norm and not m.add_qkv_bias and not shared
        qwen2 = m.add_qkv_bias and not m.qk_norm and shared > 0
        need(qwen3 or qwen2, "model.num_experts",
             "an MoE model is the Qwen3-MoE shape (model.qk_norm=true, model.add_qkv_bias=false, no shared expert) or "
             "the Qwen2-MoE shape (model.add_qkv_bias=true, model.qk_norm=false, "
             "model.moe_shared_expert_ffn_hidden_size > 0) here")


def _validate_eval(e: EvalConfig, need) -> None:
    need(e.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1")
    need(all(k >= 1 for k in e.ks), "eval.ks", f"every k must be >= 1, got {list(e.ks)}")
    need(e.sets or all(k <= e.samples_per_prompt for k in e.ks), "eval.ks",
         f"pass@k needs k samples of each prompt: every k must be <= eval.samples_per_prompt={e.samples_per_prompt}, "
         f"got {list(e.ks)}")
    need(not (e.sets and e.source), "eval.source",
         "names a training source to sample for validation; eval.sets replaces it: give one or the other")
    need(not (e.sets and e.n_prompts != EvalConfig.n_prompts), "eval.n_prompts",
         f"{e.n_prompts} has no effect under eval.sets (it sizes the eval.source / built-in set); give each set its "
         "own n_prompts (0: every row)")
    seen = set()
    for i, s in enumerate(e.sets):
        key = f"eval.sets[{i}]"
        need(bool(re.fullmatch(r"[A-Za-z0-9_.\-]+", s.name or "")), f"{key}.name",
             f"{s.name!r}: a set needs a name of letters, digits, '_', '.' or '-' (it prefixes its metrics)")
        need(s.name not in seen, f"{key}.name", f"{s.name!r} names two evaluation sets")
        need(s.name not in _EVAL_RESERVED, f"{key}.name", f"{s.name!r} is an evaluation metric's name")
        seen.add(s.name)
        need(s.n_prompts >= 0, f"{key}.n_prompts", "must be >= 0 (0: every row)")
        need(s.samples_per_prompt >= 0, f"{key}.samples_per_prompt", "must be >= 0 (0: eval.samples_per_prompt)")
        need(all(k >= 1 for k in s.ks), f"{key}.ks", f"every k must be >= 1, got {list(s.ks)}")
        need(s.max_new_tokens >= 0, f"{key}.max_new_tokens", "must be >= 0 (0: eval.max_new_tokens)")
        n = s.samples_per_prompt or e.samples_per_prompt  # (eval.ks a set takes over applies where it can)
        need(all(k <= n for k in s.ks), f"{key}.ks",
             f"pass@k needs k samples of each prompt: every k must be <= {n} (the samples of {key}), got {list(s.ks)}")


# metric names directly under eval/ that a set's name must not shadow
_EVAL_RESERVED = ("accuracy", "n_prompts", "by_domain", "mean_reward", "n_problems", "n_samples", "response_tokens",
                  "truncated", "reward_errors")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
