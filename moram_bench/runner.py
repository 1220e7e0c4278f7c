"""The continual runner: one fresh Lightning Trainer per task, one module across tasks.

    preflight: every check that needs no model; new run, resume, finished or replacement
    build: stream, backbone, method, DataModule (nothing in the run directory yet)
    lock the run directory (a replaced run moves aside until the first task is done)
    row 0   <- evaluate the untrained backbone on every task
    for t in 1..T:
        reseed (seed, t); module.meta_begin_task(t, dm)   # grow/freeze before DDP wraps the module
        Trainer(max_steps=steps[t]).fit(module)           # fresh optimizer + schedule
        module.meta_end_task(t, dm)
        row t <- evaluate every task (future ones too)
        write matrix.csv, run_state.json, checkpoint.pt (atomically, rank 0)
    write metrics.json, print the summary

A run killed at any point resumes from its last finished task when started again with the
same command: the grown architecture is rebuilt by replaying meta_begin_task/meta_end_task
with ``restoring=True`` and the checkpointed weights are loaded. Every task reseeds from
(seed, task), so a resumed run gives the same matrix as a straight one. SIGINT and SIGTERM
stop a run with :class:`~moram_bench.errors.RunInterrupted` (exit 130 / 143), the files of
the last finished task intact. The run directory's layout and rules live in ``rundir``.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import seed_everything
from omegaconf import DictConfig, OmegaConf

from . import logs
from . import metrics as M
from . import results_io
from . import registry
from . import rundir
from .callbacks import AccuracyMatrixCallback, TaskProgressBar
from .data import TaskStreamDataModule
from .errors import ConfigError, RunInterrupted, StreamError  # noqa: F401  (re-exported)
from .method import NonFiniteLossError  # noqa: F401  (re-exported for the CLI)
from .routing import RoutingRecorder, supports_routing, write_routing_report
from .rundir import CHECKPOINT, STATE, check_trainer_config, is_rank_zero, processes_per_node  # noqa: F401
from .streams.base import Stream
from .tblog import RunLogger


def command_line() -> str:
    """The command as a user would type it (``python -m moram_bench fit ...``), not the
    interpreter's path to ``__main__.py``: run records carry no machine paths of their own."""
    args = list(sys.argv)
    if args and Path(args[0]).name == "__main__.py" and Path(args[0]).parent.name == "moram_bench":
        args[0] = "python -m moram_bench"
    return " ".join(args)


def say(msg: str) -> None:
    if is_rank_zero():
        print(msg, flush=True)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "lightning", "torchmetrics", "open_clip_torch", "transformers", "omegaconf", "numpy", "timm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("MORAM_BENCH_CACHE") or Path.home() / ".cache" / "moram_bench")


# ---- building the pieces -------------------------------------------------------------------
def steps_per_task(cfg: DictConfig, stream: Stream) -> list[int]:
    """Iterations per task: ``stream.iterations``, or epochs (per task or per stream)
    converted with the global batch size."""
    out = []
    batch = int(cfg.stream.batch_size)
    for t in stream.tasks:
        epochs = t.epochs if t.epochs is not None else cfg.stream.get("epochs")
        if epochs is not None:
            out.append(max(1, math.ceil(float(epochs) * len(t.train) / batch)))
        else:
            out.append(int(cfg.stream.iterations))
    return out


def backbone_weights(backbone) -> str | None:
    """A short human description of the backbone's weights plus their identity (a cache
    key, file or seed), for metrics.json and the leaderboard's table headings."""
    info = getattr(backbone, "info", None) or {}
    what = info.get("pretrained") or info.get("weights")
    if what is None and info.get("init_seed") is not None:
        what = f"random init (seed {info['init_seed']})"
    ident = info.get("weights_id")
    if what and ident and str(ident) not in str(what):
        return f"{what} [{ident}]"
    return str(what or ident) if (what or ident) else None


