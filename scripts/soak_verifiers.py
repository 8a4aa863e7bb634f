"""Soak-test verifier: scores an addition answer by running a program in the code sandbox each time."""
from megaprorl.rewards import register_verifier
from megaprorl.rewards.sandbox import run_tests


def verify(record, response, cfg):
    text = response.strip().replace("\n", " ")[:64]
    res = run_tests("print(input().strip())", [{"kind": "stdio", "input": text + "\n", "output": str(record["answer"])}],
                    timeout_s=cfg.code_timeout_s, memory_mb=cfg.code_memory_mb, max_procs=cfg.code_max_procs,
                    max_output_kb=cfg.code_max_output_kb, tmp_mb=cfg.code_tmp_mb, python=cfg.code_python,
                    site=cfg.code_python_site, sandbox=cfg.sandbox, allow_unsandboxed=cfg.allow_unsandboxed,
                    hide_paths=cfg.sandbox_hide_paths, seccomp=cfg.sandbox_seccomp)
    ok = bool(res["results"] and res["results"][0].get("passed"))
    return (1.0 if ok else 0.0), {"backend": res["backend"]}


register_verifier("soak_code", verify)
