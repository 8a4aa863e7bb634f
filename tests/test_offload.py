"""Host offload (train.offload_optimizer / train.offload_reference, megaprorl/policy/offload.py): the idle state
leaves the device in place and comes back bit for bit, so training with it equals training without it.

- ``HostOffload`` by hand: views keep their objects and values, dropped storages come back zeroed, spared ones
  are never touched, ``copy=False`` frees without copying.
- ``Policy``: Megatron's optimizer (fp32 weights whose optimizer parameters are the model's own, bf16 weights
  with fp32 main weights, the distributed optimizer over two gloo ranks) trains the same weights, Adam state and
  gradient norms with its state offloaded between steps; the model's weights never leave.
- The trainer: with both offloads on, the state is off the device while the engine generates, and the steps,
  a reference reset (with an optimizer reset), a checkpoint and its resume equal the same run without them.
"""

import pytest
import torch

from dist_utils import run_distributed
from test_distributed_optimizer import _policy, _steps
from test_reliability import _same, _snapshot, _trainer


def _sizes(tensors):
    return [t.untyped_storage().nbytes() for t in tensors]


def test_host_offload_by_hand():
    from megaprorl.policy.offload import HostOffload

    base = torch.randn(10)
    view = base[2:7]  # a view: the same storage, offloaded once
    grad = torch.randn(6)
    weight = torch.randn(4)
    alias = weight[1:]  # shares the spared weight's storage: never touched
    both = torch.randn(3)  # kept and dropped: kept
    want = [base.clone(), weight.clone(), both.clone()]
    off = HostOffload()
    n = off.offload(keep=[base, view, alias, both], drop=[grad, both], spare=[weight])
    assert n == (10 + 6 + 3) * 4 and off.offloaded
    assert _sizes([base, view, grad, both]) == [0, 0, 0, 0] and _sizes([weight]) == [16]
    assert off.offload(keep=[weight]) == n  # already offloaded: nothing more happens
    off.restore()
    assert torch.equal(base, want[0]) and torch.equal(view, want[0][2:7]) and torch.equal(both, want[2])
    assert torch.equal(grad, torch.zeros(6)) and torch.equal(weight, want[1])
    # nothing changed since the restore: free again without copying, and come back the same
    base.zero_()  # ... unless the caller broke that promise: the host copy (the values before) comes back
    off.offload(keep=[], copy=False)
    assert _sizes([base, grad]) == [0, 0]
    off.restore()
    assert torch.equal(base, want[0])
    # a new offload with copy collects afresh (the zeroed base is now the value kept)
    base.zero_()
    off.offload(keep=[base])
    off.restore()
    assert torch.equal(base, torch.zeros(10)) and off.bytes == 40


