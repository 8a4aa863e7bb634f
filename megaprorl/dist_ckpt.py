"""Layout-independent checkpoints of the policy, its optimizer and the reference, through Megatron's
``dist_checkpointing`` (the ``torch_dist`` format).

Every tensor is saved as a ``ShardedTensor`` with its global shape and this rank's offsets, so a
checkpoint written at one TP/PP/DP layout loads at another: the loader reads the slices it needs.
The vocabulary-padded embedding and output layer load with ``allow_shape_mismatch`` (the padding
depends on TP).  The optimizer is Megatron's, saved by its own ``sharded_state_dict``: Adam's
``exp_avg`` / ``exp_avg_sq`` (and the fp32 main weights of bf16 parameters) follow their parameter's
sharding, the step is one number.  The distributed optimizer uses the ``fully_reshardable`` format
(its DP shards gathered to DP rank 0 over gloo when saving), so it too resumes at another TP/PP/DP
layout.  A checkpoint records which optimizer wrote it; resuming with the other one is refused.

    save_policy(directory, policy, reference=None, extra_common=None)      # collective
    load_policy(directory, policy, reference=None, load_optimizer=True)    # collective -> common dict
    load_weights(directory, model, prefix="")                              # collective
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

REFERENCE_PREFIX = "reference."
KIND_KEY = "optimizer_kind"
UPDATES_KEY = "optimizer_updates"


def _model_sharded(model, prefix: str = "") -> Dict:
    sd = model.sharded_state_dict(prefix=prefix)
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


def _optimizer_kind(policy) -> str:
    return "megatron-distributed" if policy.distributed_optimizer else "megatron"


def _optimizer_metadata(policy) -> Dict:
    md = {"chained_optim_avoid_prefix": True}
    if policy.distributed_optimizer:
        # gathered over gloo to DP rank 0 (CPU memory) rather than all-gathered on every GPU
        md.update(distrib_optim_sharding_type="fully_reshardable",
                  distrib_optim_fully_reshardable_mem_efficient=True)
    return md


def _torch_adam_step_on_load() -> None:
    """Megatron 0.16's distributed optimizer, on torch's Adam (no Apex / TE FusedAdam), restores Adam's
    ``step`` from the param groups but then copies every key of the optimizer state, ``step`` included,
    from the loaded shards, which have none (KeyError: 'step').  Hand it the step it already holds."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    if getattr(DO, "_megaprorl_step_fix", False):
        return
    orig = DO._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            gi, go = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[gi]["params"][go]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return orig(self, model_param, tensors)

    DO._set_main_param_and_optimizer_states = set_states
    DO._megaprorl_step_fix = True


def _in_process_results_queue() -> None:
    """Megatron's file writer hands its collected write results to the saving rank through a queue that
    it creates, on first use, from a *spawn*-context ``Manager()``: a server process (plus a resource
    tracker) that outlives a trainer killed with SIGKILL.  We save synchronously, so the results are put
    and taken by this very process (its forked workers report through a local queue of their own): a
    thread-safe in-process queue does the job and dies with the trainer.  (A fork-context mp.Queue does
    not: its feeder thread made the immediate ``get_nowait`` miss the result now and then.)"""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if hasattr(fa, "_results_queue") and fa._results_queue is None:
        fa._results_queue = queue.Queue()


