"""Checkpoints of everything a run needs to continue exactly, written atomically.

Layout: ``RUN_DIR/checkpoints/step_000012/`` holding ``model/`` (policy, optimizer state and reference
through Megatron's dist_checkpointing, see ``megaprorl.dist_ckpt``: it loads at any TP/PP/DP layout),
one ``rank_XXXXX.pt`` per rank (RNG states, data-sampler position) and ``trainer.json`` + ``COMPLETE``
written by rank 0 last; ``COMPLETE`` records the world size and every rank file's size.  A checkpoint
with ``model/`` resumes at another world size (rank 0's sampler position; random streams re-seeded);
older checkpoints held the whole state dicts in the rank files and still load at their own layout.  A checkpoint is first
written to ``step_000012.tmp`` and renamed when every rank is done, so a process killed mid-save
never damages the last good checkpoint.  Saving a step that already has a checkpoint (the end of a
run right after an interval save) moves the old one aside to ``step_000012.old`` first and deletes
it only after the new one is in place, so that step is never missing; an ``.old`` directory left by
a kill in between is used when its step has no complete checkpoint.  ``find_latest`` reports and
skips a directory without ``COMPLETE``, with a missing, truncated or unreadable rank file or an
unreadable ``trainer.json`` (a flipped bit inside a rank file is not detected before loading).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
MODEL_DIR = "model"  # dist_checkpointing of policy, optimizer and reference: loads at any TP/PP/DP layout
OLD = ".old"  # the previous version of a step while it is being saved again


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


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


class CheckpointWriteError(RuntimeError):
    """A save that failed on some rank (a full disk, a quota, a vanished file system): every rank raises it, the
    partial ``step_N.tmp`` is removed and the checkpoints before it are untouched."""


def _agreed(error: Optional[BaseException], what: str) -> None:
    """A barrier that agrees on failure too: when ``error`` is set on any rank, every rank raises
    :class:`CheckpointWriteError` naming the first such rank and its error (a plain barrier would leave the
    others waiting for a rank that raised)."""
    msg = "" if error is None else f"{type(error).__name__}: {error}"
    msgs = [msg]
    if dist.is_initialized() and dist.get_world_size() > 1:
        msgs = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, msg)
    bad = [(r, m) for r, m in enumerate(msgs) if m]
    if bad:
        more = f" (and on {len(bad) - 1} other rank(s))" if len(bad) > 1 else ""
        raise CheckpointWriteError(f"{what} failed on rank {bad[0][0]}{more}: {bad[0][1]}")


def _attempt(fn: Callable[[], None], on: bool = True) -> Optional[BaseException]:
    """Run ``fn`` (where ``on``) and return what it raised, for :func:`_agreed`; Ctrl-C and exits pass through
    (torch's DCP raises its ``CheckpointException``, a BaseException, on every rank)."""
    if not on:
        return None
    try:
        fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        return e
    return None


def save(root: str, step: int, rank_state: Dict, trainer_state: Dict, keep_last: int = 3,
         write_model: Optional[Callable[[str], None]] = None, keep: Iterable[int] = ()) -> str:
    """Collective: every rank calls it.  Returns the final directory.

    ``write_model(dir)``, when given, is called on every rank to write the layout-independent model
    state (``megaprorl.dist_ckpt``) into ``MODEL_DIR`` inside the checkpoint, before the rank files.
    The checkpoints of the steps in ``keep`` are not pruned (``checkpoint.keep_best``).  A write that fails on
    any rank raises :class:`CheckpointWriteError` on every rank, with ``step_N.tmp`` removed."""
    final = step_dir(root, step)
    tmp = final + ".tmp"
    main = _rank() == 0

    def start():
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)

    def rank_file():
        path = os.path.join(tmp, _rank_file(_rank()))
        torch.save(rank_state, path + ".part")
        _fsync_file(path + ".part")
        os.replace(path + ".part", path)

    def complete():
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(trainer_state, f, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        world = dist.get_world_size() if dist.is_initialized() else 1
        sizes = {_rank_file(r): os.path.getsize(os.path.join(tmp, _rank_file(r))) for r in range(world)}
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(json.dumps({"step": step, "world_size": world, "files": sizes}))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):  # a re-save of this step: keep the previous version until the new one is in
            old = final + OLD
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    try:
        _agreed(_attempt(start, main), f"creating {tmp}")
        if write_model is not None:
            _agreed(_attempt(lambda: write_model(os.path.join(tmp, MODEL_DIR))), "writing the model state")
        _agreed(_attempt(rank_file), "writing the rank files")
        _agreed(_attempt(complete, main), f"completing {final}")
    except CheckpointWriteError:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        try:
            _prune(root, keep_last, keep)
        except OSError as e:  # the checkpoint is complete; the next save prunes again
            print(f"[checkpoint] pruning {root} failed ({e}); the older checkpoints stay until the next save")
    _barrier()
    return final


