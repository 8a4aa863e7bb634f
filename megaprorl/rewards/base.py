"""Reward configuration, result type, verifier registry and `score_one`.

A verifier is a plain function ``fn(record, response) -> float | (float, dict)``; it may take a
third argument ``cfg`` (a :class:`RewardConfig`) when it needs settings (the code sandbox, the
IFEval mode).  It is looked up by ``record["domain"]``.  ``score_one`` never raises: any
exception becomes reward 0 with the message in ``RewardResult.error``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

logger = logging.getLogger("megaprorl.rewards")

VerifierOutput = Union[float, int, bool, Tuple[float, Dict[str, Any]]]
Verifier = Callable[..., VerifierOutput]


@dataclass
class RewardConfig:
    """Settings of the reward pool, the verifiers and the code sandbox (plain types only)."""

    num_workers: int = 2
    """Worker processes scoring in parallel; 0 scores inline in the calling process (no timeouts)."""
    timeout_s: float = 10.0
    """Wall-clock limit for one sample in a worker; past it the worker is killed and replaced."""
    code_timeout_s: float = 5.0
    """Total wall-clock budget for running all tests of one code response."""
    code_memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) of the sandboxed program."""
    sandbox: str = "auto"
    """'auto' | 'unshare' | 'bwrap' | 'none'. 'auto' picks the first isolation that works."""
    allow_unsandboxed: bool = False
    """Run model-written code without isolation when none is available (rlimits only). Unsafe."""
    ifeval_mode: str = "strict"
    """'strict' | 'loose' IFEval scoring (a record may override with its own 'ifeval_mode')."""
    extra_verifier_modules: List[str] = field(default_factory=list)
    """Modules imported in every worker at start (they call register_verifier at import time)."""
    mp_context: str = "forkserver"
    """multiprocessing start method of the workers: 'forkserver' (default), 'spawn' or 'fork'."""
    max_tasks_per_worker: int = 0
    """Recycle a worker after this many samples (0 = never)."""
    code_max_procs: int = 32
    """RLIMIT_NPROC of the sandboxed program (its uid is private to the run)."""
    code_max_output_kb: int = 4096
    """Largest stdout (and any file) the program may write (RLIMIT_FSIZE)."""
    code_tmp_mb: int = 64
    """Size of the private writable tmpfs mounted at /tmp in the sandbox."""
    code_python: str = ""
    """Interpreter for model code ('' = the base interpreter of this Python)."""
    code_python_site: bool = False
    """Give model code the interpreter's site-packages (numpy, ...); off = '-I -S' (fast start)."""
    sandbox_hide_paths: List[str] = field(default_factory=list)
    """Extra directories/files to hide in the sandbox (beyond /root, /home, the project, ...)."""
    sandbox_seccomp: str = "auto"
    """Seccomp filter of sandboxed code: 'auto' (when libseccomp + pyseccomp/python3-seccomp are
    installed, else a warning), 'require' (no filter = refuse to run code), 'off'."""
    math_timeout_s: float = 5.0
    """Limit inside math-verify parsing/verification (signal based; main thread only)."""
    max_response_chars: int = 200_000
    """Responses longer than this are cut (from the front: the answer is usually at the end)."""
    think_mode: str = "auto"
    """Reasoning models (R1-Distill, Qwen3) think before they answer: 'auto' scores the text after the last
    ``think_end`` when the response has one, else all of it; 'require' scores a response without it 0 (an
    unfinished thought earns nothing); 'off' scores the whole response.  IFEval's constraints, a stray
    \\boxed{} or code block in the thought, would otherwise be judged on the thinking."""
    think_end: str = "</think>"
    """The marker that ends the thought."""


@dataclass
class RewardResult:
    reward: float
    parts: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"reward": self.reward, "parts": self.parts, "error": self.error}


_REGISTRY: Dict[str, Tuple[Verifier, bool]] = {}
_LOCK = threading.Lock()
_BUILTINS_LOADED = False