def _drop_nonpersistent_param_state(optimizer_sd: Dict) -> Dict:
    """The distributed optimizer's ``fully_reshardable`` state is gathered to data-parallel rank 0, which saves it
    as sharded entries; on the other ranks ``param_state`` is ``None`` (or a ``LocalNonpersistentObject``), which
    nothing writes.  Megatron's save compares the ranks' unsharded entries and so warned at every save that rank 1's
    differ from rank 0's ("Keys only on 1: [('optimizer', 'param_state')]").  That save-time entry is dropped here
    (a load builds its own state dict, where the ``None`` is needed)."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    state = optimizer_sd.get("param_state", ...)
    if state is None or isinstance(state, LocalNonpersistentObject):
        optimizer_sd = {k: v for k, v in optimizer_sd.items() if k != "param_state"}
    return optimizer_sd


def save_policy(directory: str, policy, reference=None, extra_common: Optional[Dict] = None) -> None:
    """Collective over all ranks: write ``directory`` (which must not hold another checkpoint)."""
    from megatron.core import dist_checkpointing

    _in_process_results_queue()
    os.makedirs(directory, exist_ok=True)
    model_sd = _model_sharded(policy.model)
    sd: Dict = {"model": model_sd}
    if policy.optimizer is not None and policy.updates > 0:
        sd["optimizer"] = _drop_nonpersistent_param_state(
            policy.optimizer.sharded_state_dict(model_sd, metadata=_optimizer_metadata(policy)))
        sd[KIND_KEY] = _optimizer_kind(policy)
        sd[UPDATES_KEY] = policy.updates
    if reference is not None:
        sd["reference"] = _model_sharded(reference.model, REFERENCE_PREFIX)
    sd["common"] = dict(extra_common or {})
    dist_checkpointing.save(sd, directory)


def load_policy(directory: str, policy, reference=None, load_optimizer: bool = True) -> Dict:
    """Collective: fill ``policy`` (and its optimizer, and ``reference``) from ``directory`` whatever the
    layout it was saved at.  Returns the checkpoint's common dict."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(directory)
    model_sd = _model_sharded(policy.model)
    template: Dict = {"model": model_sd}
    has_optim = "optimizer" in common or KIND_KEY in common
    if load_optimizer and has_optim and policy.optimizer is not None:
        kind = common.get(KIND_KEY, "torch-adamw (an older megaprorl)")
        if kind != _optimizer_kind(policy):
            raise ValueError(f"{directory}: its optimizer state was written by the {kind} optimizer, this run uses "
                             f"the {_optimizer_kind(policy)} one (optim.distributed_optimizer="
                             f"{policy.distributed_optimizer}); resume with the setting it was saved with")
        _torch_adam_step_on_load()
        if policy.distributed_optimizer and policy.updates == 0:
            # without Apex/TE, Megatron's distributed optimizer can only describe its state once the state
            # exists: fill it with the dummies Megatron itself uses before a load (overwritten below)
            for opt in policy.optimizer.chained_optimizers:
                opt._init_optimizer_states_with_dummy_values()
        template["optimizer"] = policy.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                    metadata=_optimizer_metadata(policy))
    if reference is not None:
        if not _has_prefix(directory, REFERENCE_PREFIX):
            raise KeyError(f"{directory}: the checkpoint holds no reference policy")
        template["reference"] = _model_sharded(reference.model, REFERENCE_PREFIX)
    loaded = dist_checkpointing.load(template, directory)
    _fill(policy.model, loaded["model"], "", directory)
    if "optimizer" in template:
        policy.optimizer.load_state_dict(loaded["optimizer"])
        # Megatron hands every parameter the same ``step`` tensor, which torch's Adam then increments once
        # per parameter on each update (a wrong bias correction after resuming): one tensor each
        for st in policy.adam_states():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
        policy.updates = int(common.get(UPDATES_KEY, 0))
    elif policy.optimizer is not None:  # new weights, fresh moments: main weights follow the model
        policy.reset_optimizer()
    if reference is not None:
        _fill(reference.model, loaded["reference"], REFERENCE_PREFIX, directory)
    return dict(common.get("common", {}))


def load_weights(directory: str, model, prefix: str = "") -> None:
    """Collective: fill ``model`` (a GPTModel of this rank's layout) with the weights saved under
    ``prefix`` ("" the policy, ``REFERENCE_PREFIX`` the reference), nothing else read."""
    from megatron.core import dist_checkpointing

    if prefix and not _has_prefix(directory, prefix):
        raise KeyError(f"{directory}: the checkpoint holds no tensors under {prefix!r}")
    _fill(model, dist_checkpointing.load({"model": _model_sharded(model, prefix)}, directory)["model"], prefix,
          directory)


def _fill(model, loaded: Dict, prefix: str, directory: str) -> None:
    """Load the tensors read from ``directory`` under ``prefix`` into ``model``; every one it has must be there."""
    sd = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in loaded.items()}
    model.load_state_dict(sd, strict=False)
    _check_loaded(model, sd, directory)


def saved_common(directory: str) -> Dict:
    """The ``extra_common`` dict a checkpoint was saved with (no tensor is read)."""
    from megatron.core import dist_checkpointing

    return dict(dist_checkpointing.load_common_state_dict(directory).get("common", {}))


def _check_loaded(model, loaded: Dict, directory: str) -> None:
    own = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing = sorted(own - set(loaded))
    if missing:
        raise KeyError(f"{directory}: checkpoint lacks {len(missing)} tensors of this model, e.g. {missing[:3]}")


def _has_prefix(directory: str, prefix: str) -> bool:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(directory)
    return any(k.startswith(prefix) for k in meta)