def _prune(root: str, keep_last: int, keep: Iterable[int] = ()) -> None:
    complete = {path for _, path in list_checkpoints(root, verbose=False)}
    for name in os.listdir(root):  # leftovers of saves that were killed
        full = os.path.join(root, name)
        if name.endswith(".tmp"):
            shutil.rmtree(full, ignore_errors=True)
        elif name.endswith(OLD) and name.startswith("step_"):
            final = full[: -len(OLD)]
            if final in complete or full not in complete:  # its replacement is in, or it was partly deleted
                shutil.rmtree(full, ignore_errors=True)
            elif not os.path.exists(final):  # killed before its replacement was in: the version left
                os.replace(full, final)
    ckpts = list_checkpoints(root, verbose=False)
    if keep_last <= 0:
        return
    steps = sorted({s for s, _ in ckpts})
    keep = set(keep)
    for s in (s for s in steps[:-keep_last] if s not in keep):
        for _, path in (c for c in ckpts if c[0] == s):
            shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(root: str, verbose: bool = True) -> List[Tuple[int, str]]:
    """Complete checkpoints (step, dir), oldest first; incomplete ones are reported and skipped.

    A step with both a checkpoint and an ``.old`` version (a re-save killed after moving the old one
    aside) lists the ``.old`` one first, so that ``find_latest`` tries it only when the other is unusable.
    """
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
        is_old = name.endswith(OLD)
        digits = name[len("step_"): -len(OLD) if is_old else None]
        if not digits.isdigit():
            continue
        if not os.path.exists(os.path.join(full, COMPLETE)):
            if verbose:
                print(f"[checkpoint] skipping {full}: incomplete (no {COMPLETE} marker)")
            continue
        out.append((int(digits), 0 if is_old else 1, full))
    return [(step, full) for step, _, full in sorted(out)]


def validate(path: str, world_size: int) -> Optional[str]:
    """None when the checkpoint looks loadable, else the reason it is not.

    Checks the marker, the world size, ``trainer.json``, and each rank file: present, of the size
    recorded at save time, and a readable torch archive (its zip directory, at the end of the file).
    """
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            meta = json.loads(f.read())
        saved_world = meta.get("world_size")
        if saved_world != world_size and not has_model_dir(path):
            return f"saved with world size {saved_world}, this run has {world_size} (and no layout-independent {MODEL_DIR}/)"
        with open(os.path.join(path, "trainer.json")) as f:
            json.load(f)
        if has_model_dir(path) and not os.path.exists(os.path.join(path, MODEL_DIR, "metadata.json")):
            return f"{os.path.join(path, MODEL_DIR)} has no metadata.json (an incomplete dist checkpoint)"
        sizes = meta.get("files", {})
        for r in range(saved_world):
            p = os.path.join(path, _rank_file(r))
            if not os.path.exists(p) or os.path.getsize(p) == 0:
                return f"missing or empty {p}"
            want = sizes.get(_rank_file(r))
            if want is not None and os.path.getsize(p) != want:
                return f"{p} has {os.path.getsize(p)} bytes, {want} were written (truncated or replaced)"
            with zipfile.ZipFile(p) as z:
                z.namelist()
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return f"unreadable ({e})"
    return None


