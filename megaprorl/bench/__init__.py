"""Benchmarks: each prints a table and writes its report as JSON."""

import json


def write_report(report, path: str) -> None:
    """The report as JSON at ``path``, and a line saying where."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
