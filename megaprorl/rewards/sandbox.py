"""Run model-written Python against tests in an isolated sandbox.

Isolation (backend "unshare", util-linux, needs root or unprivileged user namespaces):
- new mount, PID, network, IPC and UTS namespaces (`unshare --mount --pid --net --ipc --uts
  --fork --kill-child --mount-proc`): no network (only a down loopback), no view of host
  processes, and when the harness (PID 1) exits, the kernel kills everything left in the sandbox;
- the host filesystem read-only; /root, /home, /work, /run, /var/tmp, /mnt, /srv, /opt/…, the
  project directory, the current directory and $HOME hidden under empty tmpfs (the interpreter's
  prefix bound back read-only), /etc/shadow-like secrets replaced by /dev/null, a minimal /dev;
- a fresh size-limited tmpfs at /tmp, owned by a private, random uid: the only writable place;
- the program runs as that uid with no capabilities (bounding set empty) and no_new_privs, under
  rlimits on address space, CPU seconds, processes, file size (= output size) and open files, and
  a seccomp filter (:func:`seccomp_bpf`); it never sees the expected outputs (the harness
  compares them);
- a wall-clock limit per response (all its tests together); on expiry the whole process group is
  SIGKILLed, and the namespace dies with it (`--kill-child`, parent-death signal).

Backend "bwrap" (bubblewrap, `apt-get install -y bubblewrap`) provides the namespaces instead of
unshare; the same harness runs inside and does the same mounts. Without root both backends use an
unprivileged user namespace; the program then keeps the caller's uid (the only one mapped) but
has no capability at all. Backend "none" runs the harness without isolation (rlimits, a process
group and the seccomp filter only) and is used only when ``RewardConfig.allow_unsandboxed`` is
set; otherwise an unavailable sandbox makes the code reward refuse to run anything, with the
reason in the error.
"""

from __future__ import annotations

import base64
import errno
import functools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

logger = logging.getLogger("megaprorl.rewards.sandbox")

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_harness.py")
_PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_HIDE_DIRS = [
    "/root", "/home", "/work", "/run", "/var/tmp", "/var/log", "/var/mail", "/var/spool",
    "/var/backups", "/var/lib/slurm", "/var/lib/munge", "/mnt", "/media", "/srv", "/boot",
    "/lost+found", "/etc/ssh", "/etc/ssl/private", "/etc/munge", "/etc/slurm",
]
DEFAULT_HIDE_FILES = ["/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-",
                      "/etc/sudoers", "/etc/machine-id"]


class SandboxUnavailable(RuntimeError):
    """No isolation is available and unsandboxed execution was not allowed."""


def base_python(cfg_python: str = "") -> str:
    if cfg_python:
        return cfg_python
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _hide_dirs(extra: List[str]) -> List[str]:
    dirs = list(DEFAULT_HIDE_DIRS)
    for p in [_PROJECT_DIR, os.getcwd(), os.path.expanduser("~"), tempfile.gettempdir()] + list(extra):
        try:
            p = os.path.realpath(p)
        except OSError:
            continue
        if p not in ("/", "/tmp", "/usr", "/etc", "/proc", "/dev", "/bin", "/lib", "/lib64", "/sbin"):
            dirs.append(p)
    return dirs


def _expose(python: str) -> List[str]:
    real = os.path.realpath(python)
    out = [os.path.dirname(os.path.dirname(real))]  # <prefix>/bin/python -> <prefix>
    try:
        out.append(os.path.realpath(sys.base_prefix))
    except Exception:  # noqa: BLE001
        pass
    return list(dict.fromkeys(out))


# Denied to the program (EPERM) besides sockets other than AF_UNIX and clone() with a CLONE_NEW*
# flag; clone3 gets ENOSYS (its flags sit behind a pointer a filter cannot read), so libc falls
# back to clone(). Syscalls of another ABI (i386 int 0x80, x32) kill the process (libseccomp's
# bad-arch action).
SECCOMP_DENY = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "unshare", "setns", "kexec_load", "kexec_file_load", "bpf", "perf_event_open", "keyctl",
    "add_key", "request_key", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "syslog", "quotactl", "open_by_handle_at", "name_to_handle_at",
)
CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
AF_UNIX = 1


