"""RewardPool: parallel scoring, async submit, per-sample timeouts, crashes, registry in workers."""

import os
import time

import pytest

from megaprorl.rewards import RewardConfig, RewardPool, RewardResult, get_verifier, register_verifier, score_one


# verifiers registered at import time of this module: workers re-import it (fn.__module__)
def _slow(record, response):
    time.sleep(float(record.get("sleep", 0.3)))
    return 1.0, {"slept": record.get("sleep", 0.3), "pid": os.getpid()}


def _hang(record, response):
    while True:  # a pure-Python infinite loop, like a sympy blow-up
        pass


def _crash(record, response):
    if record.get("how") == "segv":
        import ctypes
        ctypes.string_at(0)
    os._exit(3)


def _raise(record, response):
    raise RuntimeError("verifier bug")


def _with_cfg(record, response, cfg):
    return float(cfg.code_memory_mb == 777)


register_verifier("t_slow", _slow)
register_verifier("t_hang", _hang)
register_verifier("t_crash", _crash)
register_verifier("t_raise", _raise)
register_verifier("t_cfg", _with_cfg)


def test_registry():
    assert get_verifier("t_slow") is _slow
    with pytest.raises(KeyError):
        get_verifier("no_such_domain")
    assert score_one({"domain": "no_such_domain"}, "x").error
    assert score_one({"domain": "t_cfg"}, "x", RewardConfig(code_memory_mb=777)).reward == 1.0
    with pytest.raises(TypeError):
        register_verifier("bad", 3)


def test_inline_mode():
    pool = RewardPool(RewardConfig(num_workers=0))
    res = pool.score([{"domain": "math", "answer": "2"}, {"domain": "t_raise"}], ["\\boxed{2}", "x"])
    assert res[0].reward == 1.0 and res[1].error and "verifier bug" in res[1].error
    assert pool.stats()["errors"] == 1 and pool.stats()["scored"] == 2
    pool.close()


def test_parallel_order_and_async_submit():
    cfg = RewardConfig(num_workers=2, timeout_s=10)
    with RewardPool(cfg) as pool:
        recs = [{"domain": "t_slow", "sleep": 0.3, "id": i} for i in range(4)]
        fut = pool.submit(recs, ["x"] * 4)
        assert not fut.done()  # returns at once, scoring overlaps with the caller
        mixed = pool.submit([{"domain": "math", "answer": "3"}, {"domain": "stem", "answer": "A"}],
                            ["\\boxed{3}", "The answer is B"])
        res = fut.result(timeout=20)
        assert [r.reward for r in res] == [1.0] * 4
        # parallel: the samples were spread over both workers (not a wall-clock bound, which load can break)
        assert len({r.parts["pid"] for r in res}) == 2 and os.getpid() not in {r.parts["pid"] for r in res}
        assert sorted(pool.worker_pids()) == sorted({r.parts["pid"] for r in res})  # (their memory is logged)
        assert [r.reward for r in mixed.result(timeout=20)] == [1.0, 0.0]
        assert pool.score([], []) == []
        with pytest.raises(ValueError):
            pool.submit([{}], [])


def test_timeout_kills_and_replaces_worker():
    with RewardPool(RewardConfig(num_workers=2, timeout_s=1.0)) as pool:
        t0 = time.monotonic()
        res = pool.score([{"domain": "t_hang"}, {"domain": "math", "answer": "1"}, {"domain": "t_hang"}],
                         ["x", "\\boxed{1}", "y"])
        assert time.monotonic() - t0 < 6
        assert res[0].reward == 0.0 and res[0].error.startswith("timeout")
        assert res[2].error.startswith("timeout")
        assert res[1].reward == 1.0 and res[1].error is None
        st = pool.stats()
        assert st["timeouts"] == 2 and st["errors"] == 2 and st["scored"] == 3
        # still works afterwards
        assert pool.score([{"domain": "math", "answer": "5"}], ["\\boxed{5}"])[0].reward == 1.0


def test_crashes_are_counted_not_fatal():
    with RewardPool(RewardConfig(num_workers=1, timeout_s=5.0)) as pool:
        res = pool.score([{"domain": "t_crash"}, {"domain": "t_crash", "how": "segv"}, {"domain": "t_raise"},
                          {"domain": "math", "answer": "4"}], ["a", "b", "c", "\\boxed{4}"])
        assert [r.reward for r in res] == [0.0, 0.0, 0.0, 1.0]
        assert res[0].error.startswith("crash") and res[1].error.startswith("crash")
        assert "verifier bug" in res[2].error
        st = pool.stats()
        assert st["crashes"] == 2 and st["errors"] == 3


def test_workers_outlive_the_trainers_signals():
    """SLURM's SIGTERM / SIGUSR1 (and Ctrl-C's SIGINT) reach the whole process group: the workers ignore them, so
    the trainer can checkpoint and close the pool; the pool alone ends its workers."""
    import signal

    with RewardPool(RewardConfig(num_workers=2, timeout_s=5.0)) as pool:
        assert pool.score([{"domain": "math", "answer": "1"}] * 2, ["\\boxed{1}"] * 2)[0].reward == 1.0
        pids = [w.proc.pid for w in pool._workers]
        for pid in pids:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                os.kill(pid, sig)
        time.sleep(0.5)
        assert [w.proc.pid for w in pool._workers] == pids and all(w.proc.is_alive() for w in pool._workers)
        assert pool.score([{"domain": "math", "answer": "2"}], ["\\boxed{2}"])[0].reward == 1.0
        assert pool.stats()["crashes"] == 0


