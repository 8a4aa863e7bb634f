"""A pool of reward worker processes with per-sample time limits.

``RewardPool(cfg).submit(records, responses)`` returns at once with a :class:`RewardFuture`; a
dispatcher thread feeds the samples one at a time to ``cfg.num_workers`` worker processes, so
scoring overlaps with whatever the caller does next (generation of the next batch).
``.result()`` blocks until every sample is scored. ``.score()`` is submit + result.

Failure handling: a verifier exception is reward 0 with the message (inside ``score_one``); a
sample running past its time limit (``cfg.timeout_s``; code samples get at least
``code_timeout_s + 5`` s) gets its worker SIGKILLed and replaced, reward 0, error "timeout"; a
worker that dies (segfault, OOM kill, os._exit) gives reward 0, error "crash: ..." and is
replaced. Each is counted in ``.stats()`` and logged; none reaches the caller as an exception.

Start method: workers are started with the ``forkserver`` method by default. The trainer process
has torch loaded and threads running, where ``fork`` is unsafe; ``forkserver`` forks workers from
a small clean server process that has preloaded the reward modules, so a replaced worker starts in
milliseconds. Because workers do not inherit the caller's memory, verifiers are re-registered in
each worker by importing (a) the built-in verifier modules, (b) the modules that defined every
verifier registered in the caller when the pool was created (``fn.__module__``), (c)
``cfg.extra_verifier_modules`` and (d) a record's own ``"verifier_module"`` field. A verifier
defined in ``__main__`` is only available with ``mp_context="fork"``.
"""

from __future__ import annotations

import atexit
import collections
import importlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import weakref
from dataclasses import asdict
from multiprocessing.connection import wait as mp_wait
from typing import Any, Dict, List, Optional, Sequence

from .base import RewardConfig, RewardResult, score_one, verifier_modules

logger = logging.getLogger("megaprorl.rewards")

_BUILTIN_VERIFIERS = ["megaprorl.rewards.math", "megaprorl.rewards.code", "megaprorl.rewards.stem",
                      "megaprorl.rewards.logic", "megaprorl.rewards.ifeval"]
_MAX_LOGGED_ERRORS = 50


def _import_modules(mods: Sequence[str]) -> None:
    for m in mods:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001
            logger.warning("reward worker could not import verifier module %s: %s", m, e)


def _worker_main(conn, cfg_dict: Dict[str, Any], modules: List[str]) -> None:
    # the pool ends its workers (a message, or SIGKILL); signals meant for the trainer (Ctrl-C, SLURM's SIGTERM or
    # SIGUSR1 to the process group) must not kill them while the trainer checkpoints and closes the pool
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    cfg = RewardConfig(**cfg_dict)
    _import_modules(modules)
    conn.send("ready")  # imports done: time limits start counting from here
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        record, response = msg
        res = score_one(record, response, cfg)
        try:
            conn.send((res.reward, res.parts, res.error))
        except Exception as e:  # noqa: BLE001 - e.g. parts not picklable
            conn.send((res.reward, {}, res.error or f"result not sendable: {e}"))


class RewardFuture:
    """Result handle of :meth:`RewardPool.submit`."""

    def __init__(self, n: int):
        self._results: List[Optional[RewardResult]] = [None] * n
        self._left = n
        self._lock = threading.Lock()
        self._event = threading.Event()
        if n == 0:
            self._event.set()

    def _set(self, i: int, res: RewardResult) -> None:
        with self._lock:
            if self._results[i] is not None:
                return
            self._results[i] = res
            self._left -= 1
            if self._left == 0:
                self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: Optional[float] = None) -> List[RewardResult]:
        if not self._event.wait(timeout):
            raise TimeoutError(f"reward scoring not finished after {timeout} s")
        return list(self._results)  # type: ignore[arg-type]


class _Worker:
    __slots__ = ("proc", "conn", "task", "deadline", "started", "n_done", "ready", "stopped")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.task = None  # (future, index, record)
        self.deadline = 0.0
        self.started = 0.0
        self.n_done = 0
        self.ready = False
        self.stopped = False


def _close_at_exit(ref):
    def close() -> None:
        pool = ref()
        if pool is not None:
            pool.close()
    return close