def _seccomp_module():
    """libseccomp's own Python binding ``seccomp`` (Debian/Ubuntu python3-seccomp) or the
    API-compatible ctypes one ``pyseccomp`` (PyPI, in the ``rewards`` extra)."""
    errors = []
    for name in ("seccomp", "pyseccomp"):
        try:
            mod = __import__(name)
        except Exception as e:  # noqa: BLE001  (ImportError, or RuntimeError: libseccomp.so missing)
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if hasattr(mod, "SyscallFilter") and hasattr(mod, "ERRNO"):
            return mod
        errors.append(f"{name}: not a libseccomp binding")
    raise ImportError("no libseccomp binding (pip install pyseccomp, or apt-get install python3-seccomp): "
                      + "; ".join(errors))


@functools.lru_cache(maxsize=1)
def seccomp_bpf() -> Tuple[bytes, str]:
    """The sandbox's seccomp filter compiled by libseccomp for this machine: (BPF program, "") or
    (b"", reason). Compiled once per process; the harness only loads it (prctl), so model code
    pays no import."""
    try:
        sc = _seccomp_module()
        f = sc.SyscallFilter(sc.ALLOW)
        deny = sc.ERRNO(errno.EPERM)
        f.add_rule(deny, "socket", sc.Arg(0, sc.NE, AF_UNIX))
        for flag in CLONE_NEW_FLAGS:
            f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        skipped = []
        for name in SECCOMP_DENY:
            try:
                f.add_rule(deny, name)
            except Exception:  # noqa: BLE001  (a syscall this libseccomp or arch does not know)
                skipped.append(name)
        if skipped:
            logger.info("seccomp: libseccomp does not know %s; not filtered", skipped)
        with tempfile.TemporaryFile() as tf:
            f.export_bpf(tf)
            tf.seek(0)
            bpf = tf.read()
        if not bpf or len(bpf) % 8:
            return b"", f"libseccomp exported a malformed program ({len(bpf)} bytes)"
        return bpf, ""
    except Exception as e:  # noqa: BLE001
        return b"", f"{type(e).__name__}: {e}"


def _backend_cmd(backend: str, python: str) -> List[str]:
    harness = [python, "-I", "-S", HARNESS]
    pdeath = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
    if backend == "unshare":
        cmd = ["unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child",
               "--mount-proc"]
        if os.geteuid() != 0:
            cmd.insert(1, "--map-root-user")
            cmd.insert(1, "--user")
        return pdeath + cmd + harness
    if backend == "bwrap":
        # bubblewrap sets up the namespaces; the harness still does the mounts (it keeps the
        # capabilities it needs inside, then drops everything for the program).
        cmd = ["bwrap", "--dev-bind", "/", "/", "--unshare-net", "--unshare-pid", "--unshare-ipc",
               "--unshare-uts", "--die-with-parent", "--as-pid-1", "--proc", "/proc", "--cap-add", "ALL"]
        if os.geteuid() != 0:
            # unprivileged: a user namespace where we are root (mapped back to us), as unshare does
            cmd += ["--unshare-user", "--uid", "0", "--gid", "0"]
        return pdeath + cmd + harness
    return pdeath + harness