def set_threads(cfg: DictConfig) -> None:
    n = cfg.trainer.num_threads
    if not n:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover
            cores = os.cpu_count() or 1
        n = max(1, cores // processes_per_node(cfg))
    torch.set_num_threads(int(n))
    # Lightning's DDP launcher resets the thread count to cores / processes unless
    # OMP_NUM_THREADS is set (its ranks inherit it): export it, so the setting holds under DDP
    os.environ["OMP_NUM_THREADS"] = str(int(n))


def make_trainer(cfg: DictConfig, logger: RunLogger, callbacks: list, max_steps: int, label: str) -> pl.Trainer:
    t = cfg.trainer
    callbacks = [*callbacks, StopDDPChildrenOnInterrupt()]
    if t.enable_progress_bar:
        callbacks = [*callbacks, TaskProgressBar(label)]
    clip = cfg.method.get("optim", {}).get("grad_clip") if "optim" in cfg.method else None
    strategy = t.strategy
    if strategy == "ddp":
        # frozen memories live in buffers that are identical on every rank: do not re-send
        # them every step. Top-k routing (MoE-LoRA, L2P) can leave a trainable parameter
        # unused in a step, so DDP must look for unused parameters.
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(broadcast_buffers=False, find_unused_parameters=True)
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=strategy, num_nodes=t.num_nodes,
        precision=t.precision, max_steps=max_steps, max_epochs=-1 if max_steps > 0 else None,
        logger=logger, callbacks=callbacks, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        deterministic=t.deterministic, gradient_clip_val=clip, default_root_dir=logger.save_dir,
        inference_mode=True,
    )
    keep_our_signal_handlers(trainer)
    return trainer


def stop_ddp_children(signum: int, grace: float = 5.0) -> None:
    """After an interruption of rank 0: the DDP processes Lightning launched get the signal
    (a scheduler may signal rank 0 only), so none waits in a collective for a rank that is
    gone; one still alive ``grace`` seconds later is blocked inside a collective, where its
    Python handler cannot run, and is killed (ranks other than 0 write nothing)."""
    for proc in StopDDPChildrenOnInterrupt.launched:
        for sig in (None, signum, signal.SIGKILL):  # wait; then the signal; then for sure
            if sig is not None:
                with contextlib.suppress(OSError):
                    proc.send_signal(sig)
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue


class StopDDPChildrenOnInterrupt(pl.Callback):
    """Rank 0, interrupted inside Lightning: stop the launched ranks before Lightning tears
    the process group down (which would make a rank blocked in a collective fail loudly
    with "Connection closed by peer"). Lightning launches the other ranks once, from the
    first trainer of the run: their processes are remembered here for the later ones."""

    launched: list = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
        StopDDPChildrenOnInterrupt.launched.extend(p for p in procs if p not in self.launched)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, RunInterrupted) and trainer.is_global_zero:
            stop_ddp_children(exception.signum, grace=1.0)


