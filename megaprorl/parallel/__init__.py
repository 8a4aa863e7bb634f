"""Process groups: torch.distributed (gloo on CPU, NCCL on GPU) and Megatron parallel_state."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import compat


@dataclass
class ParallelInfo:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    device: torch.device
    ep: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(tensor_parallel: int = 1, pipeline_parallel: int = 1, timeout_s: float = 1800.0,
                     seed: int = 0, expert_parallel: int = 1) -> ParallelInfo:
    """Initialise torch.distributed (from torchrun's env, or as a single process) and Megatron's
    model-parallel groups.  Idempotent.

    ``expert_parallel`` (config ``parallel.expert_parallel``) folds expert parallelism into tensor
    parallelism: Megatron's expert layout has expert-tensor-parallel size TP / EP and EP ranks, so one
    tensor-parallel group's ranks hold all the experts between them (each its num_experts / EP, split over
    TP / EP ranks) and the experts' data-parallel groups are the dense ones.  The ranks that exchange tokens
    for the experts are then ranks that see the same tokens anyway, which keeps every forward of the
    embedded engine and of the trainer collective over the tensor-parallel group alone.

    At ``tensor_parallel`` = 1 an ``expert_parallel`` > 1 spreads the experts over that many data-parallel
    replicas instead (Megatron's expert parallelism proper, with the all-to-all dispatcher): their ranks hold
    different tokens and exchange them in every MoE layer, so each forward and backward of one must be
    matched by the others (``wide_expert_group``: the engine's ``lockstep`` and the policy's equal micro-batch
    counts).

    ``timeout_s`` (config ``parallel.timeout_s``) bounds every collective of the world group and of
    Megatron's groups: a rank that died or hangs makes the others raise instead of waiting forever
    (gloo: tested in tests/test_reliability.py; NCCL: its watchdog aborts the process when
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` is set, which torchrun does by default)."""
    compat.install()
    from megatron.core import parallel_state as mps

    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if "WORLD_SIZE" not in os.environ:  # a single process, not started by torchrun: own rendezvous
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel) != 0:
        raise ValueError(f"parallel.tensor_parallel ({tensor_parallel}) x parallel.pipeline_parallel "
                         f"({pipeline_parallel}) must divide the world size ({world})")
    if expert_parallel < 1 or (tensor_parallel % expert_parallel and tensor_parallel > 1):
        raise ValueError(f"parallel.expert_parallel ({expert_parallel}) must divide parallel.tensor_parallel "
                         f"({tensor_parallel}): the experts are spread over the ranks of a tensor-parallel group "
                         "(or, at tensor_parallel 1, over data-parallel replicas)")
    if tensor_parallel == 1 and expert_parallel > 1 and (world // pipeline_parallel) % expert_parallel:
        raise ValueError(f"parallel.expert_parallel ({expert_parallel}) across data-parallel replicas must divide "
                         f"their number ({world // pipeline_parallel})")
    if not mps.model_parallel_is_initialized():
        # Megatron's TP/PP/DP groups get their own timeout (30 min unless told): the same as the world group
        mps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                      pipeline_model_parallel_size=pipeline_parallel,
                                      expert_model_parallel_size=expert_parallel,
                                      expert_tensor_parallel_size=max(1, tensor_parallel // expert_parallel),
                                      distributed_timeout_minutes=timeout_s / 60.0)
    from megatron.core import tensor_parallel as mtp

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mtp.model_parallel_cuda_manual_seed(seed)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelInfo(rank=dist.get_rank(), world_size=world, local_rank=local_rank, tp=tensor_parallel,
                        pp=pipeline_parallel, dp=world // (tensor_parallel * pipeline_parallel), device=device,
                        ep=expert_parallel)


def destroy() -> None:
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def wide_expert_group():
    """The expert-parallel group when it spans data-parallel replicas (``parallel.expert_parallel`` > 1 at
    ``parallel.tensor_parallel`` = 1), else None.  Its ranks exchange tokens in every MoE layer, so a forward
    (or backward) of the model on one of them must be matched by one on each of the others, with whatever tokens
    each has."""
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state as mps

    if not mps.model_parallel_is_initialized():
        return None
    if mps.get_expert_model_parallel_world_size() > 1 and mps.get_tensor_model_parallel_world_size() == 1:
        return mps.get_expert_model_parallel_group()
    return None


def max_over(value: int, group, device) -> int:
    """The largest of the ranks' ``value`` over ``group``."""
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def dp_weighted_mean(value: float, weight: float, device) -> float:
    """The ``weight``-weighted mean of a per-rank ``value`` over the data-parallel ranks: each rank's statistics
    describe its share of the batch, and a decision taken on them must be the same on every rank."""
    if not dist.is_initialized() or dp_world() == 1:
        return float(value)
    t = torch.tensor([float(value) * float(weight), float(weight)], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=dp_group())
    return float(t[0] / t[1]) if float(t[1]) > 0 else float(value)


def tp_group():
    from megatron.core import parallel_state as mps

    return mps.get_tensor_model_parallel_group()


def dp_group():
    from megatron.core import parallel_state as mps

    return mps.get_data_parallel_group()


def mp_group():
    """This rank's model-parallel group: the TP x PP ranks of one data-parallel replica, which run on the same
    prompts and rollouts."""
    from megatron.core import parallel_state as mps

    return mps.get_model_parallel_group()


def mp_leader() -> int:
    """The global rank of this rank's model-parallel group's first rank (this rank when not distributed)."""
    if not dist.is_initialized():
        return 0
    return dist.get_process_group_ranks(mp_group())[0]


def mp_broadcast_object(obj):
    """The model-parallel group's first rank's ``obj`` (picklable), on every rank of the group."""
    if not dist.is_initialized() or dist.get_world_size(mp_group()) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=mp_leader(), group=mp_group())
    return box[0]


class _AllReduceGradTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_grad_tp(x: torch.Tensor) -> torch.Tensor:
    """Identity in forward; the gradient summed over the tensor-parallel group in backward (what a
    ColumnParallelLinear does for its input).  Megatron's copy_to_tensor_model_parallel_region does the
    same in principle, but megatron-core 0.16's ``_reduce`` all-reduces ``grad.contiguous()`` and returns
    ``grad``: when the gradient arrives as a strided view (through GPTModel's final transpose) the sum is
    made on a copy and lost (NVIDIA/Megatron-LM issue 5337)."""
    if tp_world() == 1:
        return x
    return _AllReduceGradTP.apply(x, tp_group())


def tp_rank() -> int:
    from megatron.core import parallel_state as mps

    return mps.get_tensor_model_parallel_rank()


def tp_world() -> int:
    from megatron.core import parallel_state as mps

    return mps.get_tensor_model_parallel_world_size()


def dp_rank() -> int:
    from megatron.core import parallel_state as mps

    return mps.get_data_parallel_rank()


def dp_world() -> int:
    from megatron.core import parallel_state as mps

    return mps.get_data_parallel_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
