"""The continual runner: one fresh Lightning Trainer per task, one module across tasks.

    row 0   <- evaluate the untrained backbone on every task
    for t in 1..T:
        reseed (seed, t); module.begin_task(t)      # grow/freeze before DDP wraps the module
        Trainer(max_steps=steps[t]).fit(module)     # fresh optimizer + schedule
        module.end_task(t)
        row t <- evaluate every task (future ones too)
        write matrix.csv, run_state.json, checkpoint.pt (atomically, rank 0)
    write metrics.json, print the summary

A run killed at any point resumes from its last finished task when started again with the
same command: the grown architecture is rebuilt by replaying begin_task/end_task with
``restoring=True`` and the checkpointed weights are loaded. Every task reseeds from
(seed, task), so a resumed run gives the same matrix as a straight one.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from . import metrics as M
from . import registry
from .callbacks import AccuracyMatrixCallback, TaskProgressBar
from .config import ConfigError, comparable, config_hash, default_output_dir
from .data import TaskStreamDataModule
from .method import NonFiniteLossError  # noqa: F401  (re-exported for the CLI)
from .routing import RoutingRecorder, supports_routing, write_routing_report
from .streams.base import Stream, StreamError

CHECKPOINT = "checkpoint.pt"
STATE = "run_state.json"


def is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


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
def build_stream(cfg: DictConfig) -> Stream:
    stream = registry.STREAMS[cfg.stream.name](cfg)
    return stream


def build_backbone(cfg: DictConfig):
    return registry.BACKBONES[cfg.backbone.name](cfg)


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


def processes_per_node(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    accel = str(cfg.trainer.accelerator)
    if isinstance(devices, int) and devices > 0 and (accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())):
        return devices
    return 1


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


def check_trainer_config(cfg: DictConfig) -> None:
    t = cfg.trainer
    accel = str(t.accelerator)
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accel} but this machine has no usable GPU; use trainer.accelerator=cpu")
    devices = t.devices
    if isinstance(devices, int):
        if devices < 1:
            raise ConfigError(f"trainer.devices must be >= 1 (got {devices})")
        on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
        available = torch.cuda.device_count() if on_gpu else (os.cpu_count() or 1)
        if devices > available:
            kind = "GPUs" if on_gpu else "CPU cores"
            raise ConfigError(f"trainer.devices={devices} but this machine has only {available} {kind}")
    if int(cfg.stream.batch_size) < processes_per_node(cfg) * int(t.num_nodes):
        raise ConfigError(f"stream.batch_size={cfg.stream.batch_size} is smaller than the number of processes")


def set_threads(cfg: DictConfig) -> None:
    n = cfg.trainer.num_threads
    if not n:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover
            cores = os.cpu_count() or 1
        n = max(1, cores // processes_per_node(cfg))
    torch.set_num_threads(int(n))


def make_trainer(cfg: DictConfig, out: Path, callbacks: list, max_steps: int, tag: str,
                 label: str | None = None) -> pl.Trainer:
    t = cfg.trainer
    if t.enable_progress_bar:
        callbacks = [*callbacks, TaskProgressBar(label or tag)]
    logger = TensorBoardLogger(save_dir=str(out), name="tensorboard", version=tag, default_hp_metric=False)
    clip = cfg.method.get("optim", {}).get("grad_clip") if "optim" in cfg.method else None
    strategy = t.strategy
    if strategy == "ddp":
        # frozen memories live in buffers that are identical on every rank: do not re-send
        # them every step. Top-k routing (MoE-LoRA, L2P) can leave a trainable parameter
        # unused in a step, so DDP must look for unused parameters.
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(broadcast_buffers=False, find_unused_parameters=True)
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=strategy, num_nodes=t.num_nodes,
        precision=t.precision, max_steps=max_steps, max_epochs=-1 if max_steps > 0 else None,
        logger=logger, callbacks=callbacks, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        deterministic=t.deterministic, gradient_clip_val=clip, default_root_dir=str(out),
        inference_mode=True,
    )


# ---- the run directory ---------------------------------------------------------------------------
def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir {str(out)!r} is not writable: {e.strerror or e}") from None


RUN_FILES = ("matrix.csv", "metrics.json", STATE, CHECKPOINT, "heatmap.png", "curve.png", "routing.csv", "routing.png", "routing.json")


def clear_run_files(out: Path) -> None:
    """overwrite=true: remove what an earlier run wrote here (and nothing else)."""
    import shutil

    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


def prepare_output_dir(cfg: DictConfig, out: Path) -> dict | None:
    """Decide between a fresh run, a resume (returns the checkpoint) or refusing."""
    import json

    state_path = out / STATE
    if not state_path.exists():
        if is_rank_zero():
            _check_writable(out)
        return None
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{state_path} is unreadable ({e}); use another output_dir or overwrite=true") from None
    if cfg.overwrite:
        if is_rank_zero():
            clear_run_files(out)
        return None
    if state.get("config_hash") != config_hash(cfg):
        theirs = state.get("config", {})
        ours = comparable(cfg)
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ConfigError(
            f"output_dir {str(out)!r} holds a run with a different config (differs in: {', '.join(diff) or 'details'});"
            " use another output_dir or overwrite=true")
    if state.get("finished"):
        return {"finished": True}
    ckpt_path = out / CHECKPOINT
    if not ckpt_path.exists():
        return None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {ckpt_path} is unreadable ({type(e).__name__}); use overwrite=true to start over") from None
    if ckpt.get("method") != cfg.method.name or ckpt.get("stream") != cfg.stream.name:
        raise ConfigError(f"checkpoint {ckpt_path} is from method {ckpt.get('method')!r} on stream "
                          f"{ckpt.get('stream')!r}, not {cfg.method.name!r} on {cfg.stream.name!r}")
    return ckpt


class Run:
    """State of one run: the matrix rows, timings and the files written after each task."""

    def __init__(self, cfg: DictConfig, out: Path, stream: Stream):
        self.cfg, self.out, self.stream = cfg, out, stream
        self.rows: list[list[float]] = []
        self.counts: list[int] | None = None
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.setup_seconds = 0.0
        self.trainable_per_task: list[int] = []

    def state(self, finished: bool) -> dict:
        return {"config_hash": config_hash(self.cfg), "config": comparable(self.cfg),
                "method": self.cfg.method.name, "stream": self.cfg.stream.name, "seed": int(self.cfg.seed),
                "completed_tasks": len(self.rows) - 1, "num_tasks": len(self.stream), "finished": finished,
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds}

    def write_progress(self, module, finished: bool = False) -> None:
        if not is_rank_zero():
            return
        M.write_matrix_csv(self.out / "matrix.csv", self.rows, self.stream.task_names)
        if not finished:
            ckpt = {"method": self.cfg.method.name, "stream": self.cfg.stream.name, "seed": int(self.cfg.seed),
                    "completed_tasks": len(self.rows) - 1, "rows": torch.tensor(self.rows, dtype=torch.float64),
                    "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                    "trainable_per_task": torch.tensor(self.trainable_per_task, dtype=torch.long),
                    "grown_state": module.grown_state()}
            tmp = self.out / f"{CHECKPOINT}.tmp"
            torch.save(ckpt, tmp)
            os.replace(tmp, self.out / CHECKPOINT)
        M.atomic_write_json(self.out / STATE, self.state(finished))

    def log_row(self, trainer: pl.Trainer) -> None:
        if not is_rank_zero() or trainer.logger is None:
            return
        row_idx = len(self.rows) - 1
        exp = trainer.logger.experiment
        for name, v in zip(self.stream.task_names, self.rows[-1]):
            exp.add_scalar(f"eval/{name}", v, row_idx)
        seen = self.rows[-1][:row_idx] if row_idx else self.rows[-1]
        exp.add_scalar("eval/avg_seen_tasks", sum(seen) / len(seen), row_idx)
        exp.add_scalar("eval/avg_all_tasks", sum(self.rows[-1]) / len(self.rows[-1]), row_idx)
        try:
            from .plots import heatmap_figure

            exp.add_figure("accuracy_matrix", heatmap_figure(self.rows, self.stream.task_names), row_idx)
        except ImportError:  # plots are optional for logging
            pass
        exp.flush()


def evaluate(cfg, out, module, dm, run: Run, tag: str, extra_callbacks: tuple = ()) -> list[float]:
    cb = AccuracyMatrixCallback(len(run.stream))
    trainer = make_trainer(cfg, out, [cb, *extra_callbacks], max_steps=-1, tag=tag,
                           label=f"evaluate all {len(run.stream)} tasks")
    start = time.time()
    trainer.test(module, datamodule=dm, verbose=False)
    run.eval_seconds += time.time() - start
    run.rows.append(cb.row)
    run.counts = cb.counts
    run.log_row(trainer)
    return cb.row


def run(cfg: DictConfig) -> Path | None:
    """Execute one run; returns its output directory (None when it was already finished)."""
    from lightning.fabric.utilities.seed import seed_everything

    setup_start = time.time()
    out = default_output_dir(cfg)
    check_trainer_config(cfg)
    registry.METHODS[cfg.method.name].validate_config(cfg.method)
    from .check_data import require_data

    try:
        require_data(cfg)  # real streams: every domain's files present before any work
    except StreamError as e:
        raise ConfigError(str(e)) from None
    set_threads(cfg)
    resume = prepare_output_dir(cfg, out)
    if resume and resume.get("finished"):
        say(f"run already finished: {out} (matrix.csv, metrics.json). Pass overwrite=true to run it again.")
        return None
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                  "lightning.fabric.utilities.seed", "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*infer the `batch_size`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")

    seed_everything(int(cfg.seed), verbose=False)
    try:
        stream = build_stream(cfg)
    except StreamError as e:
        raise ConfigError(str(e)) from None
    say(stream.summary())
    backbone = build_backbone(cfg)
    method_cls = registry.METHODS[cfg.method.name]
    module = method_cls(cfg, stream, backbone)
    steps = steps_per_task(cfg, stream)
    world = processes_per_node(cfg) * int(cfg.trainer.num_nodes)
    dm = TaskStreamDataModule(stream, batch_size=int(cfg.stream.batch_size) // max(1, world) * max(1, world),
                              steps_per_task=steps, seed=int(cfg.seed), eval_batch_size=int(cfg.data.eval_batch_size),
                              num_workers=int(cfg.data.num_workers), transform=getattr(backbone, "preprocess", None),
                              train_transform=getattr(backbone, "train_preprocess", None))
    if stream.modality == "image" and cfg.data.cache_features and getattr(backbone, "trunk_cacheable", False):
        backbone_id = f"{cfg.backbone.name}:{OmegaConf.to_container(cfg.backbone, resolve=True)}:{backbone.info.get('weights_id', '')}"
        dm.cache_features(backbone.image_trunk, backbone_id, cache_dir(cfg), log=say)

    module.stream_data = dm  # for data-dependent set-up in begin_task (e.g. InfLoRA)
    run_state = Run(cfg, out, stream)
    start_task = 0
    if resume:
        start_task = int(resume["completed_tasks"])
        for t in range(start_task):
            seed_everything(int(cfg.seed) * 1000 + t, verbose=False)
            module.begin_task(t, restoring=True)
            module.end_task(t, restoring=True)
        module.load_grown_state(resume["grown_state"])
        run_state.rows = [list(map(float, r)) for r in resume["rows"].tolist()]
        run_state.train_seconds = float(resume["train_seconds"])
        run_state.eval_seconds = float(resume["eval_seconds"])
        run_state.trainable_per_task = [int(x) for x in resume["trainable_per_task"].tolist()]
        say(f"resuming {out}: {start_task} of {len(stream)} tasks already done")
    run_state.setup_seconds = time.time() - setup_start

    T = len(stream)
    if not run_state.rows:
        say("evaluating the untrained backbone (row 0)")
        evaluate(cfg, out, module, dm, run_state, tag="task0_eval")
        run_state.write_progress(module)
    for t in range(start_task, T):
        task = stream.tasks[t]
        seed_everything(int(cfg.seed) * 1000 + t, verbose=False)
        module.begin_task(t)
        n_train = module.count_trainable()
        run_state.trainable_per_task.append(n_train)
        say(f"\n== task {t + 1}/{T}: {task.name} ({len(task.train)} train samples, {steps[t]} steps, "
            f"{n_train:,} trainable parameters) ==")
        task_seconds = None
        if module.trains and steps[t] > 0:
            dm.set_task(t)
            module.task_steps = steps[t]
            trainer = make_trainer(cfg, out, [], max_steps=steps[t], tag=f"task{t + 1}_train",
                                   label=f"task {t + 1}/{T} train")
            start = time.time()
            trainer.fit(module, datamodule=dm)
            task_seconds = time.time() - start
            run_state.train_seconds += task_seconds
        module.end_task(t)
        # after the last task, the same evaluation pass also records the routing report
        recorder = RoutingRecorder(T) if t == T - 1 and supports_routing(module) else None
        row = evaluate(cfg, out, module, dm, run_state, tag=f"task{t + 1}_eval",
                       extra_callbacks=(recorder,) if recorder else ())
        if recorder is not None and recorder.result is not None and is_rank_zero():
            write_routing_report(out, recorder.result.matrix, stream.task_names, recorder.result)
        seen = row[: t + 1]
        trained = f" ({task_seconds:.0f}s training)" if task_seconds is not None else ""
        say(f"after task {t + 1}{trained}: " + ", ".join(f"{n} {v:.1f}" for n, v in zip(stream.task_names, row))
            + f" | avg over seen tasks {sum(seen) / len(seen):.2f}")
        run_state.write_progress(module)

    results = finish(cfg, out, module, run_state)
    if is_rank_zero():
        print_summary(results, run_state)
    return out


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
        "versions": package_versions(), "command": " ".join(sys.argv), "finished": True,
    })
    if is_rank_zero():
        M.atomic_write_json(out / "metrics.json", results)
        try:
            from .plots import curve_png, heatmap_png

            heatmap_png(R, run.stream.task_names, out / "heatmap.png", title=f"{cfg.method.name} on {cfg.stream.name}")
            curve_png(R, run.stream.task_names, out / "curve.png")
        except ImportError:
            pass
        M.atomic_write_json(out / STATE, run.state(finished=True))
        (out / CHECKPOINT).unlink(missing_ok=True)
    return results


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
