"""Evaluation sets (eval.sets): loading, config errors, per-set metrics, per-prompt rows, the reset trigger's
metric, and data-parallel evaluation."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megaprorl.algo.passk import pass_at_k
from megaprorl.data.sources import DataError, EvalSetConfig, load_eval_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo.yaml")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("# a comment line\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _rows(n, tag="q"):
    return [{"domain": "math", "prompt": f"{tag}{i}", "answer": str(i)} for i in range(n)]


# ------------------------------------------------------------------ loading
def test_a_file_set_is_every_row_once_in_file_order_or_a_seeded_subset(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", _rows(7))
    every = load_eval_set(EvalSetConfig(name="s", path=path), "eval.sets[0]")
    assert [r["prompt"] for r in every] == [f"q{i}" for i in range(7)]
    assert every[0]["id"] == "s.jsonl:2"  # the comment is line 1
    sub = load_eval_set(EvalSetConfig(name="s", path=path, n_prompts=4, seed=1), "eval.sets[0]")
    assert len(sub) == 4 and len({r["prompt"] for r in sub}) == 4
    assert sub == load_eval_set(EvalSetConfig(name="s", path=path, n_prompts=4, seed=1), "eval.sets[0]")
    others = [load_eval_set(EvalSetConfig(name="s", path=path, n_prompts=4, seed=s), "x") for s in range(2, 6)]
    assert any({r["prompt"] for r in o} != {r["prompt"] for r in sub} for o in others)
    more = load_eval_set(EvalSetConfig(name="s", path=path, n_prompts=50), "eval.sets[0]")
    assert sorted(r["prompt"] for r in more) == sorted(r["prompt"] for r in every)  # no row twice


def test_reasoning_gym_and_builtin_sets(tmp_path):
    rg = load_eval_set(EvalSetConfig(name="legs", type="reasoning_gym", task="leg_counting", size=5, seed=3), "k")
    assert [r["id"] for r in rg] == [f"rg/leg_counting/3/{i}" for i in range(5)]
    add = load_eval_set(EvalSetConfig(name="a3", type="builtin", n_prompts=6, kwargs={"min_digits": 3,
                                                                                        "max_digits": 3}), "k")
    assert len({r["id"] for r in add}) == 6
    assert all(len(x) == 3 for r in add for x in r["id"].split("+"))
    with pytest.raises(DataError, match=r"eval.sets\[2\].n_prompts: a builtin evaluation set needs n_prompts > 0"):
        load_eval_set(EvalSetConfig(name="a", type="builtin"), "eval.sets[2]")


def test_set_errors_name_the_key_and_the_file(tmp_path):
    with pytest.raises(DataError, match=r"eval.sets\[1\]: prompt file not found: .*nope.jsonl"):
        load_eval_set(EvalSetConfig(name="x", path=str(tmp_path / "nope.jsonl")), "eval.sets[1]")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"domain": "math", "prompt": "p", "answer": "1"}\n{"domain": "math", "prompt": "p"}\n')
    with pytest.raises(DataError, match=r"eval.sets\[0\]: .*bad.jsonl:2: math row needs field 'answer'"):
        load_eval_set(EvalSetConfig(name="x", path=str(bad)), "eval.sets[0]")
    from megaprorl.data.builtin import AdditionSource
    from megaprorl.data.sources import register_source_type

    register_source_type("endless_for_eval_test", lambda c: AdditionSource(seed=c.seed))
    with pytest.raises(DataError, match=r"eval.sets\[0\].n_prompts: .*'endless_for_eval_test' has no length"):
        load_eval_set(EvalSetConfig(name="x", type="endless_for_eval_test"), "eval.sets[0]")
    assert len(load_eval_set(EvalSetConfig(name="x", type="endless_for_eval_test", n_prompts=3), "k")) == 3


@pytest.mark.parametrize("sets,extra,match", [
    ([{"name": "a b", "type": "builtin", "n_prompts": 2}], [], r"'eval.sets\[0\].name': 'a b'"),
    ([{"type": "builtin", "n_prompts": 2}], [], r"'eval.sets\[0\].name': ''"),
    ([{"name": "a", "type": "builtin", "n_prompts": 2}, {"name": "a", "type": "builtin", "n_prompts": 2}], [],
     r"'eval.sets\[1\].name': 'a' names two evaluation sets"),
    ([{"name": "accuracy", "type": "builtin", "n_prompts": 2}], [], r"'eval.sets\[0\].name': 'accuracy' is an "),
    ([{"name": "a", "type": "builtin", "n_prompts": -1}], [], r"'eval.sets\[0\].n_prompts': must be >= 0"),
    ([{"name": "a", "type": "builtin", "n_prompts": 2, "ks": [0]}], [], r"'eval.sets\[0\].ks'"),
    ([{"name": "a", "type": "builtin", "n_prompts": 2}], ["eval.source=val"], r"'eval.source': .*one or the other"),
    ([{"name": "a", "type": "builtin", "n_prompts": 2, "shuffle": True}], [], r"eval.sets\[0\].shuffle"),
    ([{"name": "a", "type": "builtin", "n_prompts": 2}], ["eval.n_prompts=100"],
     r"'eval.n_prompts': 100 has no effect under eval.sets .*give each set its own n_prompts"),
    ([{"name": "a", "type": "builtin", "n_prompts": 2, "max_new_tokens": 64}], [],
     r"'eval.sets\[0\].max_new_tokens': 64 leaves no room for a prompt under model.max_position_embeddings=64"),
    ([{"name": "a", "type": "builtin", "n_prompts": 2}], ["eval.max_new_tokens=70"], r"'eval.max_new_tokens': 70"),
])
def test_config_errors_name_the_key(tmp_path, sets, extra, match):
    from megaprorl.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text(json.dumps({"base": DEMO, "eval": {"sets": sets}}))
    with pytest.raises(ConfigError, match=match):
        load_config(str(p), extra)


# ------------------------------------------------------------------ metrics through the trainer
def _trainer(tmp_path, sets, *extra):
    """A tiny demo policy whose verifier is replaced: a record answering "yes" scores 1, "no" 0, and "coin" 1 when
    the response has an even number of characters (so samples of one prompt differ); on "boom" it fails."""
    from megaprorl.config import load_config
    from megaprorl.rewards.base import RewardResult
    from megaprorl.trainer import Trainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps({"base": DEMO, "eval": {"sets": sets}}))
    t = Trainer(load_config(str(cfg_path), [
        f"output_dir={tmp_path}", "warmstart.steps=0", "rollout.max_new_tokens=5", "logging.progress=false",
        "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "rewards.num_workers=0",
        "eval.greedy=false", *extra]))

    def submit(records, responses):  # the pool's call (each rollout scored as soon as it finishes)
        res = [RewardResult(0.0, error="worker crashed: boom") if r["answer"] == "boom" else
               RewardResult({"yes": 1.0, "no": 0.0}.get(r["answer"], float(len(s) % 2 == 0)))
               for r, s in zip(records, responses)]
        return SimpleNamespace(result=lambda: res)

    if t.rewards is not None:
        t.rewards.submit = submit
    return t


def _answers(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"domain": "math", "prompt": f"a{i}", "answer": x}
                                           for i, x in enumerate(["yes", "no", "yes", "coin", "no"])])
    b = write_jsonl(tmp_path / "b.jsonl", [{"domain": "stem", "prompt": f"b{i}", "answer": x}
                                           for i, x in enumerate(["coin", "coin", "yes"])])
    return [{"name": "a", "path": a, "samples_per_prompt": 4, "ks": [1, 2, 4]},
            {"name": "b", "path": b, "samples_per_prompt": 3, "ks": [3], "max_new_tokens": 3}]


def test_per_set_metrics_and_rows(tmp_path):
    """Each set's greedy accuracy and pass@k are those of its prompts' rows (the verifier's rewards known by
    construction), eval/accuracy is the greedy accuracy over both sets' prompts, budgets are per set."""
    t = _trainer(tmp_path, _answers(tmp_path), "eval.write_responses=true")
    try:
        ev = t.evaluate()
        rows = t.eval_rows
    finally:
        t.close()
    assert [(r.set, r.id) for r in rows] == [("a", f"a.jsonl:{i + 2}") for i in range(5)] + \
        [("b", f"b.jsonl:{i + 2}") for i in range(3)]
    assert ev["eval/a/n_prompts"] == 5 and ev["eval/b/n_prompts"] == 3 and ev["eval/n_prompts"] == 8
    greedy = [r.greedy_reward for r in rows]
    coin = [float(len(r.greedy_response) % 2 == 0) for r in rows]
    assert greedy == [1, 0, 1, coin[3], 0, coin[5], coin[6], 1]
    assert ev["eval/a/accuracy"] == pytest.approx(sum(greedy[:5]) / 5)
    assert ev["eval/b/accuracy"] == pytest.approx(sum(greedy[5:]) / 3)
    assert ev["eval/accuracy"] == pytest.approx(sum(greedy) / 8)
    assert ev["eval/mean_pass@1"] == pytest.approx((ev["eval/a/pass@1"] + ev["eval/b/pass@1"]) / 2)
    for name, ks, n, budget in (("a", (1, 2, 4), 4, 5), ("b", (1, 3), 3, 3)):
        mine = [r for r in rows if r.set == name]
        assert all(len(r.rewards) == n and max(r.tokens) <= budget for r in mine)
        assert max(r.greedy_tokens for r in mine) <= budget
        for k in ks:
            want = sum(pass_at_k(n, int(sum(r.rewards)), k) for r in mine) / len(mine)
            assert ev[f"eval/{name}/pass@{k}"] == pytest.approx(want)
        assert ev[f"eval/{name}/response_tokens"] == pytest.approx(sum(r.greedy_tokens for r in mine) / len(mine))
        assert ev[f"eval/{name}/sample_truncated"] == pytest.approx(
            sum(not f for r in mine for f in r.finished) / (n * len(mine)))
    assert "eval/b/pass@2" not in ev and "eval/b/by_domain/stem/pass@3" in ev
    assert [r.rewards for r in rows[:3]] == [[1.0] * 4, [0.0] * 4, [1.0] * 4]
    j = rows[3].to_json()
    assert j["pass_rate"] == sum(rows[3].rewards) / 4 and j["greedy_response"] == rows[3].greedy_response


