"""The routing report: which task's atoms or experts does each test domain retrieve?

After the last task, for each test task ``j`` and each task ``i``, the share of routing
weight that inputs of domain ``j`` put on the atoms (MoRAM) or experts (MoE-LoRA) added
while learning task ``i``, averaged over the adapted layers (per layer: summed over all
tokens of domain ``j``'s test set, divided by that layer's total routing weight on those
tokens). The result is a ``T x T`` matrix, **row j = test domain j, column i = atoms or
experts of task i**; a strong diagonal means inputs of a domain retrieve the memory
learned on it (the paper's central claim). Rows sum to 1 unless weight lands on atoms
added after the last task (MoRAM's optional "null atoms"): that share is reported
separately as ``beyond_last_task``.

The protocol a routing adapter meets (duck-typed; ``RankOneMemory`` does):

- ``record_routing`` (bool attribute): while True, every forward call adds its routing
  weights to the adapter's statistics;
- ``reset_routing()``: zero the statistics;
- ``routing_mass_by_task() -> Tensor (n,)``: the routing weight summed over the recorded
  tokens, per task that added atoms/experts (entry ``i`` = task ``i``, 0-based, ``n`` = the
  tasks added so far);
- optionally ``routing_tokens`` and ``routing_fallback`` (scalar tensors): tokens recorded,
  and tokens for which nothing was selected (MoRAM's gate: the zero-shot fallback).

Any module inside the method that meets the protocol is found (:func:`routing_adapters`);
a method without one has no routing report (:func:`supports_routing`).

Recording runs as a Lightning callback (:class:`RoutingRecorder`) in a ``trainer.test``
pass, so it works with every strategy: each test batch is recorded on its own (statistics
reset before it, read after it) into per-(test task, layer) sums, which are summed over
DDP ranks once at the end (every test sample is seen by exactly one rank). Class-prompt
encoding at the start of an evaluation is not counted: only the test inputs' tokens are.

Files (:func:`write_routing_report`): ``routing.csv`` (header ``test_task,<task names>``,
one row per test task, 4 decimals), ``routing.png`` (``plots.routing_png``) and
``routing.json`` (the matrix, its orientation, the diagonal mean, and the per-task token
counts, fallback rates and beyond-last-task shares).
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from .results_io import atomic_write_json, atomic_write_text

__all__ = [
    "ORIENTATION",
    "is_routing_adapter",
    "routing_adapters",
    "supports_routing",
    "RoutingResult",
    "RoutingRecorder",
    "shares_from_mass",
    "routing_report",
    "routing_matrix",
    "write_routing_report",
    "read_routing_csv",
]

ORIENTATION = "rows: test task j; columns: task i whose atoms/experts took the share (0..1)"


def is_routing_adapter(module: Any) -> bool:
    """True when ``module`` meets the routing-statistics protocol (module docstring)."""
    return (hasattr(module, "record_routing") and callable(getattr(module, "reset_routing", None))
            and callable(getattr(module, "routing_mass_by_task", None)))


def routing_adapters(module: nn.Module) -> dict[str, nn.Module]:
    """Every submodule of ``module`` that meets the protocol, by qualified name (in
    ``named_modules`` order; each module once)."""
    return {name: m for name, m in module.named_modules() if is_routing_adapter(m)}


def supports_routing(module: nn.Module) -> bool:
    """Whether ``module`` (a method) has routing adapters, i.e. gets a routing report."""
    return any(True for _ in routing_adapters(module))


@dataclass
class RoutingResult:
    """What a routing pass measured.

    ``matrix`` (T, T): row j = test task j, column i = share on task i's atoms/experts;
    ``beyond_last_task`` (T,): share on atoms added after the last task; ``tokens`` (T,):
    tokens routed per test task, summed over layers; ``fallback_rate`` (T,): fraction of
    those tokens for which nothing was selected (``None`` if the adapters do not count
    it); ``layers``: the number of routing adapters.
    """

    matrix: np.ndarray
    beyond_last_task: np.ndarray
    tokens: np.ndarray
    fallback_rate: Optional[np.ndarray]
    layers: int

    def stats(self) -> dict[str, Any]:
        """The JSON-ready extras of ``routing.json``."""
        return {"layers": self.layers, "tokens_per_test_task": self.tokens.tolist(),
                "beyond_last_task": self.beyond_last_task.tolist(),
                "fallback_rate": None if self.fallback_rate is None else self.fallback_rate.tolist()}


def shares_from_mass(mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer shares averaged over layers.

    ``mass`` has shape ``(T, L, W)`` (test task, layer, task that added the atoms; ``W >= T``,
    columns past ``T - 1`` are atoms added after the last task). For each (j, layer) the
    masses are divided by their sum; layers with no routing weight for test task j are
    left out of its average (a row with none at all is NaN). Returns the ``(T, T)``
    matrix and the ``(T,)`` share beyond the last task.
    """
    T, L, W = mass.shape
    total = mass.sum(axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, mass / np.where(total > 0, total, 1.0), np.nan)
    used = (total[..., 0] > 0)  # (T, L)
    out = np.full((T, W), np.nan)
    for j in range(T):
        if used[j].any():
            out[j] = share[j, used[j]].mean(axis=0)
    beyond = out[:, T:].sum(axis=1) if W > T else np.zeros(T)
    beyond = np.where(np.isnan(out[:, 0]), np.nan, beyond)
    return out[:, :T], beyond


