"""megaprorl/host.py: the per-step host metrics of a run (resident memory, descriptors, threads, processes)."""
import os
import subprocess
import threading
import time

import pytest

from megaprorl.host import descendants, host_stats, rss_bytes

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")


def test_resident_memory_follows_an_allocation():
    before = rss_bytes()
    block = bytearray(b"\x01") * (256 * 2 ** 20)  # written, so resident
    grown = rss_bytes() - before
    assert 200 * 2 ** 20 < grown < 400 * 2 ** 20, grown
    del block
    assert rss_bytes(os.getpid()) == pytest.approx(rss_bytes(), rel=0.05)
    assert rss_bytes(2 ** 22 + 12345) is None  # no such process


def test_descriptors_threads_and_descendants_are_counted():
    base = host_stats()
    assert set(base) == {"memory/host_rss_gib", "host/open_fds", "host/threads", "memory/reward_workers_rss_gib",
                         "host/descendants"}
    # a child that starts a grandchild: both are below this process
    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    r, w = os.pipe()
    try:
        for _ in range(200):  # the grandchild appears once sh has forked it
            if descendants() >= base["host/descendants"] + 2:
                break
            time.sleep(0.01)
        now = host_stats([child.pid])
        assert now["host/descendants"] == base["host/descendants"] + 2
        assert now["host/threads"] == base["host/threads"] + 1
        assert now["host/open_fds"] >= base["host/open_fds"] + 2
        assert 0 < now["memory/reward_workers_rss_gib"] < 0.1  # the child's (a shell): some, not much
    finally:
        os.close(r)
        os.close(w)
        stop.set()
        thread.join()
        subprocess.run(["pkill", "-P", str(child.pid)])
        child.kill()
        child.wait()
    assert descendants(child.pid) == 0


def test_soak_report_shows_a_leak_and_a_steady_run(tmp_path, capsys):
    """scripts/soak.py report: quarter medians and peaks and the slope of each host metric."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("soak", os.path.join(os.path.dirname(__file__), "..", "scripts",
                                                                       "soak.py"))
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 101):  # one descriptor leaked every other step; memory bouncing but level
            f.write(json.dumps({"step": step, "memory/host_rss_gib": 1.0 + 0.2 * (step % 3 == 0),
                                "host/open_fds": 100 + step // 2, "host/descendants": 3}) + "\n")
        f.write(json.dumps({"step": 100, "eval/accuracy": 0.5, "final_eval": 1}) + "\n")
    out = soak.report(str(tmp_path), skip=0.2)["keys"]
    assert out["host/open_fds"]["slope_per_1000_steps"] == pytest.approx(500, rel=0.02)
    assert out["host/open_fds"]["median_last_quarter"] > out["host/open_fds"]["max_first_quarter"]
    assert out["memory/host_rss_gib"]["median_first_quarter"] == out["memory/host_rss_gib"]["median_last_quarter"]
    assert abs(out["memory/host_rss_gib"]["slope_per_1000_steps"]) < 0.1  # (the bounce's phase at the ends)
    assert out["host/descendants"]["slope_per_1000_steps"] == 0 and "host/threads" not in out
    assert "host/open_fds" in capsys.readouterr().out and (tmp_path / "soak_report.json").exists()
