"""Adversarial sandbox suite: every attack is contained (reward 0) and the caller is unharmed.

Needs a working isolation backend (root or user namespaces + util-linux `unshare`, or bubblewrap);
skipped, with the reason, where there is none.
"""

import os
import signal
import socket
import threading
import time

import pytest

from megaprorl.rewards import RewardConfig, RewardPool, score_one
from megaprorl.rewards import sandbox as sb

try:
    BACKEND, _ = sb.resolve_backend("auto")
except sb.SandboxUnavailable as e:  # pragma: no cover
    pytestmark = pytest.mark.skip(reason=str(e))
    BACKEND = None

CFG = RewardConfig(code_timeout_s=2.0, code_memory_mb=512)
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def attack(program, expected="LEAKED", timeout=2.0, stdin=""):
    """Run `program`; it prints `expected` only if the attack worked (so passing == escaping)."""
    t0 = time.monotonic()
    res = sb.run_tests(program, [{"kind": "stdio", "input": stdin, "output": expected}], timeout_s=timeout,
                       memory_mb=512, max_procs=32, max_output_kb=1024, return_output=True)
    res["elapsed"] = time.monotonic() - t0
    return res


def contained(res):
    assert res["error"] is None or "limit" in res["error"], res
    r = res["results"][0]
    assert not r["passed"], r
    return r


def _sandbox_uid_procs():
    """Processes still running as a sandbox uid (200000..1000000) on the host."""
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


def test_backend_is_isolating():
    assert BACKEND in ("unshare", "bwrap")


def test_infinite_loop_is_killed_in_time():
    res = attack("while True:\n    pass", timeout=1.5)
    r = contained(res)
    assert r["status"] == "timeout"
    assert res["elapsed"] < 1.5 + 2.5


def test_fork_bomb():
    prog = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    res = attack(prog, timeout=2.0)
    contained(res)
    assert res["elapsed"] < 6
    time.sleep(0.2)
    assert _sandbox_uid_procs() == []


def test_memory_bomb():
    res = attack("x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))\n", timeout=3.0)
    r = contained(res)
    assert r["status"] in ("error", "killed", "signal")
    res = attack("x = ' ' * (10 ** 11)\nprint('LEAKED')")
    contained(res)


def test_huge_output():
    res = attack("import sys\nwhile True:\n    sys.stdout.write('A' * 65536)\n", timeout=3.0)
    r = contained(res)
    assert r["status"] in ("output_limit", "error", "timeout")
    assert len(r.get("stdout", "")) <= 5000  # only a tail comes back


def test_disk_fill_in_tmp_is_bounded():
    prog = ("import os\nn = 0\ntry:\n    while True:\n        open(f'/tmp/f{n}', 'wb').write(b'x' * 1000000)\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e)\n")
    res = attack(prog, timeout=3.0)
    r = contained(res)
    assert "No space left" in r.get("stdout", "") or r["status"] != "passed"


@pytest.mark.parametrize("path", ["/etc/megaprorl_pwned", "/root/megaprorl_pwned", "/var/tmp/megaprorl_pwned",
                                  "/dev/shm/megaprorl_pwned", os.path.join(PROJECT, "megaprorl_pwned"),
                                  "/usr/megaprorl_pwned"])
def test_write_outside_tmp(path):
    prog = (f"try:\n    open({path!r}, 'w').write('x')\n    print('LEAKED')\nexcept Exception as e:\n"
            f"    print('denied', e)\n")
    contained(attack(prog))
    assert not os.path.exists(path)


def test_tmp_is_writable_and_private():
    res = sb.run_tests("open('/tmp/x', 'w').write('ok')\nprint(open('/tmp/x').read())",
                       [{"kind": "stdio", "input": "", "output": "ok"}], timeout_s=2)
    assert res["results"][0]["passed"]


@pytest.mark.parametrize("target", ["/etc/shadow", "/root", os.path.abspath(__file__), PROJECT,
                                    os.path.expanduser("~")])
def test_reading_hidden_files(target):
    if os.path.isdir(target):
        secret = "\n".join(sorted(os.listdir(target)))
        prog = f"import os\nprint(chr(10).join(sorted(os.listdir({target!r}))))"
    else:
        try:
            secret = open(target).read()[:2000]
        except OSError:
            pytest.skip(f"{target} not readable on the host")
        prog = f"print(open({target!r}).read()[:2000], end='')"
    if not secret.strip():
        pytest.skip(f"{target} is empty on the host")
    contained(attack(prog, expected=secret))


def test_network_socket():
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
    r = contained(attack(prog, timeout=4))
    th.join()
    srv.close()
    assert accepted == []
    assert "no network" in r.get("stdout", "")


def test_signalling_or_killing_the_parent():
    me = os.getpid()
    prog = ("import os, signal\n"
            "for pid in (os.getppid(), 1, %d):\n"
            "    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):\n"
            "        try:\n            os.kill(pid, sig)\n        except OSError:\n            pass\n"
            "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n" % me)
    contained(attack(prog))
    contained(attack("import os\nos.system('kill -9 -1; kill -9 0')\nprint('x')"))
    # the caller is alive and the sandbox still works afterwards
    assert os.getpid() == me
    res = sb.run_tests("print(1)", [{"kind": "stdio", "input": "", "output": "1"}], timeout_s=2)
    assert res["results"][0]["passed"]


def test_no_background_processes_left():
    marker = f"megaprorl-bg-{os.getpid()}-{time.time_ns()}"
    prog = ("import os, subprocess, sys\n"
            f"cmd = [sys.executable, '-c', 'import time; time.sleep(300)', {marker!r}]\n"
            "subprocess.Popen(cmd, start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        os.execv(sys.executable, cmd)\n    os._exit(0)\n"
            "print('spawned')\n")
    r = contained(attack(prog))
    assert "spawned" in r.get("stdout", "")
    time.sleep(0.3)
    assert _procs_with(marker) == []
    assert _sandbox_uid_procs() == []


def test_attacks_through_the_pool_leave_the_pool_working():
    progs = ["while True:\n    pass", "import os\nwhile True:\n    os.fork()",
             "import os\nos.kill(os.getppid(), 9)", "import os\nos.system('kill -9 -1')",
             "x = bytearray(10 ** 10)", "print('A' * 10 ** 8)"]
    rec = {"domain": "code", "tests": [{"input": "", "output": "ok"}]}
    with RewardPool(RewardConfig(num_workers=2, code_timeout_s=1.5, timeout_s=20)) as pool:
        res = pool.score([rec] * len(progs), [f"```python\n{p}\n```" for p in progs])
        assert all(r.reward == 0.0 for r in res), res
        good = pool.score([rec], ["```python\nprint('ok')\n```"])
        assert good[0].reward == 1.0
        assert pool.stats()["crashes"] == 0


def test_code_reward_zero_for_escape_attempt_via_score_one():
    res = score_one({"domain": "code", "tests": [{"input": "", "output": "x"}]},
                    "```python\nimport shutil\nshutil.rmtree('/usr', ignore_errors=True)\nprint('y')\n```", CFG)
    assert res.reward == 0.0
    assert os.path.isdir("/usr/bin")
