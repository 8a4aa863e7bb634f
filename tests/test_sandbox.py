"""Adversarial sandbox suite: every attack is contained (reward 0) and the caller is unharmed.

Every test runs under each isolation backend ("unshare": util-linux; "bwrap": bubblewrap,
`apt-get install -y bubblewrap`, which the tests run themselves as root: tests/apt_install.py). A backend
is skipped, with the reason, only when its binary is missing and cannot be installed, or the kernel refuses
its namespaces (no root and no unprivileged user namespaces); when
the namespaces work but the sandbox does not, the tests fail.
"""

import os
import shutil
import signal
import socket
import threading
import time

import pytest

from apt_install import InstallFailed, NotInstallable, apt_install
from megaprorl.rewards import RewardConfig, RewardPool, score_one
from megaprorl.rewards import sandbox as sb

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_SUPPORT = {}


def _support(backend):
    """Whether a backend can be used here; bubblewrap is installed first when it is missing and apt-get can
    (tests/apt_install.py), so CI runs the suite under both backends."""
    if backend not in _SUPPORT:
        why_not = ""
        if backend == "bwrap" and shutil.which("bwrap") is None:
            try:
                apt_install(["bubblewrap"], "`bwrap` not found", timeout=300)
                sb.backend_support.cache_clear()
            except (NotInstallable, InstallFailed) as e:
                why_not = str(e)
        _SUPPORT[backend] = (False, why_not) if why_not else sb.backend_support(backend)
    return _SUPPORT[backend]


@pytest.fixture(params=["unshare", "bwrap"])
def backend(request):
    ok, why = _support(request.param)
    if not ok:
        pytest.skip(f"{request.param} backend: {why}")
    return request.param


def run(backend, program, tests, **kw):
    return sb.run_tests(program, tests, sandbox=backend, **kw)


def attack(backend, program, expected="LEAKED", timeout=2.0, stdin=""):
    """Run `program`; it prints `expected` only if the attack worked (so passing == escaping)."""
    t0 = time.monotonic()
    res = run(backend, program, [{"kind": "stdio", "input": stdin, "output": expected}], timeout_s=timeout,
              memory_mb=512, max_procs=32, max_output_kb=1024, return_output=True)
    assert res["backend"] == backend
    res["elapsed"] = time.monotonic() - t0
    return res


def contained(res):
    assert res["error"] is None or "limit" in res["error"], res
    r = res["results"][0]
    assert not r["passed"], r
    return r