class RoutingRecorder(pl.Callback):
    """Records routing statistics per test dataloader (= test task) during ``trainer.test``.

    Add it to any Trainer that tests the method (an extra pass, or the final evaluation
    itself: recording does not change any output). After the test, :attr:`result` holds
    the :class:`RoutingResult` (identical on every rank).
    """

    def __init__(self, num_tasks: int):
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = int(num_tasks)
        self.result: Optional[RoutingResult] = None
        self._adapters: list[nn.Module] = []
        self._flags: list[bool] = []
        self._mass: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapters = list(routing_adapters(pl_module).values())
        if not self._adapters:
            raise RuntimeError(f"{type(pl_module).__name__} has no routing adapters (nothing meets the "
                               "record_routing / reset_routing / routing_mass_by_task protocol)")
        self._flags = [bool(a.record_routing) for a in self._adapters]
        T, L = self.num_tasks, len(self._adapters)
        self._width = T + 1  # column T: atoms added after the last task
        self._mass = torch.zeros(T, L, self._width, dtype=torch.float64)
        self._counts = torch.zeros(T, L, 2, dtype=torch.float64)  # tokens, fallback tokens
        self._has_fallback = all(hasattr(a, "routing_fallback") for a in self._adapters)
        self.result = None
        for a in self._adapters:
            a.record_routing = False

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        for a in self._adapters:
            a.reset_routing()
            a.record_routing = True

    @torch.no_grad()
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not 0 <= dataloader_idx < self.num_tasks:
            raise RuntimeError(f"test dataloader {dataloader_idx} but the recorder was built for {self.num_tasks} tasks")
        for layer, a in enumerate(self._adapters):
            a.record_routing = False
            m = a.routing_mass_by_task().detach().to("cpu", torch.float64).reshape(-1)
            n = min(len(m), self.num_tasks)
            self._mass[dataloader_idx, layer, :n] += m[:n]
            if len(m) > n:
                self._mass[dataloader_idx, layer, self.num_tasks] += m[n:].sum()
            if hasattr(a, "routing_tokens"):
                self._counts[dataloader_idx, layer, 0] += float(a.routing_tokens)
            if self._has_fallback:
                self._counts[dataloader_idx, layer, 1] += float(a.routing_fallback)
            a.reset_routing()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        packed = torch.cat([self._mass.reshape(-1), self._counts.reshape(-1)]).to(pl_module.device)
        packed = trainer.strategy.reduce(packed, reduce_op="sum").to("cpu", torch.float64)
        T, L, W = self._mass.shape
        mass = packed[: T * L * W].reshape(T, L, W).numpy()
        counts = packed[T * L * W:].reshape(T, L, 2).numpy()
        matrix, beyond = shares_from_mass(mass)
        tokens = counts[..., 0].sum(axis=1)
        fallback = None
        if self._has_fallback:
            with np.errstate(invalid="ignore", divide="ignore"):
                fallback = np.where(tokens > 0, counts[..., 1].sum(axis=1) / np.where(tokens > 0, tokens, 1), np.nan)
        self.result = RoutingResult(matrix=matrix, beyond_last_task=beyond, tokens=tokens,
                                    fallback_rate=fallback, layers=L)
        for a, flag in zip(self._adapters, self._flags):
            a.record_routing = flag
            a.reset_routing()