def test_sets_share_generate_calls_and_a_set_draws_the_same_alone(tmp_path):
    """Sets of one token budget share the greedy call, and of one budget and sample count the sampled call, and the
    calls of one budget are decoded together (one generate_many); each prompt samples from its own seed, so a set's
    rows are the same when it is evaluated alone."""
    sets = _answers(tmp_path)  # a: 4 samples, budget 5 (rollout.max_new_tokens); b: 3 samples, budget 3
    sets.append({"name": "c", "samples_per_prompt": 4,
                 "path": write_jsonl(tmp_path / "c.jsonl", [{"domain": "math", "prompt": f"c{i}", "answer": "coin"}
                                                           for i in range(4)])})
    calls, drawn = [], {}  # calls: per engine call, its calls; drawn: (greedy, prompt ids) -> the responses' ids

    def evaluate(t):
        generate_many = t.engine.generate_many

        def counted(many, on_finish=None):
            calls.append([(len(prompts), params.greedy, params.n, params.max_new_tokens) for prompts, params in many])
            out = generate_many(many, on_finish)
            for (prompts, params), rollouts in zip(many, out):
                for r in rollouts:
                    drawn.setdefault((params.greedy, tuple(prompts[r.prompt_index])), []).append(tuple(r.response_ids))
            return out

        t.engine.generate_many = counted
        try:
            return t.evaluate(), t.eval_rows
        finally:
            t.close()

    ev, rows = evaluate(_trainer(tmp_path / "all", sets))
    assert calls == [[(9, True, 1, 5), (9, False, 4, 5)], [(3, True, 1, 3), (3, False, 3, 3)]]  # one per budget
    with_others = dict(drawn)
    calls.clear()
    drawn.clear()
    ev_c, rows_c = evaluate(_trainer(tmp_path / "c_alone", sets[2:]))
    assert calls == [[(4, True, 1, 5), (4, False, 4, 5)]]
    assert len(drawn) == 8 and drawn == {k: with_others[k] for k in drawn}  # c's prompts' responses, token for token
    sampled = [v for (greedy, _), v in drawn.items() if not greedy]
    assert all(len(set(v)) > 1 for v in sampled) and len({v[0] for v in sampled}) == 4  # each prompt its own seed
    draws = [(r.id, r.greedy_tokens, r.greedy_reward, r.tokens, r.rewards) for r in rows if r.set == "c"]
    assert draws == [(r.id, r.greedy_tokens, r.greedy_reward, r.tokens, r.rewards) for r in rows_c]
    assert {k: v for k, v in ev.items() if k.startswith("eval/c/")} == \
        {k: v for k, v in ev_c.items() if k.startswith("eval/c/")}


