"""What a process holds on its host, for the per-step metrics of long runs (Linux ``/proc``; elsewhere nothing).

A run lasts days; a leak of a few MB, a file descriptor or a child process a step ends it after thousands
of steps, long after the step that leaked.  ``host_stats`` gives, each step:

- ``memory/host_rss_gib``: the trainer process's resident memory;
- ``memory/reward_workers_rss_gib``: the reward pool's worker processes' together;
- ``host/open_fds``, ``host/threads``: the trainer process's;
- ``host/descendants``: live processes below the trainer (reward workers, the forkserver and multiprocessing's
  resource tracker, sandboxed programs still running; a zombie counts until it is reaped).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | str = "self") -> Optional[int]:
    """Resident memory of a process (``/proc/<pid>/statm``), None when it is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _threads(pid: int | str = "self") -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def descendants(pid: Optional[int] = None) -> int:
    """How many live processes have ``pid`` (default: this one) as an ancestor; one pass over ``/proc``."""
    root = os.getpid() if pid is None else pid
    parent: Dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:  # ended while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1].isdigit():
            parent[int(name)] = int(fields[1])
    n = 0
    for p in parent:
        seen = 0
        while p in parent and seen < 64:  # up the chain to the root or to init
            p = parent[p]
            seen += 1
            if p == root:
                n += 1
                break
    return n


def host_stats(worker_pids: Iterable[int] = ()) -> Dict[str, float]:
    """The metrics of the module docstring; empty where ``/proc`` is not there."""
    rss = rss_bytes()
    if rss is None:
        return {}
    out: Dict[str, float] = {"memory/host_rss_gib": rss / 2 ** 30}
    try:
        out["host/open_fds"] = float(len(os.listdir("/proc/self/fd")))
    except OSError:
        pass
    threads = _threads()
    if threads is not None:
        out["host/threads"] = float(threads)
    workers = [rss_bytes(p) for p in worker_pids]
    out["memory/reward_workers_rss_gib"] = sum(w for w in workers if w) / 2 ** 30
    out["host/descendants"] = float(descendants())
    return out
