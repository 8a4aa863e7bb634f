"""The run directory: metrics as JSONL and TensorBoard events (and Weights & Biases when asked), a progress bar,
and PNG plots."""

from __future__ import annotations

import json
import math
import os
import secrets
from typing import Dict, List, Optional


TB_PENDING_MAX = 1000  # steps a failing TensorBoard writer's successor is given at most


class RunLogger:
    """Writes ``metrics.jsonl`` (one JSON object per RL step), TensorBoard scalars and, with ``wandb_project``,
    the same scalars to a Weights & Biases run; rank 0 only.

    The W&B run's id is kept in ``RUN_DIR/wandb_run_id``, so a resumed run goes on logging into the same W&B
    run (``resume="allow"``).  A run resumed from an older checkpoint logs the steps after it again, with the
    same values (tests/test_resume_exact.py): ``metrics.jsonl`` and TensorBoard are cut back first, while W&B
    takes only increasing steps and keeps what it has for those.  ``WANDB_MODE=offline`` on machines without
    internet (``wandb sync`` later).

    A write that fails (a full or vanished file system, a dead TensorBoard writer thread) never stops the run:
    it is reported once per spell of failures, with the file and the error, and counted (``log/write_errors``,
    from the first failure on); the metrics records not yet on disk are kept and written, in order, at the next
    step that can; TensorBoard gets a new writer (a new event file in ``tb/``) that is given the steps the dead
    one lost; W&B keeps its own queue.  Records still unwritten when the logger closes are printed to stdout
    as ``metrics (unwritten): {...}`` lines, so the job's log holds them."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True, progress: bool = True,
                 total_steps: int = 0, initial_step: int = 0, resume: bool = False, wandb_project: str = "",
                 run_name: str = "", config: Optional[Dict] = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb = None
        self._tb_on = False  # TensorBoard asked for and importable: self._tb is its writer, None until (re)made
        self._bar = None
        self._wb = None
        self._tb_dir = os.path.join(run_dir, "tb")
        self._pending: List[str] = []  # metrics lines not yet on disk, oldest first
        self._tb_pending: List[tuple] = []  # (step, scalars) the TensorBoard writer has not flushed
        self._good_size = 0  # metrics.jsonl's size after its last complete write
        self._failing: Dict[str, bool] = {}  # per output: in a spell of failures (reported at its start)
        self.write_errors = 0
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume and os.path.exists(self.path):
            _truncate_after(self.path, initial_step)
        elif not resume and os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(self._tb_dir, purge_step=initial_step + 1 if resume else None)
                self._tb_on = True
            except ImportError:  # tensorboard is a dependency; keep going without it if it is broken
                self._tb = None
        if wandb_project:
            self._wb = _wandb_run(run_dir, wandb_project, run_name, config, resume)
        if progress and total_steps:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="RL", unit="step", dynamic_ncols=True)
        if os.path.exists(self.path):
            self._good_size = os.path.getsize(self.path)

    def log(self, step: int, metrics: Dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.write_errors:
            rec["log/write_errors"] = self.write_errors
        self._pending.append(json.dumps(rec, sort_keys=True) + "\n")
        self._flush_metrics()
        scalars = {k: v for k, v in rec.items()
                   if isinstance(v, (int, float)) and k != "step" and math.isfinite(float(v))}
        if self._tb_on:
            # (metrics.jsonl is the record; TensorBoard, a view of it, is given back at most the last steps)
            self._tb_pending = self._tb_pending[-(TB_PENDING_MAX - 1):] + [(step, scalars)]
            self._flush_tb()
        if self._wb is not None:
            try:
                self._wb.log(scalars, step=step)
                self._recovered("wandb", "W&B logging works again")
            except Exception as e:  # noqa: BLE001 - W&B's failures are its own; the run goes on
                self.failed("wandb", f"W&B: cannot log step {step} ({type(e).__name__}: {e})")
        if self._bar is not None and step > 0:
            self._bar.update(1)
            post = {}
            for k in ("reward", "accuracy", "entropy", "step_time_s"):
                if k in rec and isinstance(rec[k], (int, float)):
                    post[k] = f"{rec[k]:.3g}"
            self._bar.set_postfix(post)

    def log_final(self, step: int, metrics: Dict) -> None:
        """The final evaluation's record (``final_eval``), to ``metrics.jsonl`` only; also after :meth:`close`."""
        if not self.enabled:
            return
        self._pending.append(json.dumps({"step": step, **metrics, "final_eval": 1}, default=str) + "\n")
        self._flush_metrics()
        self._print_unwritten()

    def _flush_metrics(self) -> None:
        """Append the pending records to metrics.jsonl, cutting back first what a failed write left half done."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            if os.path.exists(self.path) and os.path.getsize(self.path) > self._good_size:
                os.truncate(self.path, self._good_size)
            with open(self.path, "a") as f:
                f.writelines(self._pending)
                f.flush()
                os.fsync(f.fileno())
            self._good_size = os.path.getsize(self.path)
        except OSError as e:
            self.failed("metrics", f"metrics: cannot write {self.path} ({e}): {len(self._pending)} record(s) kept "
                                    "in memory, written at the next step that can; the run goes on")
            return
        if self._failing.get("metrics"):
            self._recovered("metrics", f"metrics: {self.path} written again, with the {len(self._pending)} "
                                       "record(s) held since the failure")
        self._pending = []

    def _flush_tb(self) -> None:
        try:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(self._tb_dir)
            for step, scalars in self._tb_pending:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        except Exception as e:  # noqa: BLE001 - its writer thread re-raises what killed it (an OSError mostly)
            self.failed("tensorboard", f"TensorBoard: cannot write {self._tb_dir} ({type(e).__name__}: {e}): a new "
                                        "writer is tried at the next step, given the steps this one lost")
            self._close_tb()
            return
        self._recovered("tensorboard", f"TensorBoard: writing to {self._tb_dir} again (a new event file)")
        self._tb_pending = []

    def _close_tb(self) -> None:
        try:
            if self._tb is not None:
                self._tb.close()
        except Exception:  # noqa: BLE001 - a writer whose thread died raises its error again on close
            # and let that thread finish dying (Python prints its traceback) before anything else is logged
            worker = getattr(getattr(getattr(getattr(self._tb, "file_writer", None), "event_writer", None),
                                     "_async_writer", None), "_worker", None)  # (tensorboard's internals)
            if worker is not None:
                worker.join(timeout=5)
        self._tb = None

    def failed(self, what: Optional[str], msg: str) -> None:
        """A write that failed: counted (``log/write_errors``) and said at the start of ``what``'s spell of failures
        (every time for ``what`` None: a file written once)."""
        self.write_errors += 1
        if what is None or not self._failing.get(what):
            if what is not None:
                self._failing[what] = True
            self.write(msg)

    def _recovered(self, what: str, msg: str) -> None:
        if self._failing.pop(what, False):
            self.write(msg)

    def _print_unwritten(self) -> None:
        for line in self._pending:
            print("metrics (unwritten): " + line, end="", flush=True)
        self._pending = []

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._pending:
            self._flush_metrics()
        if self._tb_on:
            if self._tb_pending:
                self._flush_tb()
            self._close_tb()
            self._tb_on = False
        self._print_unwritten()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wb is not None:
            import wandb

            self._wb.finish()
            # finish() returns before W&B's service process has written the run's record file (offline, 1 close
            # in 10 here left only its 7-byte header on disk); teardown waits for the service, so the record is
            # complete when close() returns, for `wandb sync` or a requeued job that starts right away
            wandb.teardown()
            self._wb = None


def _wandb_run(run_dir: str, project: str, name: str, config: Optional[Dict], resume: bool):
    from .config import require_wandb

    require_wandb()
    import wandb

    id_path = os.path.join(run_dir, "wandb_run_id")
    run_id = None
    if resume and os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip() or None
    if run_id is None:
        run_id = secrets.token_hex(8)  # W&B ids: letters and digits
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    return wandb.init(project=project, name=name or None, id=run_id, resume="allow", dir=run_dir, config=config)


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v


def _truncate_after(path: str, step: int) -> None:
    """Keep the JSONL records up to and including ``step``: a run resumed from the checkpoint of
    ``step`` logs what follows again (the same values, see tests/test_resume_exact.py), so the file
    holds each step once.  The final-evaluation record goes too: the resumed run writes it again."""
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
            if rec.get("step", 0) <= step and not rec.get("final_eval"):
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def read_metrics(run_dir: str) -> List[Dict]:
    """The run's records; a last line without its newline (being written by a live run, or torn by a kill) is
    left out, any other malformed line is an error naming it."""
    path = os.path.join(run_dir, "metrics.jsonl")
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # only the last line can lack it
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
    return out


EVAL_SETS_PANEL = "eval sets"  # a panel of its own when a run has eval.sets


def _is_set_accuracy(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "eval" and parts[2] == "accuracy"


PLOT_KEYS = [("reward", "reward (verifier)"), ("entropy", "entropy"), ("kl_ref", "KL to reference"),
             ("response_length", "response length (tokens)")]


def plot_run(run_dir, out_path: Optional[str] = None, keys=None, labels=None) -> str:
    """Draw the curves of one run (or overlay several: ``run_dir`` a list) to PNG; returns the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = [run_dir] if isinstance(run_dir, str) else list(run_dir)
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in dirs]
    runs = [read_metrics(d) for d in dirs]
    sets = sorted({k.split("/")[1] for recs in runs for r in recs for k in r if _is_set_accuracy(k)})
    keys = list(keys or PLOT_KEYS) + ([(EVAL_SETS_PANEL, "evaluation sets (pass@1, else greedy)")] if sets else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for d, label, recs in zip(dirs, labels, runs):
        if sets:
            ax = axes[[k for k, _ in keys].index(EVAL_SETS_PANEL)]
            for name in sets:
                pts = [(r["step"], r.get(f"eval/{name}/pass@1", r.get(f"eval/{name}/accuracy"))) for r in recs
                       if f"eval/{name}/accuracy" in r]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1,
                            label=name + (f" ({label})" if len(dirs) > 1 else ""))
        for ax, (k, title) in zip(axes, keys):
            pts = [(r["step"], r[k]) for r in recs if isinstance(r.get(k), (int, float))]
            line = None
            if pts:
                (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2,
                                  label=label if len(dirs) > 1 else None)
            evals = [(r["step"], r["eval/accuracy"]) for r in recs if "eval/accuracy" in r] if k == "reward" else []
            if evals:
                ax.plot([p[0] for p in evals], [p[1] for p in evals], "o--",
                        color=line.get_color() if line is not None else None,
                        label="held-out accuracy" + (f" ({label})" if len(dirs) > 1 else ""))
            if len(dirs) == 1:
                for r in recs:
                    if r.get("reference_reset"):
                        ax.axvline(r["step"], color="grey", ls=":", lw=1)
            ax.set_title(title)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if sets:
        axes[-1].legend(fontsize=7)
    fig.tight_layout()
    out_path = out_path or os.path.join(dirs[0], "curves.png")
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
