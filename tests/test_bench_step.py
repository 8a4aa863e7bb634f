"""`megaprorl bench step` on the CPU: the tiny preset runs every phase and writes its JSON report."""

import json

import pytest


@pytest.mark.parametrize("extra", [[], ["--skip-rollout", "--ragged", "--pack-tokens", "64", "--distributed-optimizer"]])
def test_bench_step_tiny_writes_report(tmp_path, extra):
    from megaprorl.bench.step import main

    out = tmp_path / "bench_step.json"
    assert main(["--preset", "tiny", "--repeats", "1", "--out", str(out), *extra]) == 0
    rep = json.loads(out.read_text())
    t = rep["times_s"]
    for phase in ("rollout", "reward", "logprob", "update", "weight_sync", "total"):
        assert t[phase] >= 0.0, phase
    assert t["logprob"] > 0 and t["update"] > 0 and t["tokens"] > 0
    assert rep["tokens_per_s_trainer"] > 0
    assert rep["distributed_optimizer"] == ("--distributed-optimizer" in extra)
    assert rep["pack_tokens"] == (64 if "--pack-tokens" in extra else 0)
    if "--skip-rollout" not in extra:
        assert t["rollout"] > 0  # the embedded engine decoded the responses