def keep_our_signal_handlers(trainer: pl.Trainer) -> None:
    """Stop Lightning from putting its own SIGTERM handler in front of ours while it trains.
    Under DDP that handler broadcasts from rank 0 inside the signal handler; when the other
    ranks are inside another collective (the CLIP loss's all_gather) every rank waits for the
    others for ever (observed: a 2-process run ignored SIGTERM). Signals are ours to handle:
    ``rundir.interruptible`` raises RunInterrupted on every rank, and rank 0 stops the DDP
    children it launched (:class:`StopDDPChildrenOnInterrupt`). Lightning's SLURM auto-requeue goes
    with it; SLURM preemption is handled by submitit (launchers.py)."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and hasattr(connector, "register_signal_handlers"):
        connector.register_signal_handlers = lambda: None


@dataclass
class Built:
    """The pieces of a run: nothing of them is in the run directory."""

    stream: Stream
    module: "pl.LightningModule"
    data: TaskStreamDataModule
    steps: list[int]


def build(cfg: DictConfig) -> Built:
    """Stream, backbone, method and DataModule (and the frozen trunk's feature cache)."""
    seed_everything(int(cfg.seed), verbose=False)
    stream = registry.STREAMS[cfg.stream.name](cfg)
    say(stream.summary())
    backbone = registry.BACKBONES[cfg.backbone.name](cfg)
    module = registry.METHODS[cfg.method.name](cfg, stream, backbone)
    steps = steps_per_task(cfg, stream)
    world = processes_per_node(cfg) * int(cfg.trainer.num_nodes)
    dm = TaskStreamDataModule(stream, batch_size=int(cfg.stream.batch_size) // max(1, world) * max(1, world),
                              steps_per_task=steps, seed=int(cfg.seed), eval_batch_size=int(cfg.data.eval_batch_size),
                              num_workers=int(cfg.data.num_workers), transform=getattr(backbone, "preprocess", None),
                              train_transform=getattr(backbone, "train_preprocess", None))
    if stream.modality == "image" and cfg.data.cache_features and getattr(backbone, "trunk_cacheable", False):
        backbone_id = f"{cfg.backbone.name}:{OmegaConf.to_container(cfg.backbone, resolve=True)}:{backbone.info.get('weights_id', '')}"
        dm.cache_features(backbone.image_trunk, backbone_id, cache_dir(cfg), log=say)
    return Built(stream, module, dm, steps)


class Run:
    """State of one run: the matrix rows, timings and the files written after each task."""

    def __init__(self, cfg: DictConfig, rd: rundir.RunDir, built: Built):
        self.cfg, self.rd, self.out, self.stream = cfg, rd, rd.out, built.stream
        self.module, self.steps, self.data = built.module, built.steps, built.data
        self.logger = RunLogger(self.out)
        self.rows: list[list[float]] = []
        self.counts: list[int] | None = None
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.setup_seconds = 0.0
        self.trainable_per_task: list[int] = []

    @property
    def completed(self) -> int:
        return max(0, len(self.rows) - 1)

    def state(self, finished: bool) -> dict:
        return {"config_hash": rundir.config_hash(self.cfg), "config": rundir.comparable(self.cfg),
                "method": self.cfg.method.name, "stream": self.cfg.stream.name, "seed": int(self.cfg.seed),
                "completed_tasks": len(self.rows) - 1, "num_tasks": len(self.stream), "finished": finished,
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds}

    def restore(self, ckpt: dict | None) -> int:
        """Resume: replay the grown architecture of the finished tasks, load their weights
        and rows; returns the first task to train (0 for a new run)."""
        if ckpt is None:
            return 0
        done = int(ckpt["completed_tasks"])
        for t in range(done):
            seed_everything(int(self.cfg.seed) * 1000 + t, verbose=False)
            self.module.meta_begin_task(t, None, restoring=True)
            self.module.meta_end_task(t, None, restoring=True)
        self.module.load_grown_state(ckpt["grown_state"])
        self.rows = [list(map(float, r)) for r in ckpt["rows"].tolist()]
        self.train_seconds = float(ckpt["train_seconds"])
        self.eval_seconds = float(ckpt["eval_seconds"])
        self.trainable_per_task = [int(x) for x in ckpt["trainable_per_task"].tolist()]
        say(f"resuming {self.out}: {done} of {len(self.stream)} tasks already done")
        return done

    def write_progress(self) -> None:
        """matrix.csv, checkpoint.pt and run_state.json of the rows so far (SIGINT/SIGTERM
        wait until all three are written)."""
        if not is_rank_zero():
            return
        with rundir.uninterrupted():
            results_io.write_matrix_csv(self.out / rundir.MATRIX, self.rows, self.stream.task_names)
            ckpt = {"method": self.cfg.method.name, "stream": self.cfg.stream.name, "seed": int(self.cfg.seed),
                    "completed_tasks": len(self.rows) - 1, "rows": torch.tensor(self.rows, dtype=torch.float64),
                    "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                    "trainable_per_task": torch.tensor(self.trainable_per_task, dtype=torch.long),
                    "grown_state": self.module.grown_state()}
            tmp = self.out / f"{CHECKPOINT}.tmp"
            torch.save(ckpt, tmp)
            os.replace(tmp, self.out / CHECKPOINT)
            results_io.atomic_write_json(self.out / STATE, self.state(False))
            self.rd.task_done(self.completed)

    def execute(self, plan: rundir.Plan, setup_start: float) -> dict:
        """Resume (or start), row 0, every remaining task, then the final files."""
        ckpt = rundir.read_checkpoint(self.cfg, self.out) if plan.action == "resume" else None
        if plan.action == "resume" and ckpt is None and rundir._done(plan.state):
            say(f"{self.out / CHECKPOINT} is missing: starting again from task 0")
        if plan.action == "replace":
            say(rundir.say_replaced(self.out))
        start = self.restore(ckpt)
        self.setup_seconds = time.time() - setup_start
        if not self.rows:
            say("evaluating the untrained backbone (row 0)")
            self.evaluate(self.data)
            self.write_progress()
        for t in range(start, len(self.stream)):
            self.task(t, self.data)
        return finish(self.cfg, self.out, self.module, self)

    def saved(self) -> str:
        """What an interruption leaves on disk, and how to go on."""
        T = len(self.stream)
        if self.completed:
            return (f"tasks 1-{self.completed} of {T} are saved in {self.out} ({CHECKPOINT}); "
                    "run the same command again to resume")
        if self.rd.plan.action == "replace":
            return f"no task was finished, the previous run in {self.out} is put back; run the same command again"
        return f"no task was finished, nothing trained is saved in {self.out}; run the same command again to start"

    def evaluate(self, data, extra_callbacks: tuple = ()) -> list[float]:
        """The next row of the matrix: every task's test set (logged at the global step)."""
        cb = AccuracyMatrixCallback(len(self.stream))
        trainer = make_trainer(self.cfg, self.logger, [cb, *extra_callbacks], max_steps=-1,
                               label=f"evaluate all {len(self.stream)} tasks")
        start = time.time()
        trainer.test(self.module, datamodule=data, verbose=False)
        self.eval_seconds += time.time() - start
        self.rows.append(cb.row)
        self.counts = cb.counts
        self.logger.log_row(self.rows, self.stream.task_names, step=sum(self.steps[: self.completed]))
        return cb.row

    def task(self, t: int, data) -> None:
        """Task ``t``: grow, train, consolidate, evaluate, save."""
        module, T, steps = self.module, len(self.stream), self.steps
        task = self.stream.tasks[t]
        seed_everything(int(self.cfg.seed) * 1000 + t, verbose=False)
        module.meta_begin_task(t, data)
        n_train = module.count_trainable()
        self.trainable_per_task.append(n_train)
        say(f"\n== task {t + 1}/{T}: {task.name} ({len(task.train)} train samples, {steps[t]} steps, "
            f"{n_train:,} trainable parameters) ==")
        task_seconds = None
        if module.trains and steps[t] > 0:
            data.set_task(t)
            self.logger.step_offset = sum(steps[:t])
            trainer = make_trainer(self.cfg, self.logger, [], max_steps=steps[t],
                                                  label=f"task {t + 1}/{T} train")
            start = time.time()
            trainer.fit(module, datamodule=data)
            task_seconds = time.time() - start
            self.train_seconds += task_seconds
        module.meta_end_task(t, data)
        # after the last task, the same evaluation pass also records the routing report
        recorder = RoutingRecorder(T) if t == T - 1 and supports_routing(module) else None
        row = self.evaluate(data, extra_callbacks=(recorder,) if recorder else ())
        if recorder is not None and recorder.result is not None and is_rank_zero():
            write_routing_report(self.out, recorder.result.matrix, self.stream.task_names, recorder.result)
        seen = row[: t + 1]
        trained = f" ({task_seconds:.0f}s training)" if task_seconds is not None else ""
        say(f"after task {t + 1}{trained}: " + ", ".join(f"{n} {v:.1f}" for n, v in zip(self.stream.task_names, row))
            + f" | avg over seen tasks {sum(seen) / len(seen):.2f}")
        self.write_progress()


def run(cfg: DictConfig) -> Path | None:
    """Execute one run; returns its output directory (None when it was already finished).
    Raises ConfigError (one line) for bad input, RunInterrupted on SIGINT/SIGTERM."""
    setup_start = time.time()
    plan = rundir.preflight(cfg)
    if plan.action == "finished":
        if (plan.out / rundir.REPLACED).exists():  # a replacement killed before its first task
            with rundir.RunDir(plan):  # is undone (the finished run comes back)
                pass
        say(f"run already finished: {plan.out} ({rundir.MATRIX}, {rundir.METRICS}). Pass overwrite=true to run it again.")
        return None
    set_threads(cfg)
    logs.quiet_run()
    with rundir.interruptible():
        try:
            built = build(cfg)
        except RunInterrupted as e:
            e.saved = f"nothing was written to {plan.out}"
            raise
        with rundir.RunDir(plan) as rd:
            state = Run(cfg, rd, built)
            try:
                results = state.execute(plan, setup_start)
            except RunInterrupted as e:
                e.saved = state.saved()
                stop_ddp_children(e.signum)  # also when interrupted between two fits
                raise
    if is_rank_zero():
        print_summary(results, state)
    return plan.out


def finish(cfg: DictConfig, out: Path, module, run: Run) -> dict:
    import numpy as np

    R = np.asarray(run.rows, dtype=np.float64)
    results = M.compute_all(R)
    grown = module.grown_state()
    results.update({
        "method": cfg.method.name, "stream": cfg.stream.name, "backbone": cfg.backbone.name,
        "seed": int(cfg.seed), "num_tasks": len(run.stream), "task_names": run.stream.task_names,
        "matrix": R.tolist(), "matrix_orientation": "rows: 0 = untrained backbone, i = after training task i; columns: tasks",
        "averaging": "macro (each task weighs the same; samples are averaged within a task)",
        "test_samples_per_task": run.counts,
        "train_seconds": round(run.train_seconds, 3), "eval_seconds": round(run.eval_seconds, 3),
        "setup_seconds": round(run.setup_seconds, 3),
        "eval_fraction": round(run.eval_seconds / max(1e-9, run.eval_seconds + run.train_seconds), 4),
        "trainable_params_per_task": run.trainable_per_task,
        "params_added": int(sum(v.numel() for v in grown.values())),
        "stream_settings": run.stream.settings,
        "backbone_weights": backbone_weights(module.backbone),
        "method_settings": module.extra_metrics(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": package_versions(), "command": command_line(), "finished": True,
    })
    if is_rank_zero():
        from .plots import curve_png, heatmap_png

        with rundir.uninterrupted():
            results_io.atomic_write_json(out / rundir.METRICS, results)
            heatmap_png(R, run.stream.task_names, out / rundir.HEATMAP, title=f"{cfg.method.name} on {cfg.stream.name}")
            curve_png(R, run.stream.task_names, out / rundir.CURVE)
            results_io.atomic_write_json(out / STATE, run.state(finished=True))
            (out / CHECKPOINT).unlink(missing_ok=True)
        run.logger.log_final(hparams(cfg, results), {k: results[k] for k in M.METRIC_NAMES if k in results})
    return results


def hparams(cfg: DictConfig, results: dict) -> dict:
    """What TensorBoard's HParams view shows of a run: method, stream, seed, the method's
    settings and the facts it reports (flat ``method.<key>`` names)."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    flat = {"method": cfg.method.name, "stream": cfg.stream.name, "backbone": cfg.backbone.name, "seed": int(cfg.seed)}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif k != "name":
                flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(method, "method.")
    walk(results.get("method_settings") or {}, "method_settings.")
    return flat


def print_summary(results: dict, run: Run) -> None:
    import numpy as np

    print("\n" + "=" * 78)
    print(f"{results['method']} on {results['stream']} (backbone {results['backbone']}, seed {results['seed']})")
    print(M.format_matrix(np.asarray(results["matrix"]), results["task_names"]))
    print()
    print(M.format_metrics({k: results[k] for k in M.METRIC_NAMES if k in results}))
    print(f"time: setup {results['setup_seconds']:.1f}s, training {results['train_seconds']:.1f}s, "
          f"evaluation {results['eval_seconds']:.1f}s; params added {results['params_added']:,}")
    print(f"run directory: {run.out}")
