"""Megatron-core on CPU: the one place in megaprorl that special-cases the CPU.

Megatron-core 0.16 assumes CUDA in a few places that matter for a small policy trained on CPU
(the built-in demo, the test-suite, TP=2 over gloo):

1. ``torch.cuda.current_device()`` is used as a *device* argument (rotary ``inv_freq``, TP
   mappings, layer construction).  Without CUDA we make it answer ``"cpu"``.
2. ``DotProductAttention`` enters ``get_cuda_rng_tracker().fork()``, which needs CUDA RNG states.
   Without CUDA the fork is a no-op context (dropout is off in RL anyway), and
   ``model_parallel_cuda_manual_seed`` seeds only the CPU generator.
3. The pipeline schedules allocate token counters with ``torch.zeros(..., device="cuda")``.  We
   give those modules a view of ``torch`` whose tensor factories map ``"cuda"`` to the CPU.
4. Pipeline p2p communication calls ``torch.cuda.synchronize()``, which raises on a CPU build of
   torch; without CUDA it becomes a no-op.
5. Megatron's DDP grad buffers, its optimizers and grad clipping allocate on ``"cuda"`` literally
   (the same torch view as 3), and classify parameters by their CUDA type name
   (``param.type() == 'torch.cuda.FloatTensor'``): inside the optimizers' constructors and the clipping
   function a CPU tensor's ``type()`` answers with the CUDA name of its dtype.

6. With tied embeddings under pipeline parallelism the last stage's copy of the embedding is moved
   with ``weight.data.cuda()`` before the first/last-stage all-reduce that initialises it
   (``LanguageModule.setup_embeddings_and_output_layer``); inside that method ``Tensor.cuda()`` leaves
   a CPU tensor where it is.

7. The all-to-all MoE token dispatcher (expert parallelism across data-parallel replicas) copies its split
   sizes to the host on a side CUDA stream, made when the first dispatcher is built, and hands them to
   ``all_to_all_single`` as the numpy arrays the copy returns.  Without CUDA the dispatcher's module gets a
   torch view whose ``torch.cuda`` streams and events do nothing, and its host copy turns CPU tensors into
   numpy arrays as the CUDA copy does.

8. Activation recomputation (``model.recompute_granularity``): Megatron's ``CheckpointFunction`` saves the
   CUDA generator's state with the CPU one's in the forward and restores both around the recomputed
   forward.  Without CUDA there is no CUDA generator: its state is ``None`` and restoring it does nothing
   (the CPU generator's is saved and restored as before).

``install()`` is idempotent and does nothing at all when CUDA is available, so GPU runs execute
Megatron unmodified.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

_INSTALLED = False


def cpu_mode() -> bool:
    return not torch.cuda.is_available()


class _CpuTorchView(types.ModuleType):
    """A stand-in for the ``torch`` module inside one Megatron module: tensor factories called with
    ``device="cuda"`` allocate on the CPU; everything else is torch itself."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        obj = getattr(torch, name)
        if name in self._FACTORIES:
            @functools.wraps(obj)
            def factory(*args, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and str(dev).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return obj(*args, **kwargs)
            return factory
        return obj


def install() -> None:
    """Make Megatron-core usable on CPU (no-op when CUDA is available)."""
    global _INSTALLED
    if _INSTALLED or not cpu_mode():
        return
    _INSTALLED = True

    # 1. current_device() -> "cpu" (Megatron passes it as device=...).
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

    # 2. CUDA RNG tracker: fork is a no-op, seeding touches only the CPU generator.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()  # type: ignore

    def _cpu_manual_seed(seed, *args, **kwargs):
        torch.manual_seed(seed)

    mrandom.model_parallel_cuda_manual_seed = _cpu_manual_seed
    import megatron.core.tensor_parallel as tp

    tp.model_parallel_cuda_manual_seed = _cpu_manual_seed

    # 3. Schedules allocate on "cuda" literally.
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuTorchView()

    # 4. Pipeline p2p communication calls torch.cuda.synchronize() around its sends and receives; on a
    #    CPU build that raises.  Nothing runs asynchronously on a CPU device, so it is a no-op here.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

    # 5. Megatron's DDP buffers, optimizers and grad clipping.
    import megatron.core.utils as mutils
    from megatron.core.distributed import param_and_grad_buffer as mbuf
    from megatron.core.optimizer import clip_grads as mclip
    from megatron.core.optimizer import distrib_optimizer as mdo
    from megatron.core.optimizer import optimizer as mopt

    for mod in (mbuf, mclip, mdo, mopt, mutils):  # utils: the local multi-tensor fallbacks
        mod.torch = _CpuTorchView()
    mdo.DistributedOptimizer.__init__ = _cuda_type_names(mdo.DistributedOptimizer.__init__)
    mopt.Float16OptimizerWithFloat16Params.__init__ = _cuda_type_names(mopt.Float16OptimizerWithFloat16Params.__init__)
    clip = _cuda_type_names(mclip.clip_grad_by_total_norm_fp32)
    mclip.clip_grad_by_total_norm_fp32 = clip
    mopt.clip_grad_by_total_norm_fp32 = clip

    # 6. Tied embeddings at PP > 1: the last stage's embedding copy is moved to "cuda" before its all-reduce.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _cpu_stays(LanguageModule.setup_embeddings_and_output_layer)


    # 7. The all-to-all MoE dispatcher's side stream and host copies.
    from megatron.core.transformer.moe import token_dispatcher as mdisp

    mdisp.torch = _CpuStreamsTorchView()
    mdisp.maybe_move_tensor_to_cpu = _host_copy

    # 8. Activation recomputation saves and restores the CUDA generator's state.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


class _CpuStream:
    """A CUDA stream's interface with nothing to order: on a CPU every operation has finished when it returns."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self):
        return types.SimpleNamespace(synchronize=lambda: None)


_CURRENT_STREAM = _CpuStream()
_CPU_CUDA = types.SimpleNamespace(Stream=_CpuStream, current_stream=lambda device=None: _CURRENT_STREAM,
                                  stream=lambda s: contextlib.nullcontext())


class _CpuStreamsTorchView(_CpuTorchView):
    """``_CpuTorchView`` whose ``torch.cuda`` has streams and events that do nothing."""

    def __getattr__(self, name):
        return _CPU_CUDA if name == "cuda" else super().__getattr__(name)


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's ``maybe_move_tensor_to_cpu`` for CPU tensors: the tensor itself, or as numpy when asked."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


_TENSOR_TYPE = torch.Tensor.type


def _cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _cuda_type_names(fn):
    """Run ``fn`` with ``Tensor.type()`` naming CPU tensors as CUDA ones (Megatron's dtype checks)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        saved = torch.Tensor.type
        torch.Tensor.type = _cuda_named_type
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = saved
    return wrapped


def _cpu_stays(fn):
    """Run ``fn`` with ``Tensor.cuda()`` returning CPU tensors unchanged."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = saved
    return wrapped
