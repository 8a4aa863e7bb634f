"""Code verifier: test formats, wrong output, exceptions, timeouts, reward hacking attempts."""

import pytest

from megaprorl.rewards import RewardConfig, score_one
from megaprorl.rewards import sandbox as sb
from megaprorl.rewards.code import build_tests, extract_code

CFG = RewardConfig(code_timeout_s=2.0)
STDIO = {"domain": "code", "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"},
                                     {"input": "0 0", "output": "0\n"}]}


def py(code):
    return f"Here you go:\n```python\n{code}\n```\n"


def test_correct_stdio():
    res = score_one(STDIO, py("a, b = map(int, input().split())\nprint(a + b)"), CFG)
    assert res.error is None and res.reward == 1.0, res
    assert res.parts["passed"] == 3


def test_partial_and_wrong_output():
    res = score_one(STDIO, py("a, b = map(int, input().split())\nprint(a + b if a else 99)"), CFG)
    assert res.reward == pytest.approx(2 / 3)
    res = score_one(STDIO, py("print('hello')"), CFG)
    assert res.reward == 0.0 and res.parts["statuses"] == ["wrong"] * 3


def test_exception():
    res = score_one(STDIO, py("raise ValueError('boom')"), CFG)
    assert res.reward == 0.0 and set(res.parts["statuses"]) == {"error"}
    assert "boom" in res.parts["stderr"]
    res = score_one(STDIO, py("def f(:\n  pass"), CFG)
    assert res.reward == 0.0 and "SyntaxError" in res.parts["stderr"]


def test_timeout_is_bounded():
    import time
    t = time.time()
    res = score_one(STDIO, py("while True:\n    pass"), CFG)
    assert res.reward == 0.0 and "timeout" in res.parts["statuses"]
    assert time.time() - t < CFG.code_timeout_s + 3


def test_float_tolerance_and_whitespace():
    rec = {"domain": "code", "tests": [{"input": "", "output": "0.333333\n  1 2  \n\n"}]}
    assert score_one(rec, py("print(1/3)\nprint('1   2')"), CFG).reward == 1.0


def test_no_code_block():
    res = score_one(STDIO, "a, b = map(int, input().split())", CFG)
    assert res.reward == 0.0 and res.parts.get("no_code")
    assert extract_code("```py\nx=1\n```\n```python\ny=2\n```") == "y=2\n"


def test_functional_formats():
    taco = {"domain": "code", "tests": {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]}}
    assert score_one(taco, py("def add(a, b):\n    return a + b"), CFG).reward == 1.0
    lcb = {"domain": "code", "metadata": {"func_name": "twoSum"},
           "tests": [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"},
                     {"input": "[3, 3]\n6", "output": "[0, 1]", "testtype": "functional"}]}
    sol = ("class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
           "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
           "                return (seen[target - x], i)\n            seen[x] = i\n")
    assert score_one(lcb, py(sol), CFG).reward == 1.0
    calls = {"domain": "code", "tests": [{"fn_name": "sq", "args": [3], "expected": 9},
                                         {"fn_name": "sq", "args": [1.5], "expected": 2.25}]}
    assert score_one(calls, py("def sq(x):\n    return x * x"), CFG).reward == 1.0
    assert score_one(calls, py("def sq(x):\n    return 9"), CFG).reward == 0.5
    assert score_one(calls, py("def other(x):\n    return 9"), CFG).reward == 0.0


def test_assert_tests_and_exit_hack():
    rec = {"domain": "code", "test_list": ["assert f(1) == 2", "assert f(5) == 6"], "test_setup": "import math"}
    assert score_one(rec, py("def f(x):\n    return x + 1"), CFG).reward == 1.0
    # exiting early with status 0 must not count as passing
    assert score_one(rec, py("import sys\ndef f(x):\n    return 0\nsys.exit(0)"), CFG).reward == 0.0
    assert score_one(rec, py("import os\nos._exit(0)"), CFG).reward == 0.0
    # printing what looks like a pass marker does not help either
    assert score_one(rec, py("print('PASSED')\ndef f(x):\n    return 0"), CFG).reward == 0.0


def test_program_cannot_see_expected_output():
    rec = {"domain": "code", "tests": [{"input": "", "output": "SECRET-EXPECTED-7781"}]}
    prog = ("import os\nfound = []\nfor root, dirs, files in os.walk('/'):\n"
            "    if root.startswith(('/proc', '/sys')):\n        continue\n"
            "    for f in files:\n        try:\n            p = os.path.join(root, f)\n"
            "            if os.path.getsize(p) < 100000 and b'SECRET-EXPECTED' in open(p, 'rb').read():\n"
            "                found.append(p)\n        except Exception:\n            pass\n"
            "print(open(found[0]).read() if found else 'nothing')")
    res = score_one(rec, py(prog), RewardConfig(code_timeout_s=3.0))
    assert res.reward == 0.0


def test_malformed_records():
    assert score_one({"domain": "code"}, py("print(1)"), CFG).error
    assert score_one({"domain": "code", "tests": {"inputs": [1], "outputs": []}}, py("print(1)"), CFG).error
    assert score_one({"domain": "code", "tests": "not json"}, py("print(1)"), CFG).error
    assert score_one({"domain": "code", "tests": [{"foo": 1}]}, py("print(1)"), CFG).error
    with pytest.raises(KeyError):
        build_tests({"tests": [{"args": [1], "expected": 1}]})  # no fn_name


def test_refuses_without_sandbox_unless_allowed(monkeypatch):
    monkeypatch.setattr(sb, "_probe", lambda backend, python: (False, f"{backend}: isolation disabled for test"))
    res = score_one(STDIO, py("a, b = map(int, input().split())\nprint(a + b)"), CFG)
    assert res.reward == 0.0
    assert "no code sandbox available" in res.error and "allow_unsandboxed" in res.error
    res = score_one(STDIO, py("a, b = map(int, input().split())\nprint(a + b)"),
                    RewardConfig(code_timeout_s=2.0, sandbox="none"))
    assert res.reward == 0.0 and "allow_unsandboxed" in res.error
    allowed = RewardConfig(code_timeout_s=2.0, allow_unsandboxed=True)
    res = score_one(STDIO, py("a, b = map(int, input().split())\nprint(a + b)"), allowed)
    assert res.error is None and res.reward == 1.0 and res.parts["backend"] == "none"
    res = score_one(STDIO, py("while True:\n    pass"), allowed)
    assert res.reward == 0.0
