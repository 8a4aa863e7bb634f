"""megaprorl command line: train | eval | score | bench | launch | convert | plot."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

USAGE = """megaprorl COMMAND ...

  train CONFIG [key=value ...]          run ProRL (torchrun for several processes)
  eval CONFIG [key=value ...]           evaluate a policy (checkpoint.resume=PATH|auto) at eval settings
  score --input IN.jsonl --output OUT.jsonl   score responses offline with the verifiers
  bench kernels|decode-attention|rewards|step [...]  benchmarks (table on screen, JSON on disk)
  launch slurm CONFIG --nodes N --gpus-per-node G [--dry-run]
  convert ...                           HF <-> Megatron weights
  plot RUN_DIR                          draw the run's curves to RUN_DIR/curves.png
  status RUN_DIR [--json]               where a run stands: step, pace, checkpoint, evaluations, warnings
"""


def _split_overrides(rest: List[str]):
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    flags = [a for a in rest if a not in overrides]
    return overrides, flags


def cmd_train(argv: List[str]) -> int:
    from .config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="megaprorl train", description="Run ProRL training.")
    p.add_argument("config", help="YAML config (see examples/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=10")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint directory (= checkpoint.resume)")
    args = p.parse_intermixed_args(argv)  # overrides before or after the options
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .data.sources import DataError
    from .checkpoint import CheckpointWriteError
    from .trainer import NonFiniteError, train

    try:
        summary = train(cfg)
    except (ConfigError, DataError) as e:  # found once the files it names were read (model.hf_path, data, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointWriteError) as e:  # (the final checkpoint: the run's last words)
        print(f"error: {e}", file=sys.stderr)
        return 1
    return int(summary.get("exit_code", 0))


def cmd_eval(argv: List[str]) -> int:
    from .config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="megaprorl eval", description="Evaluate a policy on each evaluation set: greedy "
                                "accuracy, pass@1 over k samples and unbiased pass@k, per domain.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--output", default="", help="write the metrics as JSON here")
    p.add_argument("--per-prompt", default="", metavar="FILE",
                   help="write one JSON line per prompt here: its set, id, domain, greedy reward and length, the "
                        "sampled rewards and pass rate (eval.write_responses adds the greedy response)")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import json

    from .data.sources import DataError
    from .trainer import Trainer

    try:
        t = Trainer(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        path = t._resume_path()
        if path:
            t.load_checkpoint(path)
        elif cfg.warmstart.steps:
            t.warmstart()
        res = t.evaluate()
    except (ConfigError, DataError) as e:  # the checkpoint named (checkpoint.resume), an evaluation set's file
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        t.close()
    if t.is_main:
        for k, v in sorted(res.items()):
            print(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")
        if args.output:
            with open(args.output, "w") as f:
                json.dump(res, f, indent=2)
        if args.per_prompt:
            from .evaluation import write_rows

            write_rows(args.per_prompt, t.eval_rows)
    return 0


def cmd_plot(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="megaprorl plot", description="Draw a run's curves; several runs are overlaid.")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="")
    p.add_argument("--labels", nargs="*", default=None)
    args = p.parse_args(argv)
    from .runlog import plot_run

    try:
        print(plot_run(args.run_dirs if len(args.run_dirs) > 1 else args.run_dirs[0], args.out or None,
                       labels=args.labels))
    except (OSError, ValueError) as e:  # no metrics.jsonl there, a malformed line (named with its number)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_status(argv: List[str]) -> int:
    from .status import main as status_main

    return status_main(argv)


def cmd_bench(argv: List[str]) -> int:
    if not argv or argv[0] not in ("kernels", "decode-attention", "rewards", "step"):
        print("usage: megaprorl bench kernels|decode-attention|rewards|step [...]", file=sys.stderr)
        return 2
    which, rest = argv[0], argv[1:]
    if which == "kernels":
        from .bench.kernels import main
    elif which == "decode-attention":
        from .bench.decode_attention import main
    elif which == "rewards":
        from .bench.rewards import main
    else:
        from .bench.step import main
    return int(main(rest) or 0)


def cmd_score(argv: List[str]) -> int:
    from .rewards.cli import main

    return int(main(argv) or 0)


def cmd_launch(argv: List[str]) -> int:
    if not argv or argv[0] != "slurm":
        print("usage: megaprorl launch slurm CONFIG --nodes N --gpus-per-node G [--dry-run]", file=sys.stderr)
        return 2
    from .launch.slurm import main

    return int(main(argv[1:]) or 0)


def cmd_convert(argv: List[str]) -> int:
    from .models.convert import main

    return int(main(argv) or 0)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "bench": cmd_bench, "score": cmd_score,
            "launch": cmd_launch, "convert": cmd_convert, "status": cmd_status}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        print(f"error: unknown command {cmd!r}" + (f"; did you mean {near[0]!r}?" if near else ""), file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    return COMMANDS[cmd](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