def test_a_prompt_that_cannot_fit_its_budget_fails_at_start_up(tmp_path):
    """An evaluation prompt whose set's response budget would run past model.max_position_embeddings is an error
    when the trainer is built (not at the first evaluation), naming the set and the row."""
    from megaprorl.config import ConfigError

    rows = [{"domain": "math", "prompt": "short", "answer": "1"}, {"domain": "math", "prompt": "x" * 62, "answer": "2"}]
    sets = [{"name": "fits", "path": write_jsonl(tmp_path / "f.jsonl", rows[:1])},
            {"name": "long", "path": write_jsonl(tmp_path / "l.jsonl", rows), "max_new_tokens": 5}]
    with pytest.raises(ConfigError, match=r"'eval.sets\[1\] \(long\)': 1 prompts of up to \d+ tokens \+ a response "
                                          r"budget of 5 exceed model.max_position_embeddings=64 \(e.g. row l.jsonl:3"):
        _trainer(tmp_path, sets)


def test_verifier_failures_are_counted_shown_and_warned(tmp_path, capsys):
    """A response whose verifier fails scores 0 and is counted per set and over all sets (eval/.../reward_errors),
    its error is in the prompt's row, and the evaluation warns with the counts and an example."""
    sets = [{"name": "ok", "samples_per_prompt": 2,
             "path": write_jsonl(tmp_path / "ok.jsonl", [{"domain": "math", "prompt": "o", "answer": "yes"}])},
            {"name": "broken", "samples_per_prompt": 3,
             "path": write_jsonl(tmp_path / "x.jsonl", [{"domain": "stem", "prompt": f"x{i}", "answer": a}
                                                       for i, a in enumerate(["boom", "yes", "boom"])])}]
    t = _trainer(tmp_path, sets)
    try:
        ev = t.evaluate()
        rows = [r.to_json() for r in t.eval_rows]
    finally:
        t.close()
    assert ev["eval/ok/reward_errors"] == 0 and ev["eval/broken/reward_errors"] == 2 * (1 + 3)
    assert ev["eval/reward_errors"] == 8 and ev["eval/broken/accuracy"] == pytest.approx(1 / 3)
    assert [(r.get("greedy_error"), r.get("errors")) for r in rows] == [
        (None, None), ("worker crashed: boom", ["worker crashed: boom"] * 3), (None, None),
        ("worker crashed: boom", ["worker crashed: boom"] * 3)]
    out = capsys.readouterr().out
    assert "[eval] 8 responses' verifiers failed and scored 0 (broken: 8); e.g. x.jsonl:2: worker crashed: boom" in out


