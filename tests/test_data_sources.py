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