class RewardPool:
    """Scores (record, response) pairs in worker processes; see the module docstring."""

    def __init__(self, cfg: Optional[RewardConfig] = None):
        self.cfg = cfg or RewardConfig()
        self._stats = collections.Counter(errors=0, timeouts=0, crashes=0, scored=0, restarts=0)
        self._stats_lock = threading.Lock()
        self._closed = False
        self._queue: collections.deque = collections.deque()
        self._qlock = threading.Lock()
        self._workers: List[_Worker] = []
        self._thread: Optional[threading.Thread] = None
        if self.cfg.num_workers <= 0:
            return
        self._modules = list(dict.fromkeys(_BUILTIN_VERIFIERS + verifier_modules() +
                                           list(self.cfg.extra_verifier_modules)))
        method = self.cfg.mp_context or "forkserver"
        if method not in mp.get_all_start_methods():
            raise ValueError(f"RewardConfig.mp_context {method!r} not available here "
                             f"(choose from {mp.get_all_start_methods()})")
        self._ctx = mp.get_context(method)
        if method == "forkserver":
            try:
                self._ctx.set_forkserver_preload(["megaprorl.rewards"] + self._modules)
            except Exception:  # noqa: BLE001
                pass
        self._cfg_dict = asdict(self.cfg)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        for _ in range(self.cfg.num_workers):
            self._workers.append(self._start_worker())
        self._thread = threading.Thread(target=self._loop, name="reward-pool", daemon=True)
        self._thread.start()
        # a pool left open (its owner failed before closing it) closes before multiprocessing's exit handler
        # terminates the workers; else the dispatcher would see them die and start new ones during the exit
        self._at_exit = _close_at_exit(weakref.ref(self))
        atexit.register(self._at_exit)

    # ------------------------------------------------------------------ public API
    def submit(self, records: Sequence[Dict[str, Any]], responses: Sequence[str]) -> RewardFuture:
        if len(records) != len(responses):
            raise ValueError(f"submit: {len(records)} records but {len(responses)} responses")
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        fut = RewardFuture(len(records))
        if self.cfg.num_workers <= 0:
            for i, (rec, resp) in enumerate(zip(records, responses)):
                self._deliver(fut, i, rec, score_one(rec, resp, self.cfg))
            return fut
        with self._qlock:
            for i, (rec, resp) in enumerate(zip(records, responses)):
                self._queue.append((fut, i, rec, resp))
        self._wake()
        return fut

    def score(self, records: Sequence[Dict[str, Any]], responses: Sequence[str]) -> List[RewardResult]:
        return self.submit(records, responses).result()

    def stats(self) -> Dict[str, int]:
        with self._stats_lock:
            return dict(self._stats)

    def worker_pids(self) -> List[int]:
        """The live worker processes' ids (for their memory in the run's metrics: megaprorl/host.py)."""
        return [w.proc.pid for w in list(self._workers) if w.proc is not None and w.proc.pid]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if getattr(self, "_at_exit", None) is not None:
            atexit.unregister(self._at_exit)
        if self._thread is not None:
            self._wake()
            self._thread.join(timeout=10)
        with self._qlock:
            pending = list(self._queue)
            self._queue.clear()
        for fut, i, rec, _ in pending:
            fut._set(i, RewardResult(0.0, {}, "pool closed"))
        for w in self._workers:
            if w.task is not None:
                fut, i, _ = w.task
                fut._set(i, RewardResult(0.0, {}, "pool closed"))
            self._stop_worker(w, graceful=True)
        self._workers = []
        if self.cfg.num_workers > 0:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------ internals
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        p = self._ctx.Process(target=_worker_main, args=(child, self._cfg_dict, self._modules),
                              name="reward-worker", daemon=True)
        p.start()
        child.close()
        return _Worker(p, parent)

    def _stop_worker(self, w: _Worker, graceful: bool = False) -> None:
        if w.stopped:  # once: its process object is closed after
            return
        w.stopped = True
        if graceful and w.proc.is_alive():
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
            w.proc.join(timeout=2)
        if w.proc.is_alive():
            try:
                os.kill(w.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
            w.proc.join(timeout=5)
        try:
            w.conn.close()
        except OSError:
            pass
        try:
            w.proc.close()
        except ValueError:
            pass

    def _replace(self, w: _Worker) -> None:
        """Stop ``w`` and start a worker in its place; when the start fails (e.g. the forkserver is gone), the
        slot stays empty and ``_top_up`` retries it."""
        self._stop_worker(w)
        self._workers.remove(w)
        self._top_up()

    def _top_up(self) -> None:
        """Start workers until there are ``num_workers`` (a failed start is logged and retried next round)."""
        while len(self._workers) < self.cfg.num_workers and not self._closed:
            try:
                self._workers.append(self._start_worker())
            except Exception:  # noqa: BLE001 - the dispatcher must not die; the next round retries
                logger.exception("cannot start a reward worker; retrying")
                return
            with self._stats_lock:
                self._stats["restarts"] += 1

    def _deliver(self, fut: RewardFuture, i: int, record: Any, res: RewardResult, kind: str = "") -> None:
        with self._stats_lock:
            self._stats["scored"] += 1
            if res.error is not None:
                self._stats["errors"] += 1
                if kind:
                    self._stats[kind] += 1
                n = self._stats["errors"]
        if res.error is not None:
            dom = record.get("domain") if isinstance(record, dict) else None
            rid = record.get("id") if isinstance(record, dict) else None
            if n <= _MAX_LOGGED_ERRORS:
                logger.warning("reward error #%d (domain=%s id=%s): %s%s", n, dom, rid, res.error,
                               " (further errors logged at debug level)" if n == _MAX_LOGGED_ERRORS else "")
            else:
                logger.debug("reward error #%d (domain=%s id=%s): %s", n, dom, rid, res.error)
        fut._set(i, res)

    def _limit_for(self, record: Any) -> float:
        t = float(self.cfg.timeout_s)
        if isinstance(record, dict) and record.get("domain") == "code":
            code_t = float(record.get("time_limit_s") or self.cfg.code_timeout_s)
            t = max(t, code_t + 5.0)
        return t

    def _assign(self) -> None:
        for w in list(self._workers):
            if w.task is not None or not w.ready:
                continue
            with self._qlock:
                if not self._queue:
                    return
                fut, i, rec, resp = self._queue.popleft()
            try:
                w.conn.send((rec, resp))
            except Exception as e:  # noqa: BLE001 - unpicklable record, broken pipe
                if isinstance(e, (OSError, EOFError)):
                    with self._qlock:
                        self._queue.appendleft((fut, i, rec, resp))
                    self._replace(w)
                    with self._stats_lock:
                        self._stats["crashes"] += 1
                    continue
                self._deliver(fut, i, rec, RewardResult(0.0, {}, f"cannot send sample to worker: {e}"))
                continue
            now = time.monotonic()
            w.task = (fut, i, rec)
            w.started = now
            w.deadline = now + self._limit_for(rec)

    def _loop(self) -> None:
        while not self._closed:
            try:
                self._top_up()
                self._assign()
                busy = [w for w in self._workers if w.task is not None]
                now = time.monotonic()
                timeout = min([w.deadline - now for w in busy], default=1.0)
                objs = ([self._wake_r] + [w.conn for w in self._workers if w.task is not None or not w.ready]
                        + [w.proc.sentinel for w in self._workers])
                ready = mp_wait(objs, timeout=max(0.0, min(timeout, 1.0)))
                if self._wake_r in ready:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                for w in list(self._workers):
                    if not w.ready and w.conn in ready:
                        try:
                            w.ready = w.conn.recv() == "ready"
                        except (EOFError, OSError):
                            pass  # handled as a dead worker below
                        continue
                    if w.task is not None and w.conn in ready:
                        fut, i, rec = w.task
                        try:
                            reward, parts, err = w.conn.recv()
                        except (EOFError, OSError):
                            continue  # handled as a dead worker below
                        w.task = None
                        w.n_done += 1
                        self._deliver(fut, i, rec, RewardResult(float(reward), parts, err))
                        if self.cfg.max_tasks_per_worker and w.n_done >= self.cfg.max_tasks_per_worker:
                            self._replace(w)
                now = time.monotonic()
                for w in list(self._workers):
                    if not w.proc.is_alive():
                        code = w.proc.exitcode
                        if w.task is not None:
                            fut, i, rec = w.task
                            w.task = None
                            self._deliver(fut, i, rec, RewardResult(
                                0.0, {}, f"crash: reward worker died (exit code {code})"), kind="crashes")
                        else:
                            with self._stats_lock:
                                self._stats["crashes"] += 1
                            logger.warning("idle reward worker died (exit code %s); replacing it", code)
                        self._replace(w)
                    elif w.task is not None and now > w.deadline:
                        fut, i, rec = w.task
                        w.task = None
                        limit = w.deadline - w.started
                        self._replace(w)
                        self._deliver(fut, i, rec, RewardResult(
                            0.0, {}, f"timeout: scoring took longer than {limit:.1f} s"), kind="timeouts")
            except Exception:  # noqa: BLE001 - the dispatcher must not die
                if self._closed:  # close() is stopping the workers under it
                    return
                logger.exception("reward pool dispatcher error")
                time.sleep(0.1)
