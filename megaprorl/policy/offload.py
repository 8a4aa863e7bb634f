"""Host offload of a policy's idle state: the trainable policy's optimizer state and gradient buffers, or a
frozen reference's weights, in host memory while the rollouts, evaluations and log-prob passes run.

Each tensor's *storage* is emptied in place (``untyped_storage().resize_(0)``) after its bytes were copied to
a host buffer, and refilled in place before the state is used again, so every view of it stays the same
Python object: Adam's ``exp_avg`` / ``exp_avg_sq``, the optimizer's fp32 main weights, Megatron DDP's
contiguous grad buffer and the ``main_grad`` views into it (Megatron's own ``offload_grad_buffers`` frees its
grad buffers the same way).  Storages shared with the model's weights are never touched: the rollout engine
samples with them.  Gradient storages are emptied without a copy and come back zeroed (every update starts
from zero gradients anyway).  On a GPU the host buffers are pinned and kept across offloads (their sizes
rarely change: after the first update adds Adam's moments, after an optimizer reset), and the copies are
asynchronous on the current stream, which orders them before any later use.

The saving is the whole of what is offloaded, e.g. for bf16 weights without the distributed optimizer 16
bytes per parameter (fp32 main weight, two moments, fp32 gradient): about 24 GiB for a 1.5B model, which the
embedded engine's ``rollout.kv_cache_fraction`` (counted from free memory) or TensorRT-LLM's KV cache can use.
"""

from __future__ import annotations

import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch


def _storage_key(t: torch.Tensor) -> Tuple[str, int]:
    s = t.untyped_storage()
    return str(s.device), s.data_ptr()


def _as_bytes(storage) -> torch.Tensor:
    """A uint8 tensor over the whole of ``storage`` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class HostOffload:
    """Storages moved to host memory and back in place; see the module docstring.

    ``offload(keep, drop, spare)``: empty the storages of ``keep`` (their bytes copied to host) and of
    ``drop`` (no copy; zero when restored), never those of ``spare``; returns the bytes freed.  With
    ``copy=False`` the storages of the last offload are emptied again without copying, for callers that know
    nothing changed them since their ``restore()`` (the host copy is still theirs).  ``restore()`` refills
    them; both are no-ops when already done."""

    def __init__(self):
        self._held: List[Tuple[object, int, Optional[torch.Tensor]]] = []  # (storage, bytes, host copy or None)
        self._host: List[torch.Tensor] = []  # host buffers, reused while the sizes match
        self.offloaded = False
        self.bytes = 0  # what the last offload freed
        self.seconds = 0.0  # time spent offloading and restoring, for the caller to read and reset

    def offload(self, keep: Iterable[torch.Tensor], drop: Iterable[torch.Tensor] = (),
                spare: Iterable[torch.Tensor] = (), copy: bool = True) -> int:
        if self.offloaded:
            return self.bytes
        t0 = time.perf_counter()
        if copy or not self._held:
            self._collect(keep, drop, spare)
            copy = True
        elif any(s.nbytes() != n for s, n, _ in self._held):
            raise RuntimeError("HostOffload.offload(copy=False): the storages changed size since the last offload")
        cuda = False
        for storage, nbytes, host in self._held:
            if host is not None and copy:
                host.copy_(_as_bytes(storage), non_blocking=True)
            cuda = cuda or storage.device.type == "cuda"
        if cuda:  # the copies must land before the blocks go back to the allocator and to other processes
            torch.cuda.synchronize()
        for storage, _, _ in self._held:
            storage.resize_(0)
        if cuda:  # give the freed blocks back, so that free-memory counts (TensorRT-LLM's KV cache) see them
            torch.cuda.empty_cache()
        self.offloaded = True
        self.seconds += time.perf_counter() - t0
        return self.bytes

    def restore(self) -> None:
        if not self.offloaded:
            return
        t0 = time.perf_counter()
        for storage, nbytes, host in self._held:
            storage.resize_(nbytes)
            if host is None:
                _as_bytes(storage).zero_()
            else:
                _as_bytes(storage).copy_(host, non_blocking=True)
        self.offloaded = False
        self.seconds += time.perf_counter() - t0

    def _collect(self, keep, drop, spare) -> None:
        spared = {_storage_key(t) for t in spare}
        chosen: Dict[Tuple[str, int], Tuple[object, bool]] = {}
        for tensors, copy in ((keep, True), (drop, False)):
            for t in tensors:
                s = t.untyped_storage()
                k = _storage_key(t)
                if k in spared or s.nbytes() == 0:
                    continue
                if k not in chosen or copy:  # a storage both kept and dropped is kept
                    chosen[k] = (s, copy)
        held = [(s, s.nbytes(), copy) for s, copy in chosen.values()]
        sizes = [n for _, n, copy in held if copy]
        if [h.numel() for h in self._host] != sizes:
            pin = torch.cuda.is_available() and any(s.device.type == "cuda" for s, _, _ in held)
            self._host = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in sizes]
        hosts = iter(self._host)
        self._held = [(s, n, next(hosts) if copy else None) for s, n, copy in held]
        self.bytes = sum(n for _, n, _ in held)