def _sandbox_uid_procs():
    """Processes still running as a sandbox uid (200000..1000000) on the host (as root the
    program gets such a private uid; without root it keeps ours and only markers find it)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uid = int(line.split()[1])
                        if 200_000 <= uid <= 1_000_000:
                            out.append(pid)
        except OSError:
            pass
    return out


def _procs_with(marker):
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(pid)
            except OSError:
                pass
    return out


def test_backend_is_isolating(backend):
    # the binary and the namespaces work here (else skipped), so the sandbox must start
    ok, why = sb._probe(backend, sb.base_python())
    assert ok, why
    assert sb.resolve_backend(backend)[0] == backend
    # PID namespace: the parent is PID 1 (the harness) and no host process is visible
    prog = ("import os\n"
            "print(os.getppid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [1, os.getpid()])")
    res = run(backend, prog, [{"kind": "stdio", "input": "", "output": "1 True"}], timeout_s=2, return_output=True)
    assert res["results"][0]["passed"], res
    assert res["userns"] == (os.geteuid() != 0)


def test_infinite_loop_is_killed_in_time(backend):
    res = attack(backend, "while True:\n    pass", timeout=1.5)
    r = contained(res)
    assert r["status"] == "timeout"
    assert res["elapsed"] < 1.5 + 2.5


def test_fork_bomb(backend):
    marker = f"megaprorl-forkbomb-{os.getpid()}-{time.time_ns()}"
    prog = ("import os, sys\n"
            f"if {marker!r} not in sys.argv:\n"  # re-exec with a marker the host can look for
            f"    os.execv(sys.executable, [sys.executable, '-I', '-S', __file__, {marker!r}])\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    res = attack(backend, prog, timeout=2.0)
    contained(res)
    assert res["elapsed"] < 6
    time.sleep(0.2)
    assert _procs_with(marker) == []
    assert _sandbox_uid_procs() == []


def test_memory_bomb(backend):
    res = attack(backend, "x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))\n", timeout=3.0)
    r = contained(res)
    assert r["status"] in ("error", "killed", "signal")
    res = attack(backend, "x = ' ' * (10 ** 11)\nprint('LEAKED')")
    contained(res)


def test_huge_output(backend):
    res = attack(backend, "import sys\nwhile True:\n    sys.stdout.write('A' * 65536)\n", timeout=3.0)
    r = contained(res)
    assert r["status"] in ("output_limit", "error", "timeout")
    assert len(r.get("stdout", "")) <= 5000  # only a tail comes back


def test_disk_fill_in_tmp_is_bounded(backend):
    prog = ("import os\nn = 0\ntry:\n    while True:\n        open(f'/tmp/f{n}', 'wb').write(b'x' * 1000000)\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e)\n")
    res = attack(backend, prog, timeout=3.0)
    r = contained(res)
    assert "No space left" in r.get("stdout", "") or r["status"] != "passed"


@pytest.mark.parametrize("path", ["/etc/megaprorl_pwned", "/root/megaprorl_pwned", "/var/tmp/megaprorl_pwned",
                                  "/dev/shm/megaprorl_pwned", os.path.join(PROJECT, "megaprorl_pwned"),
                                  "/usr/megaprorl_pwned"])
def test_write_outside_tmp(backend, path):
    prog = (f"try:\n    open({path!r}, 'w').write('x')\n    print('LEAKED')\nexcept Exception as e:\n"
            f"    print('denied', e)\n")
    contained(attack(backend, prog))
    assert not os.path.exists(path)


def test_tmp_is_writable_and_private(backend):
    res = run(backend, "open('/tmp/x', 'w').write('ok')\nprint(open('/tmp/x').read())",
                       [{"kind": "stdio", "input": "", "output": "ok"}], timeout_s=2)
    assert res["results"][0]["passed"]


@pytest.mark.parametrize("target", ["/etc/shadow", "/root", os.path.abspath(__file__), PROJECT,
                                    os.path.expanduser("~")])
def test_reading_hidden_files(backend, target):
    try:
        if os.path.isdir(target):
            secret = "\n".join(sorted(os.listdir(target)))
            prog = f"import os\nprint(chr(10).join(sorted(os.listdir({target!r}))))"
        else:
            secret = open(target).read()[:2000]
            prog = f"print(open({target!r}).read()[:2000], end='')"
    except OSError:
        pytest.skip(f"{target} not readable on the host (so not by the sandbox either)")
    if not secret.strip():
        pytest.skip(f"{target} is empty on the host")
    contained(attack(backend, prog, expected=secret))


def test_network_socket(backend):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.1)
    port = srv.getsockname()[1]
    accepted = []

    def accept():
        end = time.time() + 4
        while time.time() < end:
            try:
                accepted.append(srv.accept())
            except socket.timeout:
                pass

    th = threading.Thread(target=accept)
    th.start()
    prog = ("import socket\nok = False\n"
            f"for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
            "    try:\n        socket.create_connection(addr, timeout=0.5)\n        ok = True\n"
            "    except OSError as e:\n        print(addr, e)\n"
            "try:\n    socket.getaddrinfo('pypi.org', 443)\n    ok = True\nexcept OSError as e:\n    print(e)\n"
            "print('LEAKED' if ok else 'no network')")
    r = contained(attack(backend, prog, timeout=4))
    th.join()
    srv.close()
    assert accepted == []
    assert "no network" in r.get("stdout", "")


def test_signalling_or_killing_the_parent(backend):
    me = os.getpid()
    prog = ("import os, signal\n"
            "for pid in (os.getppid(), 1, %d):\n"
            "    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):\n"
            "        try:\n            os.kill(pid, sig)\n        except OSError:\n            pass\n"
            "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n" % me)
    contained(attack(backend, prog))
    contained(attack(backend, "import os\nos.system('kill -9 -1; kill -9 0')\nprint('x')"))
    # the caller is alive and the sandbox still works afterwards
    assert os.getpid() == me
    res = run(backend, "print(1)", [{"kind": "stdio", "input": "", "output": "1"}], timeout_s=2)
    assert res["results"][0]["passed"]


def test_no_background_processes_left(backend):
    marker = f"megaprorl-bg-{os.getpid()}-{time.time_ns()}"
    prog = ("import os, subprocess, sys\n"
            f"cmd = [sys.executable, '-c', 'import time; time.sleep(300)', {marker!r}]\n"
            "subprocess.Popen(cmd, start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        os.execv(sys.executable, cmd)\n    os._exit(0)\n"
            "print('spawned')\n")
    r = contained(attack(backend, prog))
    assert "spawned" in r.get("stdout", "")
    time.sleep(0.3)
    assert _procs_with(marker) == []
    assert _sandbox_uid_procs() == []


def test_attacks_through_the_pool_leave_the_pool_working(backend):
    progs = ["while True:\n    pass", "import os\nwhile True:\n    os.fork()",
             "import os\nos.kill(os.getppid(), 9)", "import os\nos.system('kill -9 -1')",
             "x = bytearray(10 ** 10)", "print('A' * 10 ** 8)"]
    rec = {"domain": "code", "tests": [{"input": "", "output": "ok"}]}
    with RewardPool(RewardConfig(num_workers=2, code_timeout_s=1.5, timeout_s=20, sandbox=backend)) as pool:
        res = pool.score([rec] * len(progs), [f"```python\n{p}\n```" for p in progs])
        assert all(r.reward == 0.0 for r in res), res
        good = pool.score([rec], ["```python\nprint('ok')\n```"])
        assert good[0].reward == 1.0, good
        assert good[0].parts["backend"] == backend
        assert pool.stats()["crashes"] == 0


def test_code_reward_zero_for_escape_attempt_via_score_one(backend):
    res = score_one({"domain": "code", "tests": [{"input": "", "output": "x"}]},
                    "```python\nimport shutil\nshutil.rmtree('/usr', ignore_errors=True)\nprint('y')\n```",
                    RewardConfig(code_timeout_s=2.0, code_memory_mb=512, sandbox=backend))
    assert res.reward == 0.0
    assert os.path.isdir("/usr/bin")


def test_only_harmless_devices(backend):
    # a minimal /dev: no GPUs (/dev/nvidia*, /dev/dri), disks, kvm, fuse, kmsg, mem, ...
    prog = ("import os\nprint(' '.join(sorted(os.listdir('/dev'))))\n"
            "open('/dev/null', 'w').write('x'); assert len(open('/dev/urandom', 'rb').read(8)) == 8\n"
            "assert open('/dev/zero', 'rb').read(4) == bytes(4)\n")
    res = run(backend, prog, [{"kind": "stdio", "input": "", "output": "fd full null pts random shm stderr stdin "
                                                                       "stdout tty urandom zero"}],
              timeout_s=2, return_output=True)
    assert res["results"][0]["passed"], res


def test_program_has_no_capabilities(backend):
    prog = ("st = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
            "print(*(int(st[k], 16) for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb')), "
            "st['NoNewPrivs'].strip())\n")
    res = run(backend, prog, [{"kind": "stdio", "input": "", "output": "0 0 0 0 0 1"}], timeout_s=2,
              return_output=True)
    assert res["results"][0]["passed"], res


def test_no_way_back_to_privileges(backend):
    # new user/mount namespaces (to get capabilities over a private mount tree) and unmounting the
    # tmpfs that hides the project: neither may reveal it
    prog = ("import subprocess\n"
            f"r = subprocess.run(['unshare', '-r', '-m', 'sh', '-c', 'umount -l {PROJECT}; ls {PROJECT}'], "
            "capture_output=True, text=True)\n"
            "print(r.returncode, r.stdout, r.stderr)\n")
    listing = "\n".join(sorted(os.listdir(PROJECT)))
    r = contained(attack(backend, prog, expected=listing))
    assert "megaprorl" not in r.get("stdout", "").split()


SECCOMP_BPF, SECCOMP_WHY = sb.seccomp_bpf()
needs_seccomp = pytest.mark.skipif(not SECCOMP_BPF, reason=f"seccomp filter unavailable ({SECCOMP_WHY}); "
                                                          "pip install pyseccomp (rewards extra)")


@needs_seccomp
def test_seccomp_filter(backend):
    prog = r'''
import ctypes, errno, os, socket, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
def denied(rc):
    return rc == -1 and ctypes.get_errno() == errno.EPERM
out = {}
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    out["inet"] = "allowed"
except PermissionError:
    out["inet"] = "denied"
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    out["netlink"] = "allowed"
except PermissionError:
    out["netlink"] = "denied"
a, b = socket.socketpair(socket.AF_UNIX)  # allowed
a.send(b"u"); out["unix"] = b.recv(1).decode()
out["unshare_user"] = denied(libc.unshare(0x10000000))
out["ptrace"] = denied(libc.ptrace(0, 0, None, None))  # PTRACE_TRACEME
out["mount"] = denied(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
out["bpf"] = denied(libc.syscall(321, 0, None, 0))
out["perf"] = denied(libc.syscall(298, None, 0, -1, -1, 0))
out["keyctl"] = denied(libc.syscall(250, 0, 0, 0, 0, 0))
out["io_uring"] = denied(libc.syscall(425, 1, None))
r = subprocess.run(["unshare", "-r", "true"], capture_output=True, text=True)  # clone/unshare path
out["unshare_cmd"] = r.returncode != 0
t = threading.Thread(target=lambda: out.__setitem__("thread", "ok")); t.start(); t.join()  # clone3 -> clone
out["subprocess"] = subprocess.run(["true"]).returncode == 0 and os.fork is not None
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitpid(pid, 0)[1] >> 8
print(sorted(out.items()))
'''
    want = sorted({"inet": "denied", "netlink": "denied", "unix": "u", "unshare_user": True, "ptrace": True,
                   "mount": True, "bpf": True, "perf": True, "keyctl": True, "io_uring": True,
                   "unshare_cmd": True, "thread": "ok", "subprocess": True, "fork": 7}.items())
    res = run(backend, prog, [{"kind": "stdio", "input": "", "output": str(want)}], timeout_s=4,
              return_output=True)
    assert res["seccomp"] is True
    assert res["results"][0]["passed"], res


@needs_seccomp
def test_seccomp_other_abi_is_killed(backend):
    # i386 syscalls (int 0x80) from a 64-bit process: libseccomp's bad-arch action kills it
    prog = ("import ctypes, mmap\n"
            "code = bytes([0xb8, 0x14, 0, 0, 0, 0xcd, 0x80, 0xc3])  # mov eax, 20 (getpid); int 0x80; ret\n"
            "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "m.write(code)\n"
            "addr = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
            "print('LEAKED', ctypes.CFUNCTYPE(ctypes.c_int)(addr)())\n")
    r = contained(attack(backend, prog))
    assert r["status"] == "signal" and r["signal"] == signal.SIGSYS, r


def test_seccomp_off_and_require(backend, monkeypatch):
    prog = "import socket\nsocket.socket(socket.AF_INET)\nprint('ok')"
    test = [{"kind": "stdio", "input": "", "output": "ok"}]
    res = run(backend, prog, test, timeout_s=2, seccomp="off")
    assert res["seccomp"] is False and res["results"][0]["passed"], res
    monkeypatch.setattr(sb, "seccomp_bpf", lambda: (b"", "no libseccomp binding (test)"))
    with pytest.raises(sb.SandboxUnavailable, match="seccomp"):
        run(backend, prog, test, timeout_s=2, seccomp="require")
    res = run(backend, prog, test, timeout_s=2, seccomp="auto")  # runs, without the filter (warned)
    assert res["seccomp"] is False and res["results"][0]["passed"], res
