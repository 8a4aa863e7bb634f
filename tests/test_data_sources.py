"""Prompt sources: JSONL/Parquet loading and validation, Reasoning Gym, mixtures, resumable state."""

import json

import pytest

from megaprorl.data.sources import (DataError, DataSourceConfig, JsonlSource, MixtureSource, ParquetSource,
                                    PromptSource, ReasoningGymSource, build_source, register_source_type)

ROWS = [
    {"domain": "math", "prompt": "1+1?", "answer": "2"},
    {"domain": "stem", "prompt": "Pick", "answer": "A", "choices": ["x", "y"]},
    {"domain": "code", "prompt": "add", "tests": [{"input": "1 2", "output": "3"}]},
    {"domain": "ifeval", "prompt": "no commas", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"domain": "logic", "prompt": "legs?", "task": "leg_counting", "entry": {"question": "q", "answer": "4",
                                                                           "metadata": {}}},
    {"domain": "math", "messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "id": "custom"},
]


def write_jsonl(path, rows, extra=""):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + extra)
    return str(path)


def test_jsonl_loads_all_domains(tmp_path):
    src = JsonlSource(write_jsonl(tmp_path / "p.jsonl", ROWS), seed=1)
    assert isinstance(src, PromptSource)
    got = src.sample(len(ROWS))
    assert sorted(r["id"] for r in got) == sorted(["p.jsonl:1", "p.jsonl:2", "p.jsonl:3", "p.jsonl:4",
                                                   "p.jsonl:5", "custom"])
    assert {r["domain"] for r in got} == {"math", "stem", "code", "ifeval", "logic"}


@pytest.mark.parametrize("bad,msg", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"prompt": "x", "answer": "1"}), "domain"),
    (json.dumps({"domain": "math", "answer": "1"}), "prompt"),
    (json.dumps({"domain": "math", "prompt": "x"}), "answer"),
    (json.dumps({"domain": "code", "prompt": "x"}), "tests"),
    (json.dumps({"domain": "code", "prompt": "x", "tests": {"inputs": [1], "outputs": []}}), "code tests"),
    (json.dumps({"domain": "ifeval", "prompt": "x", "instruction_id_list": ["a"], "kwargs": [{}, {}]}), "kwargs"),
    (json.dumps({"domain": "logic", "prompt": "x", "entry": {"answer": "1"}}), "task"),
    (json.dumps({"domain": "math", "messages": [{"role": "user"}], "answer": "1"}), "messages"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad, msg):
    p = write_jsonl(tmp_path / "bad.jsonl", ROWS[:2], extra="\n" + bad + "\n")
    with pytest.raises(DataError) as ei:
        JsonlSource(p)
    assert f"{p}:4" in str(ei.value) and msg in str(ei.value)


def test_missing_file_and_default_domain(tmp_path):
    with pytest.raises(DataError, match="not found"):
        JsonlSource(str(tmp_path / "nope.jsonl"))
    p = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "1+1", "answer": "2"}])
    assert JsonlSource(p, domain="math").sample(1)[0]["domain"] == "math"


