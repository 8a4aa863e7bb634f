"""Soak-test verifier: scores an addition answer by running a program in the code sandbox each time."""
from megaprorl.rewards import register_verifier
from megaprorl.rewards.code import run_tests_as_configured


def verify(record, response, cfg):
    text = response.strip().replace("\n", " ")[:64]
    res = run_tests_as_configured("print(input().strip())",
                                  [{"kind": "stdio", "input": text + "\n", "output": str(record["answer"])}],
                                  cfg, cfg.code_timeout_s)
    ok = bool(res["results"] and res["results"][0].get("passed"))
    return (1.0 if ok else 0.0), {"backend": res["backend"]}


register_verifier("soak_code", verify)
