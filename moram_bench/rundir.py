"""The run directory: its layout, its state, its lock, and the checks before a run.

One run writes one folder (``output_dir``, by default
``results/runs/<stream>/<method>/seed<seed>``)::

    matrix.csv       the accuracy matrix, rewritten after every task
    run_state.json   config hash, tasks done, finished or not (rewritten after every task)
    checkpoint.pt    what the method grew, after the last finished task (gone when finished)
    metrics.json     every metric, the config and the versions (written when finished)
    heatmap.png, curve.png, routing.*   figures and the routing report (when finished)
    tensorboard/     ONE TensorBoard run (global step across tasks)
    run.lock         present while a process writes here: its pid and host (moram_bench.lock)
    .replaced/       overwrite=true: the previous run, kept until the new one finishes a task

``preflight(cfg)`` is what ``fit`` and ``sweep`` both call before building anything: every
check that needs no model, and the decision between a new run, a resume, a finished run
and a replacement (``overwrite=true``). It touches nothing. ``RunDir`` is the context in
which a run writes: it creates the folder, takes the lock, moves a replaced run aside (and
puts it back if the new run fails before its first task), and releases the lock.
``interruptible()`` turns SIGINT/SIGTERM into :class:`~moram_bench.errors.RunInterrupted`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ConfigError, RunInterrupted
from .lock import RunLock

# ---- layout: every file name spelled once ----------------------------------------------------
MATRIX = "matrix.csv"
METRICS = "metrics.json"
STATE = "run_state.json"
CHECKPOINT = "checkpoint.pt"
HEATMAP = "heatmap.png"
CURVE = "curve.png"
ROUTING_FILES = ("routing.csv", "routing.png", "routing.json")
TENSORBOARD = "tensorboard"
LOCK = "run.lock"
REPLACED = ".replaced"
RUN_FILES = (MATRIX, METRICS, STATE, CHECKPOINT, HEATMAP, CURVE, *ROUTING_FILES, TENSORBOARD)

# ---- settings that do not change results ------------------------------------------------------
# Where files go, how the run is displayed and how work is spread over processes: these may
# differ between a run and its resumption (they are left out of the config hash).
RESULT_NEUTRAL_KEYS = ("overwrite", "output_dir", "trainer.enable_progress_bar", "trainer.devices",
                       "trainer.num_nodes", "trainer.strategy", "trainer.num_threads",
                       "trainer.log_every_n_steps", "data.num_workers", "data.eval_batch_size",
                       "cache_dir", "plugins")
# The leaderboard averages runs over seeds and machines: it also ignores the seed, data
# locations and every trainer/data setting except the precision (dotted keys; ".*": sub-tree).
GROUPING_IGNORED_KEYS = ("seed", "output_dir", "overwrite", "cache_dir", "data_dir", "plugins",
                         "trainer.*", "data.*", "backbone.cache_dir")
GROUPING_KEPT_KEYS = ("trainer.precision",)
assert all(k in GROUPING_IGNORED_KEYS or k.split(".")[0] + ".*" in GROUPING_IGNORED_KEYS
           for k in RESULT_NEUTRAL_KEYS)


def comparable(cfg) -> dict:
    """The config without :data:`RESULT_NEUTRAL_KEYS` (what a resumed run must share)."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else json.loads(json.dumps(cfg))
    for key in RESULT_NEUTRAL_KEYS:
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return d


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(comparable(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_dir(cfg, results: Optional[str] = None, variant: Optional[str] = None) -> Path:
    """``output_dir`` when set, else ``RESULTS/runs/<stream>/<method>[/<variant>]/seed<seed>``
    (``RESULTS`` defaults to ``results``; a sweep adds a variant folder for its extra axes)."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    out = Path(results or "results") / "runs" / str(cfg.stream.name) / str(cfg.method.name)
    return (out / variant if variant else out) / f"seed{cfg.seed}"


def is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


# ---- the state file -----------------------------------------------------------------------------
def read_state(out: Path) -> Optional[dict]:
    """``run_state.json`` of ``out`` (None when there is none); ConfigError when unreadable."""
    path = Path(out) / STATE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}); use another output_dir or overwrite=true") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a run state (a JSON object); use another output_dir or overwrite=true")
    return state


def _done(state: Optional[dict]) -> int:
    try:
        return int((state or {}).get("completed_tasks") or 0)
    except (TypeError, ValueError):
        return 0


def _effective_dir(out: Path) -> Path:
    """Where the run that counts lives: ``out``, or ``out/.replaced`` when a replacement
    (overwrite=true) never finished its first task and so will be undone."""
    aside = out / REPLACED
    if aside.is_dir() and _done(_safe_state(out)) < 1:
        return aside
    return out


def _safe_state(out: Path) -> Optional[dict]:
    try:
        return read_state(out)
    except ConfigError:
        return None


def config_difference(state: dict, cfg) -> list[str]:
    theirs, ours = state.get("config", {}), comparable(cfg)
    if not isinstance(theirs, dict):
        return ["config"]
    return sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))


# ---- the checks before a run ---------------------------------------------------------------------
def processes_per_node(cfg) -> int:
    import torch

    devices = cfg.trainer.devices
    accel = str(cfg.trainer.accelerator)
    if isinstance(devices, int) and devices > 0 and (accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())):
        return devices
    return 1


def check_trainer_config(cfg) -> None:
    """Trainer settings this machine can honour (GPUs, cores, a batch per process)."""
    import torch

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


def check_method(cfg) -> None:
    """The method exists for the stream's modality and its settings are in range."""
    from . import registry

    cls = registry.METHODS[cfg.method.name]
    modality = str(cfg.stream.get("modality", "image"))
    if modality not in getattr(cls, "modalities", (modality,)):
        raise ConfigError(f"method {cfg.method.name!r} cannot run on {modality} streams like {cfg.stream.name!r} "
                          f"(it supports: {', '.join(cls.modalities)})")
    cls.validate_config(cfg.method)


def _writable(path: Path) -> Optional[str]:
    """None when ``path`` (a folder, existing or to be created) can be written, else why not."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"no write permission on {p}"
    return None


@dataclass
class Plan:
    """What a run will do in its directory: ``action`` is ``"new"``, ``"resume"``,
    ``"replace"`` (overwrite=true over an earlier run) or ``"finished"`` (nothing to do)."""

    out: Path
    action: str
    state: Optional[dict] = None

    @property
    def progress(self) -> str:
        s = self.state or {}
        return f"{s.get('completed_tasks', '?')}/{s.get('num_tasks', '?')} tasks done"


def plan_run(cfg, out: Path) -> Plan:
    """Decide what a run with ``cfg`` does in ``out`` (reads, never writes)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} is a file, not a folder")
    where = _effective_dir(out) if out.is_dir() else out
    if cfg.overwrite:  # whatever is there (even an unreadable state) is replaced
        has_run = any((where / f).exists() for f in (STATE, MATRIX, METRICS, CHECKPOINT)) or (out / REPLACED).exists()
        plan = Plan(out, "replace" if has_run else "new", _safe_state(where))
    elif (state := read_state(where)) is None:
        plan = Plan(out, "new")
    else:
        if state.get("config_hash") != config_hash(cfg):
            raise ConfigError(f"output_dir {str(out)!r} holds a run with a different config (differs in: "
                              f"{', '.join(config_difference(state, cfg)) or 'details'}); "
                              "use another output_dir or overwrite=true")
        if state.get("finished"):
            if not (where / METRICS).exists():
                raise ConfigError(f"{where / STATE} says finished but {METRICS} is missing; "
                                  "pass overwrite=true to run it again")
            plan = Plan(out, "finished", state)
        else:
            plan = Plan(out, "resume", state)
    if plan.action != "finished":
        why = _writable(out)
        if why:
            raise ConfigError(f"output_dir {str(out)!r} is not writable: {why}; nothing was run")
        for name in (STATE, MATRIX, CHECKPOINT):
            f = out / name
            if f.exists() and not os.access(f, os.W_OK):
                raise ConfigError(f"{f} is read-only; make the run folder writable or use another output_dir")
        if is_rank_zero():
            owner = RunLock(out / LOCK).live_owner()
            if owner:
                raise ConfigError(f"output_dir {str(out)!r} is in use by {owner}; wait for it to end or stop it")
    return plan


def preflight(cfg, out: Optional[Path] = None) -> Plan:
    """Every check ``fit`` and ``sweep`` make before building anything (one-line
    ConfigError for the first problem): the method on this stream, trainer settings this
    machine can honour, the stream's data, and the run directory (see :func:`plan_run`)."""
    check_method(cfg)
    check_trainer_config(cfg)
    from .check_data import require_data

    require_data(cfg)  # real streams: every domain's files present before any work
    return plan_run(cfg, Path(out) if out is not None else output_dir(cfg))


def read_checkpoint(cfg, out: Path) -> Optional[dict]:
    """The checkpoint of the last finished task (None when there is none)."""
    import torch

    path = Path(out) / CHECKPOINT
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}); use overwrite=true to start over") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != cfg.method.name or ckpt.get("stream") != cfg.stream.name:
        got = ckpt if isinstance(ckpt, dict) else {}
        raise ConfigError(f"checkpoint {path} is from method {got.get('method')!r} on stream "
                          f"{got.get('stream')!r}, not {cfg.method.name!r} on {cfg.stream.name!r}")
    return ckpt