def test_data_parallel_evaluation_covers_each_prompt_once(tmp_path):
    """At DP=2 each rank evaluates its share and both hold every prompt's row once, and the metrics and rows equal
    one rank's: each prompt samples from its own seed, whichever rank draws it (the rewards of the "coin" prompts
    depend on the sampled lengths)."""
    from dist_utils import run_distributed

    only = [{"name": "a", "path": write_jsonl(tmp_path / "y.jsonl", [
        {"domain": "math", "prompt": f"y{i}", "answer": ["no", "yes", "coin"][i % 3]} for i in range(7)]),
        "samples_per_prompt": 2, "ks": [1, 2]}]
    one = _trainer(tmp_path / "one", only)
    try:
        want = one.evaluate()
        want_rows = [(r.set, r.id, r.greedy_reward, r.rewards) for r in one.eval_rows]
    finally:
        one.close()
    json.dump(only, open(tmp_path / "sets.json", "w"))
    out = run_distributed(_eval_dp_one_set, 2, (str(tmp_path),))
    for ev, rows in out:
        assert [r[1] for r in rows] == [f"y.jsonl:{i + 2}" for i in range(7)]  # in the file's order
        assert ev == pytest.approx(want)
        assert [tuple(r) for r in rows] == want_rows


def _eval_dp_one_set(rank, world, tmp):
    from pathlib import Path

    sets = json.load(open(Path(tmp) / "sets.json"))
    t = _trainer(Path(tmp) / f"r{rank}", sets)
    try:
        return t.evaluate(), [(r.set, r.id, r.greedy_reward, r.rewards) for r in t.eval_rows]
    finally:
        t.close()