def test_a_failed_restart_leaves_a_slot_that_is_filled_later(monkeypatch, caplog):
    """A worker that cannot be restarted (the start raises, e.g. a dead forkserver) leaves the pool one worker
    short, logged, not broken: the next rounds start it, scoring goes on, and close() ends cleanly (before, the
    stopped worker stayed listed and its closed process object broke the dispatcher and close())."""
    with RewardPool(RewardConfig(num_workers=1, timeout_s=5.0)) as pool:
        start, fails = pool._start_worker, [2]

        def flaky():
            if fails[0]:
                fails[0] -= 1
                raise OSError("forkserver gone")
            return start()

        monkeypatch.setattr(pool, "_start_worker", flaky)
        res = pool.submit([{"domain": "t_crash"}, {"domain": "math", "answer": "3"}],
                          ["a", "\\boxed{3}"]).result(timeout=60)  # the old pool never scored the second
        assert res[0].error.startswith("crash") and res[1].reward == 1.0 and fails == [0]
        assert len(pool._workers) == 1 and pool.stats()["restarts"] == 1
        assert "cannot start a reward worker; retrying" in caplog.text
    assert pool._workers == []


def test_extra_verifier_module_and_record_module(tmp_path, monkeypatch):
    mod = tmp_path / "mpr_extra_verifier_mod.py"
    mod.write_text("from megaprorl.rewards import register_verifier\n"
                   "register_verifier('addition_test', lambda rec, resp: float(resp.strip() == str(rec['a'] + rec['b'])))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RewardConfig(num_workers=1, extra_verifier_modules=["mpr_extra_verifier_mod"])
    with RewardPool(cfg) as pool:
        res = pool.score([{"domain": "addition_test", "a": 2, "b": 3}] * 2, ["5", "6"])
        assert [r.reward for r in res] == [1.0, 0.0], res
    with RewardPool(RewardConfig(num_workers=1)) as pool:
        res = pool.score([{"domain": "addition_test", "verifier_module": "mpr_extra_verifier_mod", "a": 1, "b": 1}],
                         ["2"])
        assert res[0].reward == 1.0, res


def test_close_is_idempotent_and_submit_after_close_fails():
    pool = RewardPool(RewardConfig(num_workers=1))
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError):
        pool.submit([{"domain": "math", "answer": "1"}], ["1"])


def test_result_type():
    r = score_one({"domain": "math", "answer": "1"}, "\\boxed{1}")
    assert isinstance(r, RewardResult) and r.to_dict()["reward"] == 1.0


def test_reasoning_models_are_scored_on_the_text_after_their_thought():
    """rewards.think_mode: 'auto' scores what follows the last </think> (an IFEval constraint and a stray
    \\boxed{} in the thought do not count), 'require' gives an unfinished thought 0, 'off' scores it all."""
    ife = {"domain": "ifeval", "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    thought = "<think>\nHmm, first, let me see: 2 + 2, so \\boxed{5}? No.\n</think>\n\n"
    auto = score_one(ife, thought + "The answer is four.", RewardConfig())
    assert auto.reward == 1.0 and auto.parts["thought_chars"] == len(thought) - len("</think>\n\n")
    assert score_one(ife, thought + "The answer is four.", RewardConfig(think_mode="off")).reward == 0.0
    maths = {"domain": "math", "answer": "4"}
    assert score_one(maths, thought + "So \\boxed{4}", RewardConfig()).reward == 1.0
    assert score_one({"domain": "math", "answer": "5"}, thought + "So 4.", RewardConfig()).reward == 0.0
    # no </think>: 'auto' scores the whole response, 'require' scores 0 and says why
    assert score_one(maths, "\\boxed{4}", RewardConfig()).reward == 1.0
    req = score_one(maths, "<think>\\boxed{4} and then the budget ran out", RewardConfig(think_mode="require"))
    assert (req.reward, req.parts, req.error) == (0.0, {"think_end_missing": True}, None)
    assert score_one(maths, "<think>x</think>\\boxed{4}", RewardConfig(think_mode="require")).reward == 1.0
    bad = score_one(maths, "\\boxed{4}", RewardConfig(think_mode="sometimes"))
    assert bad.reward == 0.0 and "rewards.think_mode" in bad.error


def test_think_mode_is_checked_in_the_config():
    from megaprorl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rewards.think_mode"):
        load_config("examples/demo.yaml", ["rewards.think_mode=sometimes"])


LEFT_OPEN = """
from megaprorl.rewards import RewardConfig, RewardPool
if __name__ == "__main__":
    p = RewardPool(RewardConfig(num_workers=2))
    print(p.score([{"domain": "math", "prompt": "1+1", "answer": "2"}], ["\\\\boxed{2}"])[0].reward, flush=True)
"""


def test_a_pool_left_open_closes_at_exit(tmp_path):
    """A process that exits with its pool open (its owner failed before closing it: a trainer whose data file is
    missing did) closes the pool before multiprocessing's exit handler terminates the workers.  Before, the
    dispatcher saw them die, logged 'idle reward worker died ... replacing it' and started new ones during the
    exit, which sometimes hung the process."""
    import subprocess
    import sys

    script = tmp_path / "left_open.py"
    script.write_text(LEFT_OPEN)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(2):
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": root})
        assert r.returncode == 0 and r.stdout.strip() == "1.0", r.stderr[-2000:]
        assert "replacing it" not in r.stderr