def find_latest(root: str, world_size: int) -> Optional[str]:
    for step, path in reversed(list_checkpoints(root)):
        why = validate(path, world_size)
        if why is None:
            if path.endswith(OLD):
                print(f"[checkpoint] using {path}: the previous version of step {step} (its re-save was interrupted)")
            return path
        print(f"[checkpoint] skipping {path}: {why}")
    return None


def agree(choose: Callable[[], Optional[str]], world_size: int) -> Optional[str]:
    """The checkpoint every rank resumes from: rank 0 runs ``choose`` (``find_latest``, or the validation of a
    named checkpoint) and sends its answer, or its ``ValueError``, to the other ranks, which raise the same
    error; then each rank validates the chosen checkpoint in its own view of the file system, and if one cannot
    use it, every rank raises, naming that rank and why.  Ranks that chose on their own could resume from
    different steps on a file system that shows them different directories (client caches), or hang when
    only some of them failed."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return choose()
    box: List = [None]
    failed = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", choose())]
        except Exception as e:  # noqa: BLE001 - sent on, so that the other ranks do not wait for an answer
            failed = e
            box = [("error", str(e) if isinstance(e, ValueError) else f"rank 0: {type(e).__name__}: {e}")]
    dist.broadcast_object_list(box, src=0)
    kind, path = box[0]
    if failed is not None:
        raise failed
    if kind == "error":
        raise ValueError(path)
    why = validate(path, world_size) if path is not None and dist.get_rank() != 0 else None
    views: List = [None] * dist.get_world_size()
    dist.all_gather_object(views, why)
    bad = [(r, w) for r, w in enumerate(views) if w]
    if bad:
        more = f" (and {len(bad) - 1} other rank(s))" if len(bad) > 1 else ""
        raise ValueError(f"checkpoint {path}, chosen by rank 0, is not usable on rank {bad[0][0]}{more}: {bad[0][1]}; "
                         "do all ranks see the same checkpoint directory?")
    return path


def resolve_checkpoint(path: str, key: str) -> str:
    """The checkpoint that ``path`` names, for reading its model state: a step directory, or a checkpoints
    root / run directory (its newest complete checkpoint with a ``MODEL_DIR``).  ``key`` (the config key
    or option that gave the path) is named in the error when there is none."""
    if not os.path.isdir(path):
        raise ValueError(f"{key}: {path!r} is not a directory")
    if os.path.exists(os.path.join(path, COMPLETE)):
        if not has_model_dir(path):
            raise ValueError(f"{key}: checkpoint {path} has no {MODEL_DIR}/ (written before distributed checkpoints)")
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        usable = [p for _, p in list_checkpoints(root, verbose=False) if has_model_dir(p)]
        if usable:
            return usable[-1]
    raise ValueError(f"{key}: no complete checkpoint in {path!r} (give a step_XXXXXXXX directory, its "
                     "checkpoints/ directory or the run directory)")


def has_model_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, MODEL_DIR))


def saved_world_size(path: str) -> int:
    with open(os.path.join(path, COMPLETE)) as f:
        return int(json.loads(f.read())["world_size"])


def load(path: str) -> Tuple[Dict, Dict]:
    """This rank's state and the trainer state of checkpoint ``path``.  When the checkpoint was saved
    with another world size (a layout change, allowed with a ``MODEL_DIR``), rank 0's file is read and
    its ``"rank_changed"`` key is set: per-rank random streams cannot carry over."""
    rank = _rank()
    changed = saved_world_size(path) != (dist.get_world_size() if dist.is_initialized() else 1)
    rank_file = os.path.join(path, _rank_file(0 if changed else rank))
    try:
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"checkpoint file {rank_file} cannot be loaded: {e}") from e
    with open(os.path.join(path, "trainer.json")) as f:
        trainer_state = json.load(f)
    rank_state["rank_changed"] = changed
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