def _default_trainer(callbacks: list) -> pl.Trainer:
    return pl.Trainer(accelerator="auto", devices=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
                      inference_mode=True)


def routing_report(module: pl.LightningModule, datamodule: pl.LightningDataModule,
                   trainer: Optional[pl.Trainer] = None, num_tasks: Optional[int] = None) -> RoutingResult:
    """Run one extra evaluation pass over every test task with recording on.

    ``trainer``: the Trainer to test with (e.g. the runner's ``make_trainer(..., max_steps=-1)``,
    so the pass runs on the run's devices/strategy); default: a quiet single-device one.
    ``num_tasks``: default ``len(datamodule.stream)`` (or ``len(module.stream)``).
    """
    if num_tasks is None:
        stream = getattr(datamodule, "stream", None) or getattr(module, "stream", None)
        if stream is None:
            raise ValueError("pass num_tasks: neither the datamodule nor the module has a stream")
        num_tasks = len(stream)
    recorder = RoutingRecorder(num_tasks)
    if trainer is None:
        trainer = _default_trainer([recorder])
    else:
        trainer.callbacks.append(recorder)
    trainer.test(module, datamodule=datamodule, verbose=False)
    assert recorder.result is not None
    return recorder.result


def routing_matrix(module: pl.LightningModule, datamodule: pl.LightningDataModule,
                   trainer: Optional[pl.Trainer] = None, num_tasks: Optional[int] = None) -> np.ndarray:
    """The ``T x T`` routing matrix (row j = test task j, column i = task i's atoms or
    experts) from one extra evaluation pass; see :func:`routing_report`."""
    return routing_report(module, datamodule, trainer, num_tasks).matrix


def write_routing_report(out_dir: str | os.PathLike, matrix: Any, task_names: Sequence[str],
                         stats: Optional[dict[str, Any] | RoutingResult] = None,
                         title: Optional[str] = None) -> list[Path]:
    """Write ``routing.csv``, ``routing.png`` and ``routing.json`` into ``out_dir``
    (atomically); returns their paths. ``stats``: a :class:`RoutingResult` or its
    :meth:`RoutingResult.stats` dict, stored in ``routing.json``; ``title``: the
    picture's title (default "Routing share")."""
    out = Path(out_dir)
    arr = np.asarray(matrix, dtype=np.float64)
    names = [str(n) for n in task_names]
    if arr.shape != (len(names), len(names)):
        raise ValueError(f"routing matrix must be T x T for T = {len(names)} tasks, got shape {arr.shape}")
    if isinstance(stats, RoutingResult):
        stats = stats.stats()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["test_task", *names])
    for name, row in zip(names, arr):
        w.writerow([name, *("" if not math.isfinite(v) else f"{v:.4f}" for v in row)])
    paths = [atomic_write_text(out / "routing.csv", buf.getvalue())]
    from .plots import routing_png

    paths.append(routing_png(arr, names, out / "routing.png", title=title))
    diag = np.diag(arr)
    paths.append(atomic_write_json(out / "routing.json", {
        "orientation": ORIENTATION, "task_names": names, "matrix": arr.tolist(),
        "diagonal_mean": float(np.nanmean(diag)) if np.isfinite(diag).any() else None,
        **(stats or {})}))
    return paths


def read_routing_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read ``routing.csv`` back: ``(matrix, task_names)`` (empty cells are NaN)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["test_task"]:
        raise ValueError(f"{path}: not a routing.csv (header must start with 'test_task')")
    names = rows[0][1:]
    body = rows[1:]
    if [r[0] for r in body] != names:
        raise ValueError(f"{path}: row labels {[r[0] for r in body]} do not match the columns {names}")
    matrix = np.array([[float(v) if v.strip() else np.nan for v in r[1:]] for r in body], dtype=np.float64)
    return matrix, names
