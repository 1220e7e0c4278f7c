"""One TensorBoard run per run directory (``<run>/tensorboard``).

Every Trainer of a run (one per task for training, one per evaluation) shares this logger,
so ``tensorboard --logdir results/runs`` shows one line per run. The step is global across
tasks (task t's training starts where task t-1's ended); tags are namespaced by task:

    train/task3/loss                 the method's training terms, per step
    eval/after_task3/<task>          row 3 of the accuracy matrix (row 0: untrained)
    eval/avg_seen_tasks, eval/avg_all_tasks   one point per row, at the row's global step
    accuracy_matrix                  the heatmap of the rows so far, as an image

When the run finishes, the method's settings and the final metrics go to TensorBoard's
HParams view (``final/<metric>``), so runs can be compared there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from .rundir import TENSORBOARD


class RunLogger(TensorBoardLogger):
    """A TensorBoardLogger writing into ``<out>/tensorboard`` with a step offset: the
    global step at which the current Trainer's step 0 lies."""

    def __init__(self, out: Path):
        super().__init__(save_dir=str(out), name=TENSORBOARD, version="", default_hp_metric=False)
        self.step_offset = 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else int(step) + self.step_offset)

    @rank_zero_only
    def log_row(self, rows: Sequence[Sequence[float]], task_names: Sequence[str], step: int) -> None:
        """Row ``len(rows) - 1`` of the accuracy matrix, its averages and the heatmap."""
        from .plots import heatmap_figure

        row_idx = len(rows) - 1
        row = rows[-1]
        exp = self.experiment
        for name, v in zip(task_names, row):
            exp.add_scalar(f"eval/after_task{row_idx}/{name}", v, step)
        seen = row[:row_idx] if row_idx else row
        exp.add_scalar("eval/avg_seen_tasks", sum(seen) / len(seen), step)
        exp.add_scalar("eval/avg_all_tasks", sum(row) / len(row), step)
        exp.add_figure("accuracy_matrix", heatmap_figure(rows, task_names), step)
        exp.flush()

    @rank_zero_only
    def log_final(self, settings: dict[str, Any], metrics: dict[str, float]) -> None:
        """The HParams view: the run's settings and its final metrics (``final/<name>``,
        written at step 0 by ``log_hyperparams``)."""
        self.step_offset = 0
        final = {f"final/{k}": float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log_hyperparams(settings, final)
        self.experiment.flush()
        self.save()  # hparams.yaml
