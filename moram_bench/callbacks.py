"""The accuracy-matrix callback: per-task score sums during ``trainer.test``.

Each test batch of dataloader ``j`` (task j) returns per-sample scores on 0..100 from the
method's ``test_step``. ``TaskScores`` (a torchmetrics Metric with sum-reduced states)
accumulates their sum and count per task; ``compute()`` all-reduces the states across DDP
ranks before dividing, so every sample counts exactly once whatever the number of
processes (macro average over tasks, micro within a task).
"""
from __future__ import annotations

import torch
import lightning.pytorch as pl
from torchmetrics import Metric


class TaskScores(Metric):
    full_state_update = False

    def __init__(self, num_tasks: int):
        super().__init__()
        self.num_tasks = num_tasks
        self.add_state("score_sum", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, task: int, scores: torch.Tensor) -> None:
        scores = scores.detach().to(torch.float64).reshape(-1)
        self.score_sum[task] += scores.sum().to(self.score_sum.device)
        self.count[task] += scores.numel()

    def compute(self) -> torch.Tensor:
        """(2, T): mean score per task and the number of samples scored (global)."""
        if bool((self.count == 0).any()):
            empty = (self.count == 0).nonzero().flatten().tolist()
            raise RuntimeError(f"no test samples were scored for task(s) {empty}")
        return torch.stack([self.score_sum / self.count, self.count])


class AccuracyMatrixCallback(pl.Callback):
    """Collects one row of the accuracy matrix per ``trainer.test`` call (``self.row``)."""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.metric = TaskScores(num_tasks)
        self.row: list[float] | None = None
        self.counts: list[int] | None = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.metric = self.metric.to(pl_module.device)
        self.metric.reset()
        self.row = None

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None:
            raise RuntimeError(f"{type(pl_module).__name__}.test_step must return per-sample scores")
        self.metric.update(dataloader_idx, outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        means, counts = self.metric.compute().cpu()  # synchronised across ranks
        self.row = [float(v) for v in means]
        self.counts = [int(c) for c in counts]


class TaskProgressBar(pl.callbacks.TQDMProgressBar):
    """Lightning's tqdm bar labelled with what the runner is doing ("task 2/5 train
    digits", "evaluate after task 2") instead of "Epoch 0" (each task is one open-ended
    epoch bounded by ``max_steps``), and without the logger's version number."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.label)

    def init_test_tqdm(self):
        bar = super().init_test_tqdm()
        bar.set_description(self.label)
        return bar

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        # one test loader per task: "evaluate all 5 tasks (task 2)", not "Testing DataLoader 1"
        self.test_progress_bar.set_description(f"{self.label} (task {dataloader_idx + 1})")

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        # "train/task2/loss" -> "loss": the bar already names the task
        return {k.rsplit("/", 1)[-1]: v for k, v in metrics.items()}
