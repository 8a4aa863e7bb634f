"""Launchers: SLURM sbatch generation and submission (``megaprorl launch slurm``), torchrun glue and
preemption/requeue signals.  See docs/slurm.md."""

from .slurm import build_script, main, parse_args

__all__ = ["build_script", "main", "parse_args"]
