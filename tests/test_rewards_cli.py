"""`megaprorl score` offline scoring."""

import json

from megaprorl.rewards.cli import main


def test_score_file(tmp_path, capsys):
    rows = [
        {"domain": "math", "answer": "2", "response": "\\boxed{2}"},
        {"domain": "stem", "answer": "B", "response": "The answer is C"},
        {"domain": "ifeval", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "response": "a b"},
        {"domain": "code", "tests": [{"input": "", "output": "1"}], "response": "```python\nprint(1)\n```"},
        {"domain": "nope", "response": "x"},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["score", "--input", str(inp), "--output", str(out), "--workers", "1"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["reward"] for g in got] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert got[0]["reward_error"] is None and "extracted" in got[0]["reward_parts"]
    assert "nope" in got[4]["reward_error"]
    assert got[1]["response"] == "The answer is C"
    err = capsys.readouterr().err
    assert "scored 5 responses" in err


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"domain": "math", "answer": "1", "response": "1"}\n{not json\n')
    assert main(["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--workers", "0"]) == 2
    assert f"{inp}:2" in capsys.readouterr().err
    inp.write_text('{"domain": "math", "answer": "1"}\n')
    assert main(["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--workers", "0"]) == 2
    assert "response" in capsys.readouterr().err
    inp.write_text('{"domain": "math", "answer": "1", "response": "1"}\n{"record": {"domain": "math"}, "response": "1"}\n')
    assert main(["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--workers", "0"]) == 2
    assert f"error: {inp}:2: no 'domain'" in capsys.readouterr().err


def test_bench_rewards_smoke(tmp_path, capsys):
    from megaprorl.bench.rewards import main as bench_main

    out = tmp_path / "b.json"
    assert bench_main(["rewards", "--n", "8", "--domains", "stem,ifeval", "--workers", "1", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["domain"] for r in data["results"]] == ["stem", "ifeval"]
    assert all(r["responses_per_s"] > 0 and r["errors"] == 0 for r in data["results"])
    assert "resp/s" in capsys.readouterr().out