def _run_spec(backend: str, spec: Dict[str, Any], python: str, wall_s: float) -> Dict[str, Any]:
    cmd = _backend_cmd(backend, python)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    workdir = None
    if backend == "none":
        workdir = tempfile.mkdtemp(prefix="megaprorl-unsandboxed-")
        spec = dict(spec, workdir=workdir)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True, env=env, cwd="/")
        try:
            out, err = proc.communicate(json.dumps(spec).encode(), timeout=wall_s)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            proc.communicate()
            return {"ok": False, "error": "sandbox wall-clock limit exceeded", "wall_timeout": True}
        finally:
            _killpg(proc)
        if proc.returncode != 0 or not out:
            return {"ok": False, "error": f"sandbox exited with {proc.returncode}: "
                    f"{err.decode('utf-8', 'replace')[-500:].strip()}"}
        try:
            return json.loads(out)
        except ValueError:
            return {"ok": False, "error": f"sandbox returned malformed output: {out[:200]!r}"}
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _spec(program: str, tests: List[Dict[str, Any]], *, timeout_s: float, memory_mb: int, max_procs: int,
          max_output_kb: int, tmp_mb: int, python: str, site: bool, mode: str,
          hide_paths: List[str], seccomp: str = "auto") -> Dict[str, Any]:
    if seccomp not in ("auto", "require", "off"):
        raise ValueError(f"seccomp must be auto|require|off, got {seccomp!r}")
    hide = _hide_dirs(hide_paths)
    bpf, why = seccomp_bpf() if seccomp != "off" else (b"", "")
    if seccomp == "require" and not bpf:
        raise SandboxUnavailable(f"seccomp='require' but the seccomp filter is unavailable: {why}")
    if seccomp == "auto" and not bpf:
        _warn_once(f"code sandbox runs without its seccomp filter: {why}")
    return {
        "mode": mode,
        "program": program,
        "tests": tests,
        "timeout_s": float(timeout_s),
        "memory_mb": int(memory_mb),
        "max_procs": int(max_procs),
        "max_output_kb": int(max_output_kb),
        "tmp_mb": int(tmp_mb),
        "python": python,
        "site": bool(site),
        "uid": random.SystemRandom().randint(200_000, 1_000_000),
        "hide_dirs": [h for h in hide if not os.path.isfile(h)],
        "hide_files": DEFAULT_HIDE_FILES + [h for h in hide_paths if os.path.isfile(h)],
        "expose": _expose(python),
        "seccomp": {"bpf": base64.b64encode(bpf).decode()},
    }


_probe_lock = threading.Lock()
_warned = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def _ns_cmd(backend: str) -> List[str]:
    """The backend's namespaces around `true`: does the kernel let this user create them?"""
    if backend == "unshare":
        cmd = ["unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--fork"]
        if os.geteuid() != 0:
            cmd += ["--user", "--map-root-user"]
    else:
        cmd = ["bwrap", "--dev-bind", "/", "/", "--unshare-net", "--unshare-pid", "--unshare-ipc",
               "--unshare-uts"]
        if os.geteuid() != 0:
            cmd += ["--unshare-user", "--uid", "0", "--gid", "0"]
    return cmd + ["true"]


