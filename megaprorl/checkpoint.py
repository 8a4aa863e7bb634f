"""Checkpoints of everything a run needs to continue exactly, written atomically.

Layout: ``RUN_DIR/checkpoints/step_000012/`` holding one ``rank_XXXXX.pt`` per rank (policy and
optimizer shard, reference shard, RNG states) and ``trainer.json`` + ``COMPLETE`` written by rank 0
last.  A checkpoint is first written to ``step_000012.tmp`` and renamed when every rank is done, so a
process killed mid-save never damages the last good checkpoint; a directory without ``COMPLETE``,
or whose files do not load, is reported and skipped by ``find_latest``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def save(root: str, step: int, rank_state: Dict, trainer_state: Dict, keep_last: int = 3) -> str:
    """Collective: every rank calls it.  Returns the final directory."""
    final = step_dir(root, step)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()
    path = os.path.join(tmp, f"rank_{_rank():05d}.pt")
    torch.save(rank_state, path + ".part")
    _fsync_file(path + ".part")
    os.replace(path + ".part", path)
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(trainer_state, f, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        world = dist.get_world_size() if dist.is_initialized() else 1
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(json.dumps({"step": step, "world_size": world}))
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(s for s, _ in list_checkpoints(root, verbose=False))
    for s in done[:-keep_last]:
        shutil.rmtree(step_dir(root, s), ignore_errors=True)
    for name in os.listdir(root):  # leftovers of saves that were killed
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def list_checkpoints(root: str, verbose: bool = True) -> List[Tuple[int, str]]:
    """Complete checkpoints (step, dir), oldest first; incomplete ones are reported and skipped."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if not name.startswith("step_") or not os.path.isdir(full):
            continue
        if name.endswith(".tmp"):
            if verbose:
                print(f"[checkpoint] skipping {full}: an interrupted save (no rename)")
            continue
        if not os.path.exists(os.path.join(full, COMPLETE)):
            if verbose:
                print(f"[checkpoint] skipping {full}: incomplete (no {COMPLETE} marker)")
            continue
        try:
            out.append((int(name[5:]), full))
        except ValueError:
            continue
    return out


def validate(path: str, world_size: int) -> Optional[str]:
    """None when the checkpoint looks loadable, else the reason it is not."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            meta = json.loads(f.read())
        if meta.get("world_size") != world_size:
            return f"saved with world size {meta.get('world_size')}, this run has {world_size}"
        with open(os.path.join(path, "trainer.json")) as f:
            json.load(f)
        for r in range(world_size):
            p = os.path.join(path, f"rank_{r:05d}.pt")
            if not os.path.exists(p) or os.path.getsize(p) == 0:
                return f"missing or empty {p}"
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    return None


def find_latest(root: str, world_size: int) -> Optional[str]:
    for step, path in reversed(list_checkpoints(root)):
        why = validate(path, world_size)
        if why is None:
            return path
        print(f"[checkpoint] skipping {path}: {why}")
    return None


def load(path: str) -> Tuple[Dict, Dict]:
    """This rank's state and the trainer state of checkpoint ``path``."""
    rank_file = os.path.join(path, f"rank_{_rank():05d}.pt")
    try:
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"checkpoint file {rank_file} cannot be loaded: {e}") from e
    with open(os.path.join(path, "trainer.json")) as f:
        trainer_state = json.load(f)
    return rank_state, trainer_state


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o)} in trainer state")
