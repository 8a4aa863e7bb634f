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