def _first_missing(path: Path) -> Optional[Path]:
    """The highest folder of ``path`` and its parents that does not exist yet (None: it exists)."""
    missing = None
    while not path.exists():
        missing = path
        if path.parent == path:
            break
        path = path.parent
    return missing


# ---- writing a run ------------------------------------------------------------------------------
class RunDir:
    """The context in which a run writes into ``plan.out`` (rank 0 only; other DDP ranks
    write nothing): creates the folder, locks it, undoes a replacement that never finished
    a task, moves a run being replaced aside (``.replaced/``), and on the way out releases
    the lock, puts the replaced run back when the new one failed before finishing a task,
    and removes a folder it created that stayed empty."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.out = plan.out
        self.lock = RunLock(self.out / LOCK)
        self.created: Optional[Path] = None  # the highest folder this run created (out or a parent)
        self.active = is_rank_zero()

    def __enter__(self) -> "RunDir":
        if not self.active:
            return self
        try:
            self.created = _first_missing(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output_dir {str(self.out)!r} cannot be created: {e.strerror or e}") from None
        try:
            self.lock.__enter__()
            self._recover()
            if self.plan.action == "replace":
                self._move_aside()
        except BaseException:
            self.lock.release()
            self._remove_if_empty()
            raise
        return self

    def _recover(self) -> None:
        """A replacement that never finished a task is undone (its row 0 is worth nothing)."""
        aside = self.out / REPLACED
        if aside.is_dir() and _done(_safe_state(self.out)) < 1:
            self._clear(self.out)
            for p in aside.iterdir():
                os.replace(p, self.out / p.name)
            aside.rmdir()

    def _move_aside(self) -> None:
        aside = self.out / REPLACED
        aside.mkdir()
        for name in RUN_FILES:
            if (self.out / name).exists():
                os.replace(self.out / name, aside / name)

    @staticmethod
    def _clear(folder: Path) -> None:
        for name in RUN_FILES:
            p = folder / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        (folder / f"{CHECKPOINT}.tmp").unlink(missing_ok=True)

    def task_done(self, completed: int) -> None:
        """After a task's files are written: the replaced run (if any) can go now."""
        if self.active and completed >= 1 and (self.out / REPLACED).exists():
            shutil.rmtree(self.out / REPLACED, ignore_errors=True)

    def _remove_if_empty(self) -> None:
        """Remove ``out`` and the parents this run created, as long as they are empty."""
        if self.created is None:
            return
        folder = self.out
        with contextlib.suppress(OSError):
            while True:
                folder.rmdir()
                if folder == self.created or folder.parent == folder:
                    break
                folder = folder.parent

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.active:
            return
        try:
            if exc_type is not None:
                self._recover()
        finally:
            self.lock.release()
            self._remove_if_empty()


def say_replaced(out: Path) -> str:
    return f"the previous run in {out} is kept in {REPLACED}/ until this one finishes its first task"


# ---- stopping a run -----------------------------------------------------------------------------
_deferred: list[int] = []
_defer_depth = [0]


def _raise_interrupt(signum, frame) -> None:
    if _defer_depth[0]:
        _deferred.append(signum)
        return
    raise RunInterrupted(signum)


@contextlib.contextmanager
def interruptible():
    """Within the block SIGINT and SIGTERM raise :class:`RunInterrupted` (Lightning keeps
    and calls this handler while it trains; it would turn a ``KeyboardInterrupt`` into
    ``exit(1)`` and a SIGTERM into a clean ``exit(0)``). Outside the main thread: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, _raise_interrupt)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def uninterrupted():
    """Hold SIGINT/SIGTERM until the block (writing a task's files) is done."""
    _defer_depth[0] += 1
    try:
        yield
    finally:
        _defer_depth[0] -= 1
        if not _defer_depth[0] and _deferred:
            signum = _deferred[0]
            _deferred.clear()
            raise RunInterrupted(signum)