def _offload_job(rank, world, distributed, dtype, offload):
    pol = _policy(distributed, dtype=dtype, offload=offload)
    norms, freed, weights_kept = [], [], []
    for _ in range(3):
        with pol.on_device():
            norms += _steps(pol, rank, 1)
        if offload:
            states = [v for st in pol.adam_states() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
            freed.append(sum(_sizes(states)) == 0 and sum(_sizes([b.grad_data for b in pol.ddp.buffers])) == 0)
            weights_kept.append(all(n > 0 for n in _sizes(pol.model.parameters())))
    mem = pol.memory_bytes()
    if not offload:  # what the state holds once Adam has stepped: every tensor counted once
        main = [p for o in pol.optimizer.chained_optimizers for g in o.optimizer.param_groups for p in g["params"]]
        own = {p.untyped_storage().data_ptr() for p in pol.model.parameters()}
        states = [v for st in pol.adam_states() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        assert mem["optimizer"] == sum(size(v) for v in states) + sum(
            size(p) for p in main if p.untyped_storage().data_ptr() not in own)
        assert mem["gradients"] == sum(size(b.grad_data) for b in pol.ddp.buffers) > 0
        assert mem["weights"] == sum(size(p) for p in pol.model.parameters())
    return dict(norms=norms, freed=freed, weights_kept=weights_kept, gib=pol.offload_stats().get("gib", 0.0), mem=mem,
                weights=[p.detach().clone() for p in pol.model.parameters()],
                state=[v.clone() for st in pol.adam_states() for v in st.values() if torch.is_tensor(v)]
                if not offload else _restored_state(pol))


def _restored_state(pol):
    with pol.on_device():
        return [v.clone() for st in pol.adam_states() for v in st.values() if torch.is_tensor(v)]


@pytest.mark.parametrize("distributed,dtype", [(False, "fp32"), (False, "bf16"), (True, "bf16")])
def test_policy_trains_the_same_with_its_optimizer_offloaded(distributed, dtype):
    plain = run_distributed(_offload_job, 2, (distributed, dtype, False))
    off = run_distributed(_offload_job, 2, (distributed, dtype, True))
    for a, b in zip(plain, off):
        assert a["norms"] == b["norms"]
        assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
        assert len(a["state"]) == len(b["state"]) > 0
        assert all(torch.equal(x, y) for x, y in zip(a["state"], b["state"]))
        assert b["freed"] == [True] * 3 and b["weights_kept"] == [True] * 3
        assert b["gib"] > 0
        assert a["mem"] == b["mem"]  # counted alike, offloaded or not
        # all that leaves is the optimizer and gradients (1 KiB of slack: Adam's step scalars)
        assert 0 <= b["gib"] * 2 ** 30 - (b["mem"]["optimizer"] + b["mem"]["gradients"]) < 1024


def test_trainer_offloads_while_generating_and_trains_the_same(tmp_path):
    """Both offloads on: off the device while the engine generates; the metrics of three steps (a reference reset
    with an optimizer reset after the second), the weights, Adam state and reference after them, and a resumed
    trainer's state equal the run without offload."""
    common = ["algo.kl.coef=0.01", "algo.reference_reset.interval=2", "algo.reference_reset.reset_optimizer=true",
              "train.prompts_per_step=4", "train.mini_batch_prompts=2"]
    runs = {}
    for name, extra in (("plain", []), ("offload", ["train.offload_optimizer=true", "train.offload_reference=true"])):
        t = _trainer(tmp_path / name, *common, *extra)
        seen = []
        generate = t.engine.generate

        def spy(*a, _t=t, _seen=seen, _generate=generate, **k):
            st = [v for s in _t.policy.adam_states() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
            _seen.append((sum(_sizes(st)), sum(_sizes(_t.reference.model.parameters())),
                          min(_sizes(_t.policy.model.parameters()))))
            return _generate(*a, **k)

        t.engine.generate = spy
        t.warmstart()
        metrics = []
        for _ in range(3):
            stats = t.rl_step()
            t.step += 1
            assert bool(t.maybe_reset_reference(stats)) == (t.step == 2)
            metrics.append({k: v for k, v in stats.items() if not k.startswith(("time/", "offload/", "perf/"))
                            and k not in ("step_time_s", "tokens_per_s")})
        path = t.save_checkpoint()
        with t._on_device(changes=False):
            snap = _snapshot(t), [p.detach().clone() for p in t.reference.model.parameters()]
        runs[name] = dict(t=t, seen=seen, metrics=metrics, snap=snap, path=path, stats=stats)
    plain, off = runs["plain"], runs["offload"]
    assert plain["metrics"] == off["metrics"]
    assert _same(plain["snap"][0], off["snap"][0])
    assert all(torch.equal(a, b) for a, b in zip(plain["snap"][1], off["snap"][1]))
    # while generating: the plain run holds its state; the offloaded one's optimizer state (after the first
    # update) and reference weights are emptied, the policy's weights are not
    # (Adam's moments exist from the first update until the optimizer reset after the second step)
    assert [opt > 0 for opt, _, _ in plain["seen"]] == [False, True, False] and plain["seen"][0][1] > 0
    assert [opt for opt, _, _ in off["seen"]] == [0] * len(off["seen"])
    assert [ref for _, ref, _ in off["seen"]] == [0] * len(off["seen"]) and min(w for _, _, w in off["seen"]) > 0
    assert off["stats"]["offload/optimizer_gib"] > 0 and off["stats"]["offload/reference_gib"] > 0
    assert "time/offload_s" in off["stats"] and "time/offload_s" not in plain["stats"]
    line = off["t"]._memory_line()  # the start-up line: counted alike, and where each part sits
    assert line.split(" (in host")[0] == plain["t"]._memory_line().split(" once Adam")[0] + " once Adam has stepped"
    assert "(in host memory outside the update)" in line and "(in host memory outside its pass)" in line
    # a resumed offloading trainer holds the checkpoint's state (offloaded again once loaded)
    u = _trainer(tmp_path / "resumed", *common, "train.offload_optimizer=true", "train.offload_reference=true")
    u.load_checkpoint(off["path"])
    assert u.policy._offload.offloaded and u.reference._offload.offloaded
    with u._on_device(changes=False):
        assert _same(_snapshot(u), off["snap"][0])
        assert all(torch.equal(a, b) for a, b in zip(u.reference.model.parameters(), off["snap"][1]))
    for r in runs.values():
        r["t"].close()
    u.close()


def test_offload_reference_without_a_reference_is_a_config_error(tmp_path):
    from megaprorl.config import ConfigError

    with pytest.raises(ConfigError, match="train.offload_reference"):
        _trainer(tmp_path, "algo.kl.coef=0", "train.offload_reference=true")