# ------------------------------------------------------------------ a training run
def _run_cli(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "megaprorl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


TINY = ["warmstart.steps=10", "train.steps=3", "train.prompts_per_step=4", "train.mini_batch_prompts=4",
        "rollout.n_samples=2", "rollout.max_new_tokens=4", "logging.progress=false", "logging.plot=false",
        "logging.tensorboard=false", "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "rewards.num_workers=0", "eval.interval=1"]


def test_a_run_writes_each_evaluation_and_resets_on_a_set_metric(tmp_path):
    """Training with two builtin sets: an evaluation file per evaluation (before RL, each interval, after),
    per-set metrics in metrics.jsonl and the summary, and the stall trigger watching a set's metric (a minimum
    improvement no accuracy can make: every evaluation after the first is a stall, so resets follow).  The same
    run writes two groups' rollouts per step (logging.rollouts)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"base": DEMO, "eval": {"sets": [
        {"name": "easy", "type": "builtin", "n_prompts": 6},
        {"name": "hard", "type": "builtin", "n_prompts": 4, "kwargs": {"min_digits": 3, "max_digits": 3}}]}}))
    r = _run_cli(["train", str(cfg), f"output_dir={tmp_path}", "name=sets", *TINY,
                  "algo.reference_reset.interval=0", "algo.reference_reset.stall_evals=1",
                  "algo.reference_reset.stall_min_delta=2", "algo.reference_reset.stall_metric=eval/hard/accuracy",
                  "logging.rollouts=2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "sets"
    files = sorted(os.listdir(run / "eval"))
    assert files == [f"step_{s:08d}.jsonl" for s in range(4)]
    for f in files:
        rows = [json.loads(x) for x in open(run / "eval" / f)]
        assert [x["set"] for x in rows] == ["easy"] * 6 + ["hard"] * 4
    metrics = [json.loads(x) for x in open(run / "metrics.jsonl")]
    steps = [m for m in metrics if "eval/hard/accuracy" in m and "final_eval" not in m]
    assert all(m["eval/mean_pass@1"] == (m["eval/easy/accuracy"] + m["eval/hard/accuracy"]) / 2 for m in steps)
    assert [m["step"] for m in steps] == [0, 1, 2]
    timed = [m for m in metrics if "eval/hard/accuracy" in m]  # and the final evaluation's row
    assert len(timed) == 4 and all(m["time/eval_s"] > 0 for m in timed)
    assert not any("time/eval_s" in m for m in metrics if "eval/hard/accuracy" not in m)
    # every evaluation is watched (the one before RL sets the best, step 1 stalls, and so does step 2 after the
    # reset) and a stall's reset is the next step's
    assert [m.get("reference_reset_trigger") for m in metrics if m["step"] and "final_eval" not in m] == \
        [None, "val_stall", "val_stall"]
    summary = json.load(open(run / "summary.json"))
    assert set(summary["eval_sets"]) == {"easy", "hard"}
    assert "easy" in r.stdout and "hard" in r.stdout
    from megaprorl.data.builtin import verify

    assert sorted(os.listdir(run / "rollouts")) == [f"step_{s:08d}.jsonl" for s in (1, 2, 3)]
    for s in (1, 2, 3):
        rows = [json.loads(x) for x in open(run / "rollouts" / f"step_{s:08d}.jsonl")]
        assert [(x["step"], x["group"], x["sample"]) for x in rows] == [(s, g, j) for g in (0, 1) for j in (0, 1)]
        for x in rows:
            a, b = x["id"].split("+")
            assert f"{a}+{b}=" in x["prompt"]
            assert x["reward"] == verify({"answer": str(int(a) + int(b))}, x["response"])
            assert x["response_tokens"] <= 4 and isinstance(x["advantage"], float)
        for g in (0, 1):  # REINFORCE++-baseline: a group's samples with equal rewards have equal advantages
            two = [x for x in rows if x["group"] == g]
            if two[0]["shaped_reward"] == two[1]["shaped_reward"]:
                assert two[0]["advantage"] == pytest.approx(two[1]["advantage"], abs=1e-6)
    from megaprorl.runlog import plot_run

    png = plot_run(str(run))  # a fifth panel, one line per set
    assert os.path.getsize(png) > 10_000

    bad = _run_cli(["train", str(cfg), f"output_dir={tmp_path}", "name=bad", *TINY, "train.steps=1",
                    "algo.reference_reset.stall_evals=1", "algo.reference_reset.stall_metric=eval/hard/pass@1"],
                   tmp_path)
    assert bad.returncode != 0
    assert "'algo.reference_reset.stall_metric': 'eval/hard/pass@1' is not an evaluation metric" in bad.stderr


# ------------------------------------------------------------------ the best checkpoints (checkpoint.keep_best)
def test_prune_keeps_the_listed_steps(tmp_path):
    from megaprorl import checkpoint as ckpt

    root = str(tmp_path / "c")
    for step in range(1, 6):
        ckpt.save(root, step, {"x": step}, {"step": step}, keep_last=2, keep=[2] if step < 5 else [])
        assert [s for s, _ in ckpt.list_checkpoints(root)] == sorted({*range(max(1, step - 1), step + 1)} |
                                                                        ({2} if 2 <= step < 5 else set()))


def test_a_run_keeps_its_best_evaluations_checkpoints(tmp_path):
    """keep_last=1 and keep_best=2 by a metric that changes from one evaluation to the next (the sampled responses'
    mean length; no evaluation at the start): the run ends holding the last step's checkpoint and the two best evaluations' (saved although
    checkpoint.interval is 0), best.json lists them, and a resumed longer run carries the ranking on."""
    extra = ["checkpoint.interval=0", "checkpoint.keep_last=1", "checkpoint.keep_best=2",
             "checkpoint.best_metric=eval/sample_response_tokens", "eval.samples_per_prompt=4", "eval.greedy=false",
             "eval.n_prompts=6", "rollout.max_new_tokens=6", "rollout.temperature=1.5", "eval.temperature=1.5"]
    r = _run_cli(["train", DEMO, f"output_dir={tmp_path}", "name=best", *TINY, "train.steps=4", *extra,
                  "eval.at_start=false"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "best"
    metrics = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert metrics[0]["step"] == 1 and sorted(os.listdir(run / "eval"))[0] == "step_00000001.jsonl"  # at_start
    assert json.load(open(run / "summary.json"))["accuracy_before"] is None
    assert metrics[0]["response_length/addition"] == metrics[0]["response_length"]  # one domain
    evals = {m["step"]: m["eval/sample_response_tokens"] for m in metrics if "eval/sample_response_tokens" in m
             and m["step"] > 0}
    assert sorted(evals) == [1, 2, 3, 4]

    def top2(ev):
        return sorted(ev, key=lambda s: (-ev[s], s))[:2]

    best = json.load(open(run / "checkpoints" / "best.json"))
    assert best["metric"] == "eval/sample_response_tokens"
    assert [b["step"] for b in best["best"]] == top2(evals)
    assert [b["value"] for b in best["best"]] == [evals[s] for s in top2(evals)]
    kept = sorted(int(d[5:]) for d in os.listdir(run / "checkpoints") if d.startswith("step_"))
    assert kept == sorted({4, *top2(evals)})
    assert [m.get("checkpoint/best") for m in metrics if m["step"] in (1, 2, 3) and "final_eval" not in m][:2] == \
        [1.0, 1.0]  # the first two evaluations are the best two so far

    r = _run_cli(["train", DEMO, f"output_dir={tmp_path}", "name=best", *TINY, "train.steps=6", *extra,
                  "checkpoint.resume=auto"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(x) for x in open(run / "metrics.jsonl")]
    evals.update({m["step"]: m["eval/sample_response_tokens"] for m in metrics if m["step"] in (5, 6)
                  and "eval/sample_response_tokens" in m})
    best = json.load(open(run / "checkpoints" / "best.json"))
    assert [b["step"] for b in best["best"]] == top2(evals)
    kept = sorted(int(d[5:]) for d in os.listdir(run / "checkpoints") if d.startswith("step_"))
    assert kept == sorted({6, *top2(evals)})


def test_the_unnamed_set_from_eval_source_takes_each_row_once(tmp_path):
    """``eval.source`` (a training source of weight 0, the way before sets) with fewer rows than
    ``eval.n_prompts``: each row is evaluated once (it was drawn with repeats), metrics directly under eval/;
    a name no source has is a config error."""
    from megaprorl.config import ConfigError, load_config
    from megaprorl.trainer import Trainer

    val = write_jsonl(tmp_path / "val.jsonl", [{"domain": "math", "prompt": f"v{i}", "answer": "yes"}
                                               for i in range(3)])
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps({"base": DEMO, "data": {"sources": [
        {"name": "train", "type": "builtin"}, {"name": "val", "type": "jsonl", "path": val, "weight": 0}]}}))
    over = [f"output_dir={tmp_path}", "warmstart.steps=0", "rollout.max_new_tokens=3", "logging.progress=false",
            "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "rewards.num_workers=0",
            "eval.n_prompts=8"]
    t = Trainer(load_config(str(cfg_path), over + ["eval.source=val"]))
    try:
        ev = t.evaluate()
        assert sorted(r.id for r in t.eval_rows) == [f"val.jsonl:{i + 2}" for i in range(3)]
        assert ev["eval/n_prompts"] == 3 and "eval/mean_pass@1" not in ev
    finally:
        t.close()
    with pytest.raises(ConfigError, match="'eval.source': no data source named 'nope'"):
        Trainer(load_config(str(cfg_path), over + ["eval.source=nope"]))