# domain -> module that registers it (imported lazily, also in workers)
_BUILTIN_MODULES = {
    "math": "megaprorl.rewards.math",
    "code": "megaprorl.rewards.code",
    "stem": "megaprorl.rewards.stem",
    "logic": "megaprorl.rewards.logic",
    "ifeval": "megaprorl.rewards.ifeval",
}


def _wants_cfg(fn: Verifier) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.name == "cfg" for p in params)


def register_verifier(domain: str, fn: Verifier) -> Verifier:
    """Register ``fn(record, response[, cfg])`` for ``record["domain"] == domain`` (replaces)."""
    if not isinstance(domain, str) or not domain:
        raise ValueError("register_verifier: domain must be a non-empty string")
    if not callable(fn):
        raise TypeError(f"register_verifier({domain!r}): verifier is not callable")
    with _LOCK:
        _REGISTRY[domain] = (fn, _wants_cfg(fn))
    return fn


def get_verifier(domain: str) -> Verifier:
    """The verifier of a domain; built-in domains are imported on first use."""
    entry = _REGISTRY.get(domain)
    if entry is None and domain in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[domain])
        entry = _REGISTRY.get(domain)
    if entry is None:
        known = sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))
        raise KeyError(f"no verifier registered for domain {domain!r} (known: {', '.join(known)})")
    return entry[0]


def registered_domains() -> List[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def verifier_modules() -> List[str]:
    """Importable modules that define the currently registered verifiers (for worker start-up)."""
    mods = []
    for fn, _ in list(_REGISTRY.values()):
        m = getattr(fn, "__module__", None)
        if m and m != "__main__" and m not in mods:
            mods.append(m)
    return mods


def _normalise(out: VerifierOutput) -> RewardResult:
    parts: Dict[str, Any] = {}
    if isinstance(out, RewardResult):
        return out
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], dict):
            raise TypeError("verifier returned a tuple that is not (reward, parts_dict)")
        out, parts = out
    r = float(out)
    if not math.isfinite(r):
        raise ValueError(f"verifier returned a non-finite reward {r}")
    return RewardResult(reward=r, parts=dict(parts), error=None)


THINK_MODES = ("auto", "require", "off")


def split_thinking(response: str, cfg: RewardConfig) -> Tuple[str, Optional[int]]:
    """(the text to score, the length of the thought before it or None when there is no ``think_end``)."""
    if cfg.think_mode not in THINK_MODES:
        raise ValueError(f"rewards.think_mode must be one of {list(THINK_MODES)}, got {cfg.think_mode!r}")
    if cfg.think_mode == "off" or not cfg.think_end:
        return response, None
    cut = response.rfind(cfg.think_end)
    if cut < 0:
        return response, None
    return response[cut + len(cfg.think_end):], cut


def score_one(record: Dict[str, Any], response: str, cfg: Optional[RewardConfig] = None) -> RewardResult:
    """Score one response with the verifier of ``record["domain"]``. Never raises."""
    cfg = cfg or RewardConfig()
    try:
        if not isinstance(record, dict):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        domain = record.get("domain")
        if not domain:
            raise KeyError("record has no 'domain'")
        mod = record.get("verifier_module")
        if mod and domain not in _REGISTRY:
            importlib.import_module(mod)
        fn = get_verifier(domain)
        wants_cfg = _REGISTRY[domain][1]
        if response is None:
            response = ""
        if not isinstance(response, str):
            raise TypeError(f"response must be a string, got {type(response).__name__}")
        response, thought_chars = split_thinking(response, cfg)
        if thought_chars is None and cfg.think_mode == "require":
            return RewardResult(reward=0.0, parts={"think_end_missing": True}, error=None)
        if cfg.max_response_chars and len(response) > cfg.max_response_chars:
            response = response[-cfg.max_response_chars :]
        res = _normalise(fn(record, response, cfg) if wants_cfg else fn(record, response))
        if thought_chars is not None:
            res.parts.setdefault("thought_chars", thought_chars)
        return res
    except Exception as e:  # noqa: BLE001 - a verifier never raises into the trainer
        msg = f"{type(e).__name__}: {e}"
        if len(msg) > 500:
            msg = msg[:500] + "..."
        return RewardResult(reward=0.0, parts={}, error=msg)