@functools.lru_cache(maxsize=4)
def backend_support(backend: str) -> Tuple[bool, str]:
    """Whether the backend's binary exists and the kernel grants its namespaces to this user.

    This says nothing about the sandbox itself working (that is :func:`_probe`); it separates
    "cannot be used here" from "broken".
    """
    if backend not in ("unshare", "bwrap"):
        raise ValueError(f"not an isolation backend: {backend!r}")
    exe = "unshare" if backend == "unshare" else "bwrap"
    if not shutil.which(exe):
        return False, ("`unshare` (util-linux) not found" if backend == "unshare"
                       else "`bwrap` not found (apt-get install -y bubblewrap)")
    try:
        p = subprocess.run(_ns_cmd(backend), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=20, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{exe} could not run: {e}"
    if p.returncode != 0:
        why = p.stderr.decode("utf-8", "replace").strip()[-300:]
        return False, (f"the kernel refused {exe}'s namespaces (needs root or unprivileged user "
                       f"namespaces): {why or 'exit %d' % p.returncode}")
    return True, "ok"


@functools.lru_cache(maxsize=16)
def _probe(backend: str, python: str) -> Tuple[bool, str]:
    ok, why = backend_support(backend)
    if not ok:
        return False, why
    spec = _spec("import sys; print(int(sys.stdin.read()) + 1)", [{"kind": "stdio", "input": "41", "output": "42"}],
                 timeout_s=5, memory_mb=512, max_procs=8, max_output_kb=64, tmp_mb=4, python=python,
                 site=False, mode="isolated", hide_paths=[])
    res = _run_spec(backend, spec, python, wall_s=20)
    if not res.get("ok"):
        return False, f"{backend} sandbox failed to start: {res.get('error')}"
    r = res["results"][0]
    if not r.get("passed"):
        return False, f"{backend} sandbox probe program failed: {r}"
    if res.get("warnings"):
        logger.warning("sandbox (%s) set up with warnings: %s", backend, res["warnings"])
    return True, "ok"


def resolve_backend(sandbox: str = "auto", allow_unsandboxed: bool = False, python: str = "") -> Tuple[str, str]:
    """Returns (backend, note). Raises SandboxUnavailable with the reasons when nothing is usable."""
    python = base_python(python)
    if sandbox not in ("auto", "unshare", "bwrap", "none"):
        raise ValueError(f"RewardConfig.sandbox must be auto|unshare|bwrap|none, got {sandbox!r}")
    if sandbox == "none":
        if not allow_unsandboxed:
            raise SandboxUnavailable("sandbox='none' needs allow_unsandboxed=True: refusing to run model code "
                                     "without isolation")
        return "none", "unsandboxed (explicitly allowed)"
    candidates = ["unshare", "bwrap"] if sandbox == "auto" else [sandbox]
    reasons = []
    with _probe_lock:
        for b in candidates:
            ok, why = _probe(b, python)
            if ok:
                return b, "ok"
            reasons.append(why)
    if allow_unsandboxed:
        logger.warning("no code sandbox available (%s); running model code UNSANDBOXED as allowed by config",
                       "; ".join(reasons))
        return "none", "unsandboxed: " + "; ".join(reasons)
    raise SandboxUnavailable("no code sandbox available: " + "; ".join(reasons) +
                             ". Run as root or enable user namespaces, install bubblewrap, or set "
                             "rewards.allow_unsandboxed=true to run model code without isolation (unsafe).")


def run_tests(program: str, tests: List[Dict[str, Any]], *, timeout_s: float = 5.0, memory_mb: int = 1024,
              max_procs: int = 32, max_output_kb: int = 4096, tmp_mb: int = 64, python: str = "",
              site: bool = False, sandbox: str = "auto", allow_unsandboxed: bool = False,
              hide_paths: Optional[List[str]] = None, return_output: bool = False,
              seccomp: str = "auto") -> Dict[str, Any]:
    """Run ``program`` against ``tests`` (harness test dicts) in the sandbox.

    Test dicts: ``{"kind": "stdio", "input": str, "output": str}``,
    ``{"kind": "call", "fn_name": str, "args": list, "expected": any}`` or
    ``{"kind": "assert", "code": "assert f(1) == 2"}``.
    ``seccomp``: "auto" (load the filter when libseccomp and a binding are there, else warn once),
    "require" (refuse without it: raises :class:`SandboxUnavailable`) or "off".
    Returns ``{"results": [per-test dict with passed/status/time], "backend": str, "error": str|None,
    "seccomp": bool, "userns": bool}``.
    """
    python = base_python(python)
    backend, _ = resolve_backend(sandbox, allow_unsandboxed, python)
    spec = _spec(program, tests, timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs,
                 max_output_kb=max_output_kb, tmp_mb=tmp_mb, python=python, site=site,
                 mode="none" if backend == "none" else "isolated", hide_paths=list(hide_paths or []),
                 seccomp=seccomp)
    spec["return_output"] = bool(return_output)
    t0 = time.monotonic()
    res = _run_spec(backend, spec, python, wall_s=timeout_s + 3.0 + 0.05 * len(tests))
    out: Dict[str, Any] = {"backend": backend, "wall_s": round(time.monotonic() - t0, 4), "error": None,
                           "seccomp": bool(res.get("seccomp")), "userns": bool(res.get("userns"))}
    if res.get("ok"):
        out["results"] = res["results"]
    else:
        out["error"] = res.get("error", "unknown sandbox failure")
        status = "timeout" if res.get("wall_timeout") else "sandbox_error"
        out["results"] = [{"passed": False, "status": status} for _ in tests]
    return out
