"""Reference-reset controller: interval, KL spike and validation-stall triggers."""

import json

import pytest

from megaprorl.algo.reset import ReferenceResetConfig, ReferenceResetController


def _run(ctrl, steps, kl=None, val=None):
    """Drive the controller as the trainer does; return the resets that happened."""
    for step in steps:
        if kl is not None:
            ctrl.observe_kl(step, kl(step))
        trig = ctrl.should_reset(step)
        if trig:
            ctrl.record_reset(step, trig)
        if val is not None and val(step) is not None:
            ctrl.observe_validation(step, val(step))
    return list(ctrl.history)


def test_everything_off_by_default():
    c = ReferenceResetController(ReferenceResetConfig())
    assert _run(c, range(1, 1000), kl=lambda s: 1e6 if s == 500 else 0.01, val=lambda s: 0.0) == []


def test_interval():
    c = ReferenceResetController(ReferenceResetConfig(interval=50))
    assert _run(c, range(1, 161)) == [(50, "interval"), (100, "interval"), (150, "interval")]


def test_kl_spike_by_hand():
    # ema 0.5, warm-up 2 observations, factor 3.
    # step 1: kl 1 -> first value: mean = 1 (count 1, not armed)
    # step 2: kl 1 -> count 1 < 2: not armed; mean = 1
    # step 3: kl 2 -> armed; 2 > 3 * 1? no; mean = .5 + 1 = 1.5
    # step 4: kl 4 -> 4 > 4.5? no; mean = .75 + 2 = 2.75
    # step 5: kl 9 -> 9 > 8.25: spike -> reset at step 5; the statistics restart
    # step 6: kl 100 -> first value after the reset: no spike (not armed)
    cfg = ReferenceResetConfig(kl_spike_factor=3.0, kl_ema=0.5, kl_warmup_steps=2)
    c = ReferenceResetController(cfg)
    kls = {1: 1.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 9.0, 6: 100.0}
    assert _run(c, range(1, 7), kl=kls.get) == [(5, "kl_spike")]
    assert c.kl_mean == 100.0 and c.kl_count == 1


def test_kl_spike_not_armed_during_warmup_and_ignores_nonfinite():
    c = ReferenceResetController(ReferenceResetConfig(kl_spike_factor=2.0, kl_warmup_steps=10))
    assert not c.observe_kl(1, 0.1)
    assert not c.observe_kl(2, 50.0)  # a huge value during warm-up is not a spike
    assert not c.observe_kl(3, float("nan")) and c.kl_count == 2
    # a running mean of 0 (e.g. KL exactly 0 right after a reset) never arms the test
    z = ReferenceResetController(ReferenceResetConfig(kl_spike_factor=2.0, kl_warmup_steps=0))
    z.observe_kl(1, 0.0)
    assert not z.observe_kl(2, 1.0)


def test_val_stall_by_hand():
    # stall_evals = 2; metrics at evaluations: .1 (best), .3 (best), .3 (no), .2 (no) -> reset after the 4th;
    # then .25 (no, best stays .3), .35 (best) -> no second reset
    c = ReferenceResetController(ReferenceResetConfig(stall_evals=2))
    evals = {10: 0.1, 20: 0.3, 30: 0.3, 40: 0.2, 50: 0.25, 60: 0.35}
    hist = _run(c, range(1, 71), val=evals.get)
    assert hist == [(41, "val_stall")]  # observed at step 40, acted on at the next step's check
    assert c.best_metric == 0.35 and c.evals_since_improvement == 0


def test_val_stall_min_delta():
    c = ReferenceResetController(ReferenceResetConfig(stall_evals=1, stall_min_delta=0.05))
    assert c.observe_validation(1, 0.5)
    assert not c.observe_validation(2, 0.54)  # +0.04 is not an improvement
    assert c.should_reset(3) == "val_stall"


def test_min_gap_and_precedence():
    c = ReferenceResetController(ReferenceResetConfig(interval=5, stall_evals=1, min_gap=3))
    c.record_reset(10, "interval")
    c.observe_validation(10, 0.5)
    c.observe_validation(11, 0.4)  # stall pending
    assert c.should_reset(11) is None and c.should_reset(12) is None  # within min_gap of step 10
    assert c.should_reset(13) == "val_stall"
    c.record_reset(13, "val_stall")
    # both interval (18 - 13 >= 5) and kl_spike pending at 18: kl_spike wins
    c.pending.append("kl_spike")
    assert c.should_reset(18) == "kl_spike"


def test_interval_clock_restarts_after_any_reset():
    c = ReferenceResetController(ReferenceResetConfig(interval=10))
    c.record_reset(4, "kl_spike")
    assert c.should_reset(13) is None and c.should_reset(14) == "interval"


def test_state_dict_round_trip_is_json_and_resumes_identically():
    cfg = ReferenceResetConfig(interval=7, kl_spike_factor=2.0, kl_warmup_steps=1, stall_evals=2)
    a = ReferenceResetController(cfg)
    _run(a, range(1, 20), kl=lambda s: 1.0, val=lambda s: 0.1 if s % 5 == 0 else None)
    state = json.loads(json.dumps(a.state_dict()))  # the checkpoint stores it as JSON
    b = ReferenceResetController(cfg)
    b.load_state_dict(state)
    assert b.history == a.history and all(isinstance(h, tuple) for h in b.history)
    kl = {20: 1.0, 21: 5.0, 22: 1.0}
    assert _run(a, range(20, 40), kl=lambda s: kl.get(s, 1.0)) == _run(b, range(20, 40), kl=lambda s: kl.get(s, 1.0))


def test_config_validation():
    for bad in (dict(interval=-1), dict(kl_ema=1.0), dict(kl_spike_factor=-1.0), dict(min_gap=-2)):
        with pytest.raises(ValueError):
            ReferenceResetController(ReferenceResetConfig(**bad))
