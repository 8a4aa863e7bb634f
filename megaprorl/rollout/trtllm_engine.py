"""Rollouts on a TensorRT-LLM engine (its PyTorch-backend LLM API), refit in place from the trainer's weights.

Layout.  Each model-parallel group of the trainer (its TP x PP ranks, one data-parallel replica; on one node)
owns one ``tensorrt_llm.LLM`` of ``tensor_parallel_size`` = the group's size, built by the group's first rank
(the leader) with ``orchestrator_type="ray"`` on a private Ray instance that sees just the group's GPUs, so that
the engine's workers share the GPUs of the ranks that feed them.  The engine starts from ``load_format="dummy"``
weights (the HF directory gives only its config) and samples nothing before the first refit.

Refit (``update_weights``, after each optimizer step and at resume).  ``convert.HFWeightStream`` puts the
policy's weights on every rank of the group as full HF tensors, a bucket of ``rollout.trtllm_bucket_mb`` at a
time; each rank shares its bucket's tensors with CUDA IPC (``torch.multiprocessing.reductions.reduce_tensor``)
under its GPU's UUID, the leader hands the group's handles to the workers' ``update_weights`` (TensorRT-LLM's
``rlhf_utils.WorkerExtension``: each worker opens the handles of its own GPU and shards the full tensors itself),
and one last ``update_weights(None)`` runs TensorRT-LLM's post-load processing and drops its prefix cache.  A
rank keeps its bucket alive until the leader's call has returned.

Sleep (``rollout.trtllm_sleep``, on by default).  While the trainer computes log-probs and updates, the engine
releases its GPU memory through TensorRT-LLM's virtual-memory tags (``sleep`` / ``wakeup`` on its workers): the
KV cache, and the weights with the model's other allocations.  The next refit first wakes the weights alone (it
writes into them), and ``wake()`` before generation brings back the KV cache and whatever is still released.
The LLM is built with the sleep argument its release has (``sleep_config`` or the older ``enable_sleep``), and
the tags asked for are those its ``ExecutorMemoryType`` has.

Generation.  The leader submits the group's prompts (``n`` requests per prompt, each with its own seed; the
responses keep their stop token, ``include_stop_str_in_output``) with ``generate_async``, takes the results in
order, hands each to ``on_finish`` (the trainer's verifiers, which run on the leader) as it comes in, and
broadcasts the rollouts to the group (or the error that stopped it, so that no rank waits).
The log-probs are TensorRT-LLM's ``LogprobMode.PROCESSED`` ones (after temperature), the convention of
``Rollout.logprobs``; with ``rollout.top_p`` < 1 they are also renormalised over the kept tokens.

What has run (docs/trtllm.md): on the CPU, the weight stream at TP=2 x PP=2, this engine at TP=2 and PP=2 with
an HF model standing in for TensorRT-LLM's workers behind the same calls, and its Ray placement with real Ray.
It has not run against TensorRT-LLM: no wheel installs on these machines.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import Rollout, SamplingParams, each_rollout

INSTALL = ("pip install tensorrt-llm (NVIDIA's wheel for your CUDA; a 1.x release whose SamplingParams has "
           "logprobs_mode and whose llmapi has rlhf_utils.WorkerExtension) and ray")
WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"


class TrtllmUnavailable(RuntimeError):
    pass


def _import_trtllm():
    try:
        os.environ.setdefault("TLLM_DISABLE_MPI", "1")  # the Ray executor, not MPI under torchrun's env
        import tensorrt_llm
    except ImportError as e:
        raise TrtllmUnavailable(f"rollout.engine=trtllm needs TensorRT-LLM: {INSTALL} ({e})") from None
    return tensorrt_llm


def processed_logprobs_mode(trtllm):
    """``SamplingParams.logprobs_mode`` for log-probs after temperature: the ``LogprobMode.PROCESSED`` enum of
    some 1.x releases, the string ``"processed_logprobs"`` of others (vLLM's names)."""
    try:
        from tensorrt_llm.sampling_params import LogprobMode

        return LogprobMode.PROCESSED
    except (ImportError, AttributeError):
        pass
    if "logprobs_mode" in getattr(trtllm.SamplingParams, "__dataclass_fields__", {}):
        return "processed_logprobs"
    raise TrtllmUnavailable(f"this TensorRT-LLM ({getattr(trtllm, '__version__', '?')}) has no "
                            "SamplingParams.logprobs_mode, so its log-probs would be of the unscaled logits: "
                            f"{INSTALL}")


# TensorRT-LLM's virtual-memory tags (``ExecutorMemoryType`` values) released while the trainer runs: the weights
# and the model's other allocations, woken first for a refit; then the KV cache, woken before generation.  Only
# the values the installed release has are asked for ("model_weights" is in newer releases only).
WEIGHT_TAGS = ("sampler", "drafter", "guided_decoder", "spec_resource_manager", "model_extra", "executor_extra",
               "model", "draft_model", "model_weights", "draft_model_weights")
KV_TAGS = ("kv_cache",)


def memory_tags(known: Optional[Sequence[str]] = None):
    """(weight tags, KV cache tags) for this TensorRT-LLM: those of ``WEIGHT_TAGS`` / ``KV_TAGS`` among the values
    of its ``ExecutorMemoryType`` (``llmapi.llm_args`` in newer releases, ``_torch.virtual_memory`` in older)."""
    if known is None:
        import importlib

        enum = None
        for mod in ("tensorrt_llm.llmapi.llm_args", "tensorrt_llm._torch.virtual_memory"):
            try:
                enum = getattr(importlib.import_module(mod), "ExecutorMemoryType")
                break
            except (ImportError, AttributeError):
                continue
        if enum is None:
            raise TrtllmUnavailable("this TensorRT-LLM has no ExecutorMemoryType (its sleep tags), so it cannot "
                                    "release its memory while the trainer runs: set rollout.trtllm_sleep=false, "
                                    f"or {INSTALL}")
        known = [str(getattr(m, "value", m)) for m in enum]
    known = set(known)
    weights, kv = [t for t in WEIGHT_TAGS if t in known], [t for t in KV_TAGS if t in known]
    if not kv or "model" not in weights:
        raise TrtllmUnavailable(f"this TensorRT-LLM's memory tags {sorted(known)} lack 'kv_cache' or 'model': set "
                                "rollout.trtllm_sleep=false")
    return weights, kv


def sleep_llm_kwargs(llm_args) -> Dict:
    """The ``LLM`` argument that makes its memory releasable, for the release whose ``llmapi.llm_args`` module is
    ``llm_args``: ``sleep_config`` (newer releases), whose KV cache is released without a backup (its contents
    are of the weights before the refit, whose last call resets the prefix cache anyway) and whose weights keep
    the default restore, or the older ``enable_sleep=True``."""
    cls = getattr(llm_args, "TorchLlmArgs", None) or getattr(llm_args, "LlmArgs", None)
    fields = set(getattr(cls, "model_fields", None) or {})
    sleep_config = getattr(llm_args, "SleepConfig", None)
    if "sleep_config" in fields and sleep_config is not None:
        kv = getattr(getattr(llm_args, "ExecutorMemoryType", None), "KV_CACHE", None)
        if kv is not None and "restore_modes" in (getattr(sleep_config, "model_fields", None) or {}):
            return {"sleep_config": sleep_config(restore_modes={kv: "NONE"})}
        return {"sleep_config": sleep_config()}
    if "enable_sleep" in fields:
        return {"enable_sleep": True}
    raise TrtllmUnavailable("this TensorRT-LLM's LLM takes neither sleep_config nor enable_sleep, so it cannot "
                            f"release its memory while the trainer runs: set rollout.trtllm_sleep=false, or {INSTALL}")


def request_params(params: SamplingParams, prompt_index: int, sample: int, stop_ids: Sequence[int],
                   pad_id: int) -> Dict:
    """The keyword arguments of ``tensorrt_llm.SamplingParams`` for sample ``sample`` of prompt ``prompt_index``:
    one response per request, its seed the sum of its stream's pair (``SamplingParams.stream``: distinct for every
    rollout of a call, so two copies of one prompt draw differently too), stop tokens kept in the output, and the
    sampled token's log-prob (the engine's ``make_sampling`` adds ``logprobs_mode=PROCESSED``)."""
    kw = dict(max_tokens=int(params.max_new_tokens), n=1, seed=sum(params.stream(prompt_index, sample)),
              end_id=-1,  # stops come from stop_token_ids, whose token is kept (the end id's would be dropped)
              pad_id=int(pad_id),  # else it would be the end id, -1
              stop_token_ids=[int(i) for i in stop_ids], include_stop_str_in_output=True, detokenize=False,
              logprobs=1)
    if params.greedy:
        kw.update(temperature=1.0, top_k=1, top_p=1.0)
    else:
        kw.update(temperature=float(params.temperature), top_k=0, top_p=float(params.top_p))
    return kw


def to_rollout(prompt_index: int, prompt: List[int], completion, stop_ids: Sequence[int]) -> Rollout:
    """A ``Rollout`` from one ``CompletionOutput`` (``token_ids``; ``logprobs``: per token a {token id: Logprob}
    dict holding the sampled token, or a plain float; ``finish_reason`` 'stop' | 'length' | ...)."""
    ids = [int(t) for t in completion.token_ids]
    lps = []
    for tok, entry in zip(ids, completion.logprobs or []):
        if isinstance(entry, dict):
            if tok not in entry:
                raise RuntimeError(f"TensorRT-LLM returned no log-prob for the sampled token {tok} "
                                   f"(got {sorted(entry)[:4]})")
            entry = entry[tok]
        lps.append(float(getattr(entry, "logprob", entry)))
    if len(lps) != len(ids):
        raise RuntimeError(f"TensorRT-LLM returned {len(lps)} log-probs for {len(ids)} tokens (logprobs=1 asked)")
    finished = bool(ids) and ids[-1] in set(stop_ids)
    if getattr(completion, "finish_reason", None) == "stop" and not finished:
        # the policy has to learn its stop token: a response without it would train as a truncated one
        raise RuntimeError(f"TensorRT-LLM stopped a response (stop reason {getattr(completion, 'stop_reason', None)!r})"
                           f" but left its stop token out of token_ids (ends {ids[-3:]}); this release does not keep "
                           "stop tokens with include_stop_str_in_output=True")
    return Rollout(prompt_index=prompt_index, prompt_ids=list(prompt), response_ids=ids, logprobs=lps,
                   finished=finished, extra={"finish_reason": str(getattr(completion, "finish_reason", ""))})


class TrtllmEngine:
    """``rollout.engine: trtllm`` (see the module docstring).  Every rank of a model-parallel group calls
    ``generate`` with the same prompts and ``update_weights`` together, as with the embedded engine.

    What is TensorRT-LLM's comes in from ``start_trtllm_engine``: ``start_llm(gpus)`` (on the leader: the
    ``LLM`` on those node GPU ids, and whether it started a Ray instance for it, which ``close`` stops),
    ``make_sampling(**kw)`` (its ``SamplingParams``), this rank's GPU UUID (``device_uuid``, the key its workers
    look their handles up by) and node GPU id (``gpu``), and ``sleep_tags``: (weight tags, KV cache tags) that
    ``sleep`` releases, from ``memory_tags``, or None to keep everything resident."""

    def __init__(self, policy, hf_config, stop_ids: Sequence[int], pad_id: int, bucket_mb: float, dtype: torch.dtype,
                 start_llm: Callable[[List[str]], object], make_sampling: Callable[..., object],
                 device_uuid: str, gpu: str, max_seq_len: int = 0,
                 sleep_tags: Optional[tuple] = None):
        from megatron.core import parallel_state as mps

        from ..models.convert import HFWeightStream

        self.stop_ids = list(dict.fromkeys(int(i) for i in stop_ids))
        self.pad_id = int(pad_id)
        self.max_seq_len = int(max_seq_len)  # the LLM's; 0: not checked here
        self.bucket_bytes = max(1, int(bucket_mb * (1 << 20)))
        self.dtype = dtype
        self.stream = HFWeightStream(policy.model, hf_config)
        self.make_sampling = make_sampling
        self.uuid = device_uuid
        self.group = mps.get_model_parallel_group() if dist.is_initialized() else None
        self.leader = dist.get_process_group_ranks(self.group)[0] if self.group is not None else 0
        self.is_leader = not dist.is_initialized() or dist.get_rank() == self.leader
        where = self._gather((os.uname().nodename, gpu))
        self.llm = None
        self._own_ray = False
        self.weights_version: Optional[int] = None
        self.stats: Dict[str, float] = {}
        # (weight tags, KV cache tags) that sleep() releases; None: sleep() releases nothing
        self.sleep_tags = None if sleep_tags is None else (list(sleep_tags[0]), list(sleep_tags[1]))
        self.released: List[str] = []  # the tags released now, in the order they were
        if self.is_leader:
            hosts = sorted({h for h, _ in where})
            if len(hosts) > 1:
                raise TrtllmUnavailable(f"rollout.engine=trtllm: a model-parallel group spans nodes {hosts}; its "
                                        "GPUs share weights over CUDA IPC, so keep TP x PP within a node")
            self.llm, self._own_ray = start_llm(list(dict.fromkeys(g for _, g in where)))

    # --------------------------------------------------------------------------------------- group plumbing
    def _gather(self, obj) -> Optional[list]:
        if self.group is None or dist.get_world_size(self.group) == 1:
            return [obj]
        out = [None] * dist.get_world_size(self.group) if self.is_leader else None
        dist.gather_object(obj, out, dst=self.leader, group=self.group)
        return out

    def _broadcast(self, obj):
        from ..parallel import mp_broadcast_object

        return mp_broadcast_object(obj)  # the leader's, on the group (self.group, from self.leader)

    def _barrier(self) -> None:
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.barrier(group=self.group)

    def _wakeup(self, tags: List[str]) -> None:
        """Bring back the released ones of ``tags`` (every rank of the group calls it, as sleep)."""
        tags = [t for t in self.released if t in tags]
        if not tags:
            return
        if torch.cuda.is_available():  # the trainer's cached, unused blocks (the update's activations) back to the
            torch.cuda.empty_cache()    # driver: the engine's workers map their memory again from what is free
        if self.is_leader:
            self.llm._collective_rpc("wakeup", args=(tags,))
        self._barrier()
        self.released = [t for t in self.released if t not in tags]

    # ------------------------------------------------------------------------------------------- protocol
    @torch.no_grad()
    def update_weights(self, step: Optional[int] = None) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        if self.sleep_tags is not None:
            self._wakeup(self.sleep_tags[0])  # the refit writes into the weights; the KV cache may stay released
        buckets = 0
        for bucket in self.stream.buckets(self.bucket_bytes, dtype=self.dtype):
            handles = self._gather((self.uuid, [(name, reduce_tensor(t)) for name, t in bucket]))
            if self.is_leader:
                by_gpu: Dict[str, list] = {}
                for uuid, items in handles:
                    by_gpu.setdefault(uuid, items)  # one copy per GPU (the ranks of a GPU hold the same tensors)
                self.llm._collective_rpc("update_weights", args=(by_gpu,))
            self._barrier()  # the workers have copied this bucket: its tensors may go
            buckets += 1
        if self.is_leader:
            self.llm._collective_rpc("update_weights", args=(None,))  # post-load processing, prefix cache reset
        self._barrier()
        self.weights_version = step if step is not None else (self.weights_version or 0) + 1
        self.refit_buckets = buckets

    def sleep(self) -> None:
        """Release the engine's GPU memory (its weights and other model allocations, and its KV cache) until
        the next refit and ``wake``; with ``sleep_tags`` None, nothing (the engine keeps its weights and
        ``rollout.trtllm_kv_cache_fraction`` of the memory free after it loaded)."""
        if self.sleep_tags is None:
            return
        tags = [t for t in self.sleep_tags[0] + self.sleep_tags[1] if t not in self.released]
        if not tags:
            return
        if self.is_leader:
            self.llm._collective_rpc("sleep", args=(tags,))
        self._barrier()
        self.released += tags

    def wake(self) -> None:
        """Bring back what ``sleep`` released and the refit did not: the weights first, then the KV cache."""
        if self.sleep_tags is not None:
            self._wakeup(self.sleep_tags[0])
            self._wakeup(self.sleep_tags[1])

    def close(self) -> None:
        """The leader shuts the LLM down (its Ray workers; TensorRT-LLM stops a Ray it started itself), then the
        private Ray instance it started for them."""
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
            if self._own_ray:
                import ray

                ray.shutdown()

    def generate(self, prompts: List[List[int]], params: SamplingParams,
                 on_finish: Optional[Callable[[int, Rollout], None]] = None) -> List[Rollout]:
        cb = None if on_finish is None else (lambda c, k, r: on_finish(k, r))
        return self.generate_many([(prompts, params)], on_finish=cb)[0]

    def generate_many(self, calls: Sequence[Tuple[List[List[int]], SamplingParams]],
                      on_finish: Optional[Callable[[int, int, Rollout], None]] = None) -> List[List[Rollout]]:
        """Several ``generate`` calls' requests submitted to the engine together (each with its own sampling
        settings), so its in-flight batching decodes them as one pool; one list of rollouts per call, as
        ``generate`` returns it; ``on_finish(call, index, rollout)``."""
        if self.weights_version is None:
            raise RuntimeError("the TensorRT-LLM engine holds dummy weights until update_weights() is called")
        if self.released:
            raise RuntimeError(f"the TensorRT-LLM engine is asleep ({', '.join(self.released)} released); call "
                               "wake() before generate()")
        calls = [(prompts, params) for prompts, params in calls]
        for prompts, params in calls:
            if any(len(p) == 0 for p in prompts):
                raise ValueError("empty prompt given to the rollout engine")
            params.check(len(prompts))
            longest = max((len(p) for p in prompts), default=0)
            if self.max_seq_len and longest + params.max_new_tokens > self.max_seq_len:
                raise ValueError(f"a prompt of {longest} tokens + {params.max_new_tokens} new tokens exceeds the "
                                 f"TensorRT-LLM engine's max_seq_len {self.max_seq_len} "
                                 f"(model.max_position_embeddings); data.max_prompt_tokens="
                                 f"{self.max_seq_len - params.max_new_tokens} skips such prompts")
        rollouts = None
        if self.is_leader:
            try:
                rollouts = self._generate_on_leader(calls, on_finish)
            except Exception as e:  # noqa: BLE001 - every rank of the group raises it, none waits on the broadcast
                rollouts = RuntimeError(f"TensorRT-LLM generation failed on the group's leader (rank {self.leader}): "
                                        f"{type(e).__name__}: {e}")
        rollouts = self._broadcast(rollouts)
        if isinstance(rollouts, BaseException):
            raise rollouts
        flat = [r for rs in rollouts for r in rs]
        self.stats = {"rollouts": float(len(flat)), "tokens": float(sum(len(r.response_ids) for r in flat))}
        if on_finish is not None and not self.is_leader:
            for c, rs in enumerate(rollouts):
                for k, r in enumerate(rs):
                    on_finish(c, k, r)
        return rollouts

    def _generate_on_leader(self, calls, on_finish) -> List[List[Rollout]]:
        """Every request of every call submitted at once (``generate_async``), then taken in order as
        ``LLM.generate`` does, each handed to ``on_finish`` as soon as it is in: the verifiers (which run on this
        rank) start on the first rollouts while the later ones decode."""
        futures = [(c, i, self.llm.generate_async(
            {"prompt_token_ids": [int(t) for t in p]},
            sampling_params=self.make_sampling(**request_params(params, i, s, self.stop_ids, self.pad_id))))
            for c, i, s, p, params in each_rollout(calls)]
        rollouts: List[List[Rollout]] = [[] for _ in calls]
        for c, i, fut in futures:
            rollouts[c].append(to_rollout(i, calls[c][0][i], fut.result().outputs[0], self.stop_ids))
            if on_finish is not None:
                on_finish(c, len(rollouts[c]) - 1, rollouts[c][-1])
        return rollouts


def _start_llm(trtllm, hf_dir: str, gpus: List[str], dtype: torch.dtype, max_batch_size: int, max_seq_len: int,
               kv_cache_fraction: float, sleep_kwargs: Optional[Dict] = None):
    try:
        import ray
    except ImportError:
        raise TrtllmUnavailable(f"rollout.engine=trtllm needs Ray for TensorRT-LLM's workers: {INSTALL}") from None
    from tensorrt_llm.llmapi import KvCacheConfig

    tp = len(gpus)
    # a private Ray instance that sees only this group's GPUs (read by its raylet when it starts; this process's
    # CUDA context is made already), so the engine's workers land on the GPUs whose ranks feed them
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    # block reuse (prefix caching): a prompt's n samples share its prefill; the refit's last call resets the cache
    own_ray = not ray.is_initialized()
    try:
        if own_ray:
            ray.init(address="local", num_gpus=tp, include_dashboard=False, log_to_driver=False)
        return trtllm.LLM(model=hf_dir, skip_tokenizer_init=True, tensor_parallel_size=tp, dtype=_DTYPE[dtype],
                          load_format="dummy", orchestrator_type="ray", ray_worker_extension_cls=WORKER_EXTENSION,
                          max_batch_size=int(max_batch_size), max_seq_len=int(max_seq_len),
                          kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=float(kv_cache_fraction),
                                                        enable_block_reuse=True),
                          **(sleep_kwargs or {})), own_ray
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