def test_sampler_is_seeded_epoch_based_and_resumable(tmp_path):
    rows = [{"domain": "math", "prompt": f"q{i}", "answer": str(i)} for i in range(10)]
    p = write_jsonl(tmp_path / "s.jsonl", rows)
    a, b = JsonlSource(p, seed=7), JsonlSource(p, seed=7)
    first = [r["prompt"] for r in a.sample(10)]
    assert sorted(first) == sorted(r["prompt"] for r in rows)  # one epoch = every row once
    assert first == [r["prompt"] for r in b.sample(10)]
    assert first != [r["prompt"] for r in JsonlSource(p, seed=8).sample(10)]
    a.sample(3)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-safe
    cont = [r["prompt"] for r in a.sample(12)]
    c = JsonlSource(p, seed=7)
    c.load_state_dict(state)
    assert [r["prompt"] for r in c.sample(12)] == cont


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"domain": "math", "prompt": "1+1?", "answer": "2", "kwargs": None},
            {"domain": "ifeval", "prompt": "p", "answer": None, "instruction_id_list": ["punctuation:no_comma"],
             "kwargs": json.dumps([{}])}]
    rows[0]["instruction_id_list"] = None
    table = pa.Table.from_pylist(rows)
    path = str(tmp_path / "p.parquet")
    pq.write_table(table, path)
    src = ParquetSource(path, shuffle=False)
    got = src.sample(2)
    assert got[0]["answer"] == "2" and got[1]["kwargs"] == [{}]
    bad = pa.Table.from_pylist([{"domain": "math", "prompt": "x", "answer": "1"}, {"domain": "math", "prompt": "y"}])
    pq.write_table(bad, str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet: row 1"):
        ParquetSource(str(tmp_path / "bad.parquet"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet"):
        ParquetSource(str(tmp_path / "junk.parquet"))


def test_reasoning_gym_source():
    s = ReasoningGymSource("leg_counting", size=20, seed=5)
    recs = s.sample(5)
    assert all(r["domain"] == "logic" and r["task"] == "leg_counting" and "<answer>" in r["prompt"] for r in recs)
    json.dumps(recs)  # records are JSON-safe
    s2 = ReasoningGymSource("leg_counting", size=20, seed=5)
    assert [r["id"] for r in s2.sample(5)] == [r["id"] for r in recs]
    st = s.state_dict()
    nxt = s.sample(3)
    s2.load_state_dict(st)
    assert s2.sample(3) == nxt
    m = ReasoningGymSource("basic_arithmetic", size=3, seed=0, prompt_style="messages").sample(1)[0]
    assert m["messages"][0]["role"] == "system"
    with pytest.raises(DataError):
        ReasoningGymSource("no_such_task_xyz", size=3, seed=0)


def test_mixture_weights_and_resume(tmp_path):
    math_rows = [{"domain": "math", "prompt": f"m{i}", "answer": "1"} for i in range(50)]
    stem_rows = [{"domain": "stem", "prompt": f"s{i}", "answer": "A"} for i in range(50)]
    pm = write_jsonl(tmp_path / "m.jsonl", math_rows)
    ps = write_jsonl(tmp_path / "s.jsonl", stem_rows)

    def make():
        return MixtureSource({"math": (JsonlSource(pm, seed=1), 3.0), "stem": (JsonlSource(ps, seed=2), 1.0)}, seed=9)

    mix = make()
    recs = mix.sample(400)
    frac = sum(r["source"] == "math" for r in recs) / 400
    assert 0.65 < frac < 0.85
    st = json.loads(json.dumps(mix.state_dict()))
    cont = [r["prompt"] for r in mix.sample(37)]
    other = make()
    other.load_state_dict(st)
    assert [r["prompt"] for r in other.sample(37)] == cont
    with pytest.raises(DataError):
        MixtureSource({"a": (JsonlSource(pm), 0.0)})


def test_build_source_from_config(tmp_path):
    pm = write_jsonl(tmp_path / "m.jsonl", [{"domain": "math", "prompt": "x", "answer": "1"}])
    one = build_source({"name": "m", "type": "jsonl", "path": pm})
    assert isinstance(one, JsonlSource)
    mix = build_source({"seed": 3, "sources": [
        DataSourceConfig(name="m", type="jsonl", path=pm, weight=1.0),
        {"name": "rg", "type": "reasoning_gym", "task": "leg_counting", "size": 10, "weight": 1.0},
    ]})
    assert isinstance(mix, MixtureSource) and len(mix.sample(8)) == 8
    with pytest.raises(DataError, match="unknown data source key"):
        build_source({"name": "m", "type": "jsonl", "pth": pm})
    with pytest.raises(DataError, match="unknown type"):
        build_source({"name": "m", "type": "nosuchtype"})
    with pytest.raises(DataError, match="needs 'path'"):
        build_source({"name": "m", "type": "jsonl"})
    with pytest.raises(DataError, match="unique"):
        build_source([{"name": "a", "type": "jsonl", "path": pm}, {"name": "a", "type": "jsonl", "path": pm}])


def test_register_source_type():
    class Const:
        def __init__(self, cfg):
            self.cfg, self.n = cfg, 0

        def sample(self, n):
            self.n += n
            return [{"id": str(i), "domain": "math", "prompt": "p", "answer": "1"} for i in range(n)]

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, s):
            self.n = s["n"]

    register_source_type("const_test", Const)
    src = build_source({"name": "c", "type": "const_test", "kwargs": {"x": 1}})
    assert isinstance(src, Const) and src.cfg.kwargs == {"x": 1} and len(src.sample(2)) == 2


# ------------------------------------------------------------------ retiring solved prompts (data.retire_solved_after)
def test_solved_prompt_filter_by_hand():
    """after=2: a prompt retires at its second solved draw in a row; an unsolved draw resets its count; a retired
    prompt stays retired; the state round-trips, and a lower threshold at load retires the streaks that reach it."""
    from megaprorl.data.retire import SolvedPromptFilter, prompt_key

    a, b, c = ({"domain": "math", "prompt": p, "answer": "1"} for p in ("a", "b", "c"))
    f = SolvedPromptFilter(after=2)
    assert f.outcome(a, [1.0, 1.0]) == (prompt_key(a), True)
    assert f.outcome(a, [1.0, 0.5]) == (prompt_key(a), False) and f.outcome(a, [])[1] is False
    ka, kb, kc = (prompt_key(r) for r in (a, b, c))
    assert f.observe([(ka, True), (kb, True), (kc, True)]) == 0
    assert f.observe([(kb, False), (ka, True)]) == 1  # a: two in a row; b: reset
    assert f.is_retired(a) and not f.is_retired(b) and not f.is_retired(c)
    assert f.observe([(ka, False), (kb, True)]) == 0 and f.is_retired(a)  # retired stays retired
    state = json.loads(json.dumps(f.state_dict()))  # the trainer's checkpoint holds it
    g = SolvedPromptFilter(after=2)
    g.load_state_dict(state)
    assert g.retired == {ka} and g.streak == {kb: 1, kc: 1}
    h = SolvedPromptFilter(after=1)
    h.load_state_dict(state)
    assert h.retired == {ka, kb, kc} and h.streak == {}
    off = SolvedPromptFilter(after=0)
    assert off.observe([(ka, True)] * 5) == 0 and not off.is_retired(a)
    # keys: the record's id (with its mixture source) when it has one, else its text; rewards never matter
    assert prompt_key({"id": "x", "prompt": "p"}) == prompt_key({"id": "x", "prompt": "other"})
    assert prompt_key({"id": "x", "source": "s1"}) != prompt_key({"id": "x", "source": "s2"})
    assert prompt_key({"domain": "math", "prompt": "p"}) != prompt_key({"domain": "math", "prompt": "q"})
    assert prompt_key({"domain": "math", "messages": [{"role": "user", "content": "p"}]}) != prompt_key(
        {"domain": "math", "messages": [{"role": "user", "content": "q"}]})


def _retire_trainer(tmp_path, rows, *extra):
    """A tiny demo policy training on ``rows`` (a JSONL source), the rewards replaced: every sample of a row whose
    answer is "solved" scores 1, the others 0."""
    import os

    from megaprorl.config import load_config
    from megaprorl.rewards.base import RewardResult
    from megaprorl.trainer import Trainer

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.yaml")
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp_path / "retire.yaml"
    cfg_path.write_text(json.dumps({"base": demo, "data": {"sources": [
        {"name": "m", "type": "jsonl", "path": write_jsonl(tmp_path / "p.jsonl", rows)}]}}))
    t = Trainer(load_config(str(cfg_path), [
        f"output_dir={tmp_path}", "warmstart.steps=0", "train.prompts_per_step=4", "train.mini_batch_prompts=4",
        "rollout.n_samples=2", "rollout.max_new_tokens=2", "eval.n_prompts=4", "logging.progress=false",
        "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "rewards.num_workers=0",
        "algo.dynamic_sampling.enabled=false", *extra]))

    class Done:
        def __init__(self, rs):
            self.rs = rs

        def result(self):
            return self.rs

    t.rewards.submit = lambda records, responses: Done(
        [RewardResult(1.0 if r["answer"] == "solved" else 0.0) for r in records])
    return t


def test_trainer_retires_solved_prompts_and_keeps_them_out(tmp_path):
    """Six prompts, three always solved, retired after 2 solved draws in a row: each draw's groups are the
    expected ones (none retired before it), the retired set is what the outcomes give, later draws skip the
    retired prompts (counted) and draw only the others; the set survives a checkpoint."""
    from megaprorl.data.retire import prompt_key

    rows = [{"domain": "math", "prompt": f"q{i}", "answer": "solved" if i < 3 else "0"} for i in range(6)]
    t = _retire_trainer(tmp_path, rows, "data.retire_solved_after=2")
    streak, retired, skipped = {}, set(), 0
    try:
        for step in range(6):
            groups, stats = t._draw_groups()
            t.step += 1
            assert len(groups) == 4
            for g in groups:
                key = prompt_key(g["record"])
                assert key not in retired, (step, g["record"])
                solved = g["record"]["answer"] == "solved"
                assert g["reward"].tolist() == [float(solved)] * 2
                streak[key] = streak.get(key, 0) + 1 if solved else 0
                if streak[key] >= 2:
                    retired.add(key)
            assert t.retired.retired == retired, step
            assert stats["data/retired_prompts"] == len(retired)
            skipped += stats["data/skipped_retired"]
        assert retired == {prompt_key(r) for r in t.source.sample(6) if r["answer"] == "solved"}
        assert skipped > 0
        path = t.save_checkpoint()
    finally:
        t.close()
    t2 = _retire_trainer(tmp_path / "b", rows, "data.retire_solved_after=2")
    try:
        t2.load_checkpoint(path)
        assert t2.retired.retired == retired
        groups, _ = t2._draw_groups()
        assert all(g["record"]["answer"] != "solved" for g in groups)
    finally:
        t2.close()


def test_trainer_stops_with_a_clear_error_when_every_prompt_is_retired(tmp_path):
    from megaprorl.config import ConfigError

    """(With dynamic sampling, which throws every solved group away and draws again: the thrown-away groups
    count, and a prompt retires at the end of the step that saw it.)"""
    rows = [{"domain": "math", "prompt": f"q{i}", "answer": "solved"} for i in range(4)]
    t = _retire_trainer(tmp_path, rows, "data.retire_solved_after=1", "algo.dynamic_sampling.enabled=true")
    try:
        _, stats = t._draw_groups()
        assert stats["dynamic_sampling/discarded_frac"] == 1.0 and stats["data/retired_this_step"] == 4
        with pytest.raises(ConfigError, match="'data.retire_solved_after': .* retired as solved .*the pool is used up"):
            t._draw_groups()
    finally:
        t.close()


def _retire_dp_job(rank, world, tmp):
    from pathlib import Path

    from megaprorl.data.retire import prompt_key

    rows = [{"domain": "math", "prompt": f"q{i}", "answer": "solved" if i % 2 == 0 else "0"} for i in range(8)]
    t = _retire_trainer(Path(tmp) / f"rank{rank}", rows, "data.retire_solved_after=1")
    try:
        steps, solved = [], {}
        for _ in range(3):
            groups, stats = t._draw_groups()
            t.step += 1
            steps.append(([prompt_key(g["record"]) for g in groups], sorted(t.retired.retired),
                          stats["data/retired_prompts"]))
            solved.update({prompt_key(g["record"]): g["record"]["answer"] == "solved" for g in groups})
        return steps, solved
    finally:
        t.close()


def test_retired_prompts_are_one_pool_over_data_parallel_ranks(tmp_path):
    """Two DP ranks draw different prompts (their own orders); after each step both hold the same retired set: the
    solved prompts either rank drew so far; neither draws a prompt the other retired in an earlier step."""
    from dist_utils import run_distributed

    out = run_distributed(_retire_dp_job, 2, (str(tmp_path),))
    solved = {**out[0][1], **out[1][1]}
    drawn_before, retired_before = set(), set()
    for step in range(3):
        keys = [out[r][0][step][0] for r in (0, 1)]
        assert keys[0] != keys[1]  # each rank its own prompts
        assert not (set(keys[0]) | set(keys[1])) & retired_before, step
        drawn_before |= set(keys[0]) | set(keys[1])
        want = sorted(k for k in drawn_before if solved[k])
        assert out[0][0][step][1] == out[1][0][step][1] == want, step
        retired_before = set(want)
    assert 0 < len(retired_before) <= 4


# ------------------------------------------------------------------ data-parallel shares (ShardedSource)
def _sources(tmp_path):
    """A fresh copy of each kind of source, built the same way every time."""
    from megaprorl.data.builtin import AdditionSource

    path = write_jsonl(tmp_path / "s.jsonl", [{"domain": "math", "prompt": f"q{i}", "answer": str(i)}
                                              for i in range(7)])
    return {
        "jsonl": lambda: JsonlSource(path, seed=3),
        "reasoning_gym": lambda: ReasoningGymSource("leg_counting", size=9, seed=2),
        "builtin": lambda: AdditionSource(seed=5),
    }


@pytest.mark.parametrize("kind", ["jsonl", "reasoning_gym", "builtin"])
def test_sources_are_sequences_and_ranks_draw_disjoint_shares(tmp_path, kind):
    """Each source is a sequence (draws of 3 then 5 = one draw of 8, across epochs), which ShardedSource needs:
    three ranks drawing different amounts (as dynamic sampling makes them) each get the records at their own
    positions of it, so no record is drawn by two ranks; a state saved by one rank loads on another world."""
    from megaprorl.data.sources import ShardedSource

    make = _sources(tmp_path)[kind]
    a = make()
    assert a.sample(3) + a.sample(5) + a.sample(12) == make().sample(20)
    seq = [r["id"] for r in make().sample(3 * 40)]
    shares = {r: ShardedSource(make(), r, 3) for r in range(3)}
    drawn = {r: [] for r in range(3)}
    for counts in ([2, 5, 1], [4, 0, 3], [1, 1, 6]):
        for r, n in enumerate(counts):
            drawn[r] += [x["id"] for x in shares[r].sample(n)]
    for r in range(3):
        assert drawn[r] == seq[r::3][:len(drawn[r])]
    if kind != "builtin":  # within an epoch no row is drawn twice (the addition stream repeats by chance)
        first = [x["id"] for r in range(3) for x in ShardedSource(make(), r, 3).sample(2)]
        assert len(set(first)) == 6
    # resumed at another world size: every rank starts from one rank's position, each at its own offset
    state = shares[2].state_dict()
    pos = 3 * (1 + 3 + 6)  # rank 2 drew 10 records: 30 positions of the sequence
    again = {r: ShardedSource(make(), r, 2) for r in range(2)}
    for r in range(2):
        again[r].load_state_dict(state)
        assert [x["id"] for x in again[r].sample(4)] == seq[pos + r: pos + 8: 2]
    with pytest.raises(ValueError, match="rank 3 of 3"):
        ShardedSource(make(), 3, 3)


def test_build_source_shards_each_source_of_a_mixture(tmp_path):
    from megaprorl.data.sources import ShardedSource

    path = write_jsonl(tmp_path / "s.jsonl", [{"domain": "math", "prompt": f"q{i}", "answer": str(i)}
                                              for i in range(6)])
    one = build_source([{"name": "m", "type": "jsonl", "path": path}], seed=1, shard=(1, 2))
    assert isinstance(one, ShardedSource) and (one.rank, one.world) == (1, 2)
    assert not isinstance(build_source([{"name": "m", "type": "jsonl", "path": path}], shard=(0, 1)), ShardedSource)
    mix = build_source([{"name": "a", "type": "jsonl", "path": path}, {"name": "b", "type": "builtin"}], seed=1,
                       shard=(0, 2))
    assert isinstance(mix, MixtureSource) and all(isinstance(s, ShardedSource) for s in mix.sources.values())
