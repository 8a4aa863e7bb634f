"""Layout-independent checkpoints of the policy, its AdamW state and the reference, through Megatron's
``dist_checkpointing`` (the ``torch_dist`` format).

Every tensor is saved as a ``ShardedTensor`` with its global shape and this rank's offsets, so a
checkpoint written at one TP/PP/DP layout loads at another: the loader reads the slices it needs.
The vocabulary-padded embedding and output layer load with ``allow_shape_mismatch`` (the padding
depends on TP).  AdamW's ``exp_avg`` / ``exp_avg_sq`` follow their parameter's sharding (Megatron's
``optim_state_to_sharding_state``); its per-parameter ``step`` is one number for the whole model and
is kept in the common state.

    save_policy(directory, policy, reference=None, extra_common=None)      # collective
    load_policy(directory, policy, reference=None, load_optimizer=True)    # collective -> common dict
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

REFERENCE_PREFIX = "reference."
STEP_KEY = "adam_step"


def _model_sharded(model, prefix: str = "") -> Dict:
    sd = model.sharded_state_dict(prefix=prefix)
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


def _optimizer_params(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]


def _ensure_adam_state(optimizer) -> None:
    """AdamW creates its moments at the first step; a template for loading needs them to exist."""
    for p in _optimizer_params(optimizer):
        st = optimizer.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _optimizer_sharded(optimizer, model_sd: Dict) -> Dict:
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    params = _optimizer_params(optimizer)
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    if len(id_map) != len(params):
        raise RuntimeError(f"dist checkpoint: {len(params) - len(id_map)} optimizer parameters have no sharded "
                           "model tensor (the optimizer must be built over model.parameters())")
    state = optimizer.state_dict()
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    return state


def _adam_step(optimizer) -> float:
    steps = {float(optimizer.state[p]["step"]) for p in _optimizer_params(optimizer) if "step" in optimizer.state[p]}
    if len(steps) > 1:
        raise RuntimeError(f"dist checkpoint: AdamW parameters are at different steps {sorted(steps)}")
    return steps.pop() if steps else 0.0


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


def save_policy(directory: str, policy, reference=None, extra_common: Optional[Dict] = None) -> None:
    """Collective over all ranks: write ``directory`` (which must not hold another checkpoint)."""
    from megatron.core import dist_checkpointing

    _in_process_results_queue()
    os.makedirs(directory, exist_ok=True)
    model_sd = _model_sharded(policy.model)
    sd: Dict = {"model": model_sd}
    if policy.optimizer is not None and policy.optimizer.state:
        sd["optimizer"] = _optimizer_sharded(policy.optimizer, model_sd)
        sd[STEP_KEY] = _adam_step(policy.optimizer)
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
    has_optim = "optimizer" in common
    if load_optimizer and has_optim and policy.optimizer is not None:
        _ensure_adam_state(policy.optimizer)
        template["optimizer"] = _optimizer_sharded(policy.optimizer, model_sd)
    if reference is not None:
        if not _has_prefix(directory, REFERENCE_PREFIX):
            raise KeyError(f"{directory}: the checkpoint holds no reference policy")
        template["reference"] = _model_sharded(reference.model, REFERENCE_PREFIX)
    loaded = dist_checkpointing.load(template, directory)
    policy.model.load_state_dict(loaded["model"], strict=False)
    _check_loaded(policy.model, loaded["model"], directory)
    if "optimizer" in template:
        state = loaded["optimizer"]
        step = torch.tensor(float(common.get(STEP_KEY, 0.0)))
        for p, (pid, st) in zip(_optimizer_params(policy.optimizer), sorted(state["state"].items())):
            dst = policy.optimizer.state[p]
            dst["exp_avg"].copy_(st["exp_avg"])
            dst["exp_avg_sq"].copy_(st["exp_avg_sq"])
            dst["step"] = step.clone()
    if reference is not None:
        ref = {k[len(REFERENCE_PREFIX):] if k.startswith(REFERENCE_PREFIX) else k: v
               for k, v in loaded["reference"].items()}
        reference.model.load_state_dict(ref, strict=False)
        _check_loaded(reference.model, ref, directory)
    return dict(common.get("common", {}))


def _check_loaded(model, loaded: Dict, directory: str) -> None:
    own = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing = sorted(own - set(loaded))
    if missing:
        raise KeyError(f"{directory}: checkpoint lacks {len(missing)} tensors of this model, e.g. {missing[:3]}")


def _has_prefix(directory: str, prefix: str) -> bool:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(directory)
    return any(k.startswith(prefix) for k in meta)
