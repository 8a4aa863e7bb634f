"""Code verifier: the response's last Python code block run against the record's tests in the
sandbox (:mod:`megaprorl.rewards.sandbox`); reward = fraction of tests passed.

Test formats accepted in a record (see docs/data.md):

- ``"tests": [{"input": "1 2\\n", "output": "3\\n"}, ...]`` stdin/stdout pairs; an item with
  ``"testtype": "functional"`` (LiveCodeBench) has one JSON value per line of ``input`` (the
  arguments) and a JSON ``output``, and calls ``fn_name`` (record ``fn_name`` or
  ``metadata.func_name``), a plain function or a method of ``class Solution``;
- ``"tests": {"inputs": [...], "outputs": [...], "fn_name": optional}`` (APPS/TACO
  ``input_output``; with ``fn_name`` each input is the argument list and each output the value,
  TACO wraps it in a one-element list which is unwrapped when needed);
- ``"tests": [{"fn_name": "f", "args": [...], "expected": ...}]`` function calls;
- ``"test_list": ["assert f(1) == 2", ...]`` assertions (MBPP/HumanEval style), with optional
  ``"test_setup"`` code run before each.

Optional ``time_limit_s`` overrides ``RewardConfig.code_timeout_s`` (all tests together).
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Tuple

from .base import RewardConfig, register_verifier
from .sandbox import run_tests

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+\-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> Optional[str]:
    """The last fenced code block tagged python/py (or untagged); None if there is none."""
    blocks = _FENCE_RE.findall(response)
    py = [b for lang, b in blocks if lang.lower() in ("python", "py", "python3")]
    if py:
        return py[-1]
    plain = [b for lang, b in blocks if lang == ""]
    if plain:
        return plain[-1]
    return None


def _as_str(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, list):
        return "\n".join(_as_str(v) for v in x)
    return json.dumps(x)


def build_tests(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Normalise the record's tests into harness test dicts."""
    fn_name = record.get("fn_name") or (record.get("metadata") or {}).get("func_name")
    tests: List[Dict[str, Any]] = []
    if record.get("test_list"):
        setup = record.get("test_setup") or ""
        for a in record["test_list"]:
            if not isinstance(a, str):
                raise TypeError("code record 'test_list' must hold strings")
            tests.append({"kind": "assert", "code": (setup + "\n" + a) if setup else a})
    raw = record.get("tests", record.get("input_output"))
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"code record 'tests' is a string but not JSON: {e}") from None
    if isinstance(raw, dict):
        ins, outs = raw.get("inputs"), raw.get("outputs")
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            raise ValueError("code record 'tests' needs 'inputs' and 'outputs' lists of equal length")
        fn = raw.get("fn_name") or fn_name
        for i, o in zip(ins, outs):
            if fn:
                args = i if isinstance(i, list) else [i]
                tests.append({"kind": "call", "fn_name": fn, "args": args, "expected": o,
                              "expected_alt": o[0] if isinstance(o, list) and len(o) == 1 else None})
            else:
                tests.append({"kind": "stdio", "input": _as_str(i), "output": _as_str(o)})
    elif isinstance(raw, list):
        for t in raw:
            if not isinstance(t, dict):
                raise TypeError("code record 'tests' items must be objects")
            if "args" in t or "expected" in t:
                fn = t.get("fn_name") or fn_name
                if not fn:
                    raise KeyError("function-call test without 'fn_name'")
                tests.append({"kind": "call", "fn_name": fn, "args": list(t.get("args", [])),
                              "kwargs": dict(t.get("kwargs", {})), "expected": t.get("expected")})
            elif t.get("testtype") == "functional":
                if not fn_name:
                    raise KeyError("functional test without 'fn_name' (or metadata.func_name)")
                args = [json.loads(line) for line in str(t["input"]).split("\n") if line.strip()]
                tests.append({"kind": "call", "fn_name": fn_name, "args": args,
                              "expected": json.loads(t["output"])})
            elif "input" in t and "output" in t:
                tests.append({"kind": "stdio", "input": _as_str(t["input"]), "output": _as_str(t["output"])})
            else:
                raise KeyError(f"code test item has neither input/output nor args/expected: {sorted(t)}")
    elif raw is not None:
        raise TypeError("code record 'tests' must be a list or an object")
    if not tests:
        raise KeyError("code record has no tests ('tests', 'input_output' or 'test_list')")
    return tests


def run_tests_as_configured(program: str, tests: List[Dict[str, Any]], cfg: RewardConfig,
                            timeout_s: float) -> Dict[str, Any]:
    """``sandbox.run_tests`` with the sandbox's limits and options of ``cfg`` (the ``code_*`` and ``sandbox*``
    keys of ``rewards``), for the code verifier and any verifier that runs a program."""
    return run_tests(program, tests, timeout_s=timeout_s, memory_mb=cfg.code_memory_mb,
                     max_procs=cfg.code_max_procs, max_output_kb=cfg.code_max_output_kb,
                     tmp_mb=cfg.code_tmp_mb, python=cfg.code_python, site=cfg.code_python_site,
                     sandbox=cfg.sandbox, allow_unsandboxed=cfg.allow_unsandboxed,
                     hide_paths=cfg.sandbox_hide_paths, seccomp=cfg.sandbox_seccomp)


def verify_code(record: Dict[str, Any], response: str, cfg: RewardConfig) -> Tuple[float, Dict[str, Any]]:
    tests = build_tests(record)
    code = extract_code(response)
    parts: Dict[str, Any] = {"passed": 0, "total": len(tests)}
    if code is None or not code.strip():
        parts["no_code"] = True
        return 0.0, parts
    res = run_tests_as_configured(code, tests, cfg, float(record.get("time_limit_s") or cfg.code_timeout_s))
    results = res["results"]
    passed = 0
    statuses = []
    for r in results:
        ok = bool(r.get("passed"))
        statuses.append(r.get("status"))
        passed += ok
    parts.update(passed=passed, statuses=statuses, backend=res["backend"], wall_s=res["wall_s"],
                 seccomp=res.get("seccomp", False))
    first_err = next((r.get("stderr") for r in results if r.get("stderr")), None)
    if first_err:
        parts["stderr"] = first_err[-300:]
    if res.get("error"):
        parts["sandbox_error"] = res["error"]
    return passed / len(tests), parts


register_verifier("code", verify_code)