def _physical_gpu(index: int) -> str:
    """The node's id of this process's CUDA device ``index``: its entry of CUDA_VISIBLE_DEVICES, when set."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def build_trtllm_engine(cfg, policy, tokenizer) -> TrtllmEngine:
    """The trainer's engine (``rollout.engine: trtllm``), refit once from the policy's weights as they are now.
    The HF directory TensorRT-LLM reads its config from is ``model.hf_path``, else one written into the run
    directory from the model config (its weights are never read: the engine starts from dummy weights)."""
    r = cfg.rollout
    return start_trtllm_engine(policy, cfg.model, os.path.join(cfg.output_dir, cfg.name, "trtllm_hf"),
                               tokenizer.stop_ids, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               batch_size=r.batch_size, kv_cache_fraction=r.trtllm_kv_cache_fraction,
                               bucket_mb=r.trtllm_bucket_mb, sleep=r.trtllm_sleep)


def start_trtllm_engine(policy, mcfg, config_dir: str, stop_ids: Sequence[int], eos_id: int, pad_id: int,
                        batch_size: int, kv_cache_fraction: float, bucket_mb: float,
                        sleep: bool = True) -> TrtllmEngine:
    """A TensorRT-LLM engine for ``policy`` (model config ``mcfg``; an HF ``config.json`` written to
    ``config_dir`` when ``mcfg.hf_path`` is empty), refit once from the policy's weights; with ``sleep``, one that
    releases its GPU memory while the trainer runs (``rollout.trtllm_sleep``)."""
    import json

    from ..models.convert import _DTYPES, hf_config_from_model_config, load_hf_config

    if not torch.cuda.is_available():
        raise TrtllmUnavailable("rollout.engine=trtllm runs on CUDA GPUs; this process sees none")
    trtllm = _import_trtllm()
    from tensorrt_llm._torch.utils import get_device_uuid

    hf_dir = getattr(mcfg, "hf_path", "")
    if hf_dir:
        hf_config = load_hf_config(hf_dir)
    else:
        hf_config = hf_config_from_model_config(mcfg, policy.vocab_size, eos_token_id=eos_id, pad_token_id=pad_id)
        hf_dir = config_dir
        if not dist.is_initialized() or dist.get_rank() == 0:
            os.makedirs(hf_dir, exist_ok=True)
            with open(os.path.join(hf_dir, "config.json"), "w") as f:
                json.dump(hf_config, f, indent=2)
        if dist.is_initialized():
            dist.barrier()
    dtype = _DTYPES[mcfg.params_dtype]

    sleep_tags = memory_tags() if sleep else None
    if sleep:
        from tensorrt_llm.llmapi import llm_args

        sleep_kwargs = sleep_llm_kwargs(llm_args)
    else:
        sleep_kwargs = None

    def start(gpus):
        return _start_llm(trtllm, hf_dir, gpus, dtype, batch_size, mcfg.max_position_embeddings, kv_cache_fraction,
                          sleep_kwargs)

    mode = processed_logprobs_mode(trtllm)

    def sampling(**kw):  # the log-probs after temperature (the default, raw, would be of the unscaled logits)
        return trtllm.SamplingParams(logprobs_mode=mode, **kw)

    index = torch.cuda.current_device()
    engine = TrtllmEngine(policy, hf_config, stop_ids, pad_id, bucket_mb, dtype, start, sampling,
                          str(get_device_uuid(index)), _physical_gpu(index), max_seq_len=mcfg.max_position_embeddings,
                          sleep_tags=sleep_tags)
    engine.update_weights(0)
    return engine
