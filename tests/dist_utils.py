"""Run a function in N gloo processes (CPU) and collect what each rank returns."""

import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, environ):
    import torch
    import torch.distributed as dist

    os.environ.clear()  # the caller's environment now, not the fork server's from when it started
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # plain pickle: tensors travel as bytes, not as shared-memory fds that die with this process
        queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # report any failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Imported once by the fork server, so each rank starts with them loaded (Megatron-core's import alone
# is ~10 s of CPU; a test of 4 ranks on 2 cores paid ~20 s of it before doing anything).  The server
# imports them and nothing else: every rank is still a fresh process with no state from other tests.
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
           "megatron.core.pipeline_parallel", "megaprorl.trainer", "megaprorl.models.gpt",
           "megaprorl.rollout.megatron_engine", "megaprorl.policy"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def run_distributed(fn, world_size=2, args=(), timeout=300):
    """Start ``world_size`` processes running ``fn(rank, world_size, *args)``; return [result per rank].

    ``fn`` must be importable (module level) and return picklable values (CPU tensors are fine).
    The processes are forked from a server that has imported ``PRELOAD`` (nothing runs there) and
    run with this process's environment as it is at the call.
    """
    ctx = _context()
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, dict(os.environ))) for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world_size):
            rank, status, out = queue.get(timeout=timeout)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{out}")
            results[rank] = pickle.loads(out)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
