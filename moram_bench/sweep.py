"""Sweeps: ``python -m moram_bench sweep method=a,b stream=s seed=0,1,2 [key=v1,v2 ...]``.

Every ``key=value`` argument is a ``fit`` override; a comma-separated value (commas inside
brackets, braces or quotes do not count) makes that key an axis of the grid, and the grid
is the product of the axes in command-line order, e.g. ``method=moram,seq-lora seed=0,1``
runs moram seed 0, moram seed 1, seq-lora seed 0, seq-lora seed 1.

Before anything runs, every grid point's config is resolved and checked (unknown names or
keys, wrong types, impossible hyper-parameters, a method that cannot run on the stream,
trainer settings this machine cannot honour, two points writing to one directory,
directories holding a run with another config): any problem ends the sweep with one line
``error: ...`` and exit code 2.

Each point runs into its own directory: ``RESULTS/runs/<stream>/<method>/seed<seed>``
(``RESULTS`` is ``--results DIR``, default ``results``, so a default sweep writes exactly
where ``fit`` would). Axes other than method, stream and seed add a folder named by their
values (``.../moram/r=8/seed0``); an explicit ``output_dir=`` (swept too, e.g.
``output_dir=a,b``, when the grid has several points) replaces the scheme. A point whose directory holds a finished run with the
same config is skipped; an unfinished one resumes after its last finished task (the
runner's own resume), so an interrupted sweep run again continues where it stopped.

Points run one after another. In-process (``runner.run``; per-run state is rebuilt by the
runner: seeds, threads, a fresh module and Trainers) unless a point asks for more than one
process (``trainer.strategy`` other than auto/single_device, ``trainer.devices`` other
than 1, or ``trainer.num_nodes > 1``): Lightning's DDP launcher re-executes the command
line, so such points, or all points with ``--subprocess``, run as ``python -m moram_bench
fit ...`` child processes. A failed point is reported and the sweep goes on; the summary
at the end lists the failures and the exit code is 1 (0 when every point finished or was
already finished). SIGINT or SIGTERM stops the sweep: the running point saves its finished
tasks (a ``fit`` child is sent the same signal), the summary and the log are written, and
the exit code is 130 or 143. A JSON log of the sweep is kept (and locked while the sweep
runs) in ``RESULTS/sweeps/``. The checks before a run and the directory rules are those of
``fit`` (``moram_bench.rundir``).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import results_io
from . import rundir
from .config import resolve_config
from .errors import ConfigError, RunInterrupted

__all__ = ["GridPoint", "split_values", "expand_grid", "needs_subprocess", "plan_sweep", "run_sweep",
           "run_in_process", "run_subprocess", "SubprocessFailed", "main"]

NAMED_AXES = ("method", "stream", "seed")
USAGE_ERROR = 2


@dataclass
class GridPoint:
    """One run of the sweep.

    ``overrides``: the ``key=value`` list of this point (what ``fit`` would get);
    ``axes``: the values of the keys that vary over the grid; ``state``: ``"new"``,
    ``"resume"`` (an unfinished run with the same config), ``"replace"`` (overwrite=true
    over an earlier run) or ``"finished"`` (skipped); after running, ``result`` is
    ``"done"``, ``"skipped"``, ``"failed"`` or ``"interrupted"`` (``error`` says why) and
    ``seconds`` its wall time.
    """

    index: int
    overrides: list[str]
    axes: dict[str, str]
    cfg: object = None
    out: Optional[Path] = None
    state: str = "new"
    result: str = "pending"
    error: str = ""
    seconds: float = 0.0
    progress: str = ""

    @property
    def label(self) -> str:
        """``moram on xtail-mini seed 2`` plus the other swept values in parentheses."""
        c = self.cfg
        text = f"{c.method.name} on {c.stream.name} seed {c.seed}"
        extra = {k: v for k, v in self.axes.items() if k not in NAMED_AXES}
        return text + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")


# ------------------------------------------------------------------------------ the grid


def split_values(text: str) -> list[str]:
    """Split ``text`` on the commas that are not inside ``[]``, ``{}``, ``()`` or quotes.

    ``"a,b"`` -> ``["a", "b"]``; ``"[1,2],[3]"`` -> ``["[1,2]", "[3]"]``;
    ``"'x, y',z"`` -> ``["'x, y'", "z"]``. Surrounding blanks are stripped.
    """
    parts, buf, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf).strip())
    return parts


def expand_grid(overrides: list[str]) -> list[tuple[list[str], dict[str, str]]]:
    """The grid of a sweep's overrides: a list of ``(overrides of the point, axes)``.

    A key given twice keeps its last value (as in ``fit``). Raises :class:`ConfigError`
    for an argument without ``=``, an empty value in a list, or a value listed twice.
    """
    values: dict[str, list[str]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"malformed override {item!r}: expected key=value or key=v1,v2,... "
                              "(e.g. method=moram,seq-lora seed=0,1,2)")
        vals = split_values(raw)
        if len(vals) > 1 and any(v == "" for v in vals):
            raise ConfigError(f"empty value in the list {item!r}")
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            raise ConfigError(f"{key} lists {dup[0]!r} twice in {item!r}")
        values.pop(key, None)  # re-inserted: a repeated key takes its last position and value
        values[key] = vals
    keys = list(values)
    swept = [k for k in keys if len(values[k]) > 1]
    grid = []
    for combo in itertools.product(*(values[k] for k in keys)):
        point = dict(zip(keys, combo))
        grid.append(([f"{k}={v}" for k, v in point.items()], {k: point[k] for k in swept}))
    return grid


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "_"


def _variant_folder(axes: dict[str, str]) -> Optional[str]:
    extra = [(k, v) for k, v in axes.items() if k not in NAMED_AXES]
    if not extra:
        return None
    return "_".join(_safe(f"{re.sub(r'^method[.]', '', k)}={v}") for k, v in extra)


def needs_subprocess(cfg) -> bool:
    """True when a run would start more than one process (Lightning's DDP launcher
    re-executes the command line, which must then be ``fit``, not the sweep)."""
    t = cfg.trainer
    strategy = str(t.strategy).lower()
    return not (strategy in ("auto", "single_device") and str(t.devices) == "1" and int(t.num_nodes) == 1)


def plan_sweep(overrides: list[str], config_file: Optional[str] = None,
               results: Optional[str] = None, running_ok: bool = False) -> list[GridPoint]:
    """Expand, resolve and check every grid point; decide its directory and state
    (``running_ok``: a run directory locked by a live run gets state ``"running"``
    instead of an error; ``--status`` and launchers use it).

    Raises :class:`ConfigError` (one line) for the first problem, naming the grid point.
    """
    grid = expand_grid(overrides)
    points: list[GridPoint] = []
    for i, (ovr, axes) in enumerate(grid):
        where = f" (grid point {i + 1} of {len(grid)}: {' '.join(f'{k}={v}' for k, v in axes.items())})" if axes else ""
        try:
            cfg = resolve_config(ovr, config_file)
            rundir.check_method(cfg)
            rundir.check_trainer_config(cfg)
        except ConfigError as e:
            raise ConfigError(f"{e}{where}") from None
        if cfg.output_dir and results is not None:
            raise ConfigError("give either output_dir=... or --results DIR, not both")
        out = rundir.output_dir(cfg, results, _variant_folder(axes))
        cfg.output_dir = str(out)
        points.append(GridPoint(index=i, overrides=ovr, axes=axes, cfg=cfg, out=Path(out)))

    seen: dict[str, GridPoint] = {}
    for p in points:
        key = os.path.normpath(os.path.abspath(p.out))
        if key in seen:
            raise ConfigError(f"grid points {seen[key].index + 1} and {p.index + 1} would both write to {p.out}; "
                              "leave output_dir unset (each run then gets its own folder under --results)")
        seen[key] = p
    conflicts = []
    for p in points:
        if running_ok and rundir.RunLock(Path(p.out) / rundir.LOCK).live_owner():
            p.state = "running"
            continue
        try:
            plan = rundir.preflight(p.cfg, p.out)  # data, the run directory, its lock
        except ConfigError as e:
            conflicts.append(str(e))
            continue
        p.state = plan.action
        if plan.action == "resume":
            p.progress = plan.progress
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise ConfigError(f"{conflicts[0]}{more}; for a new sweep use --results DIR")
    return points


# ---------------------------------------------------------------------------- running


def _fmt_duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def run_in_process(point: GridPoint) -> None:
    """Run one point with :func:`moram_bench.runner.run` in this process (raises on failure)."""
    from .runner import run

    try:
        run(point.cfg)
    finally:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - cleanup only
            pass


class SubprocessFailed(RuntimeError):
    """A ``python -m moram_bench fit`` child exited with a non-zero code."""


def run_subprocess(point: GridPoint, config_file: Optional[str] = None) -> None:
    """Run one point as ``python -m moram_bench fit ... output_dir=...`` (stdout passes
    through; stderr is echoed and its last line kept for the failure message)."""
    cmd = [sys.executable, "-m", "moram_bench", "fit"]
    if config_file:
        cmd += ["--config", config_file]
    cmd += [o for o in point.overrides if not o.startswith("output_dir=")] + [f"output_dir={point.out}"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    last: list[str] = []

    def pump() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                last[:] = [line.strip()]

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        code = proc.wait()
    except (KeyboardInterrupt, RunInterrupted) as e:  # stop the child the same way; it saves its tasks
        proc.send_signal(getattr(e, "signum", signal.SIGINT))
        proc.wait()
        raise
    t.join()
    signum = -code if code < 0 else code - 128 if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) else 0
    if signum in (signal.SIGINT, signal.SIGTERM):
        msg = last[0] if last else ""
        raise RunInterrupted(signum, msg[len("error: "):] if msg.startswith("error: ") else msg)
    if code != 0:
        msg = last[0] if last else ""
        msg = msg[len("error: "):] if msg.startswith("error: ") else msg
        raise SubprocessFailed(f"fit exited with code {code}" + (f": {msg}" if msg else ""))


def _log(points: list[GridPoint], path: Optional[Path], argv: list[str], started: float) -> None:
    if path is None:
        return
    try:
        results_io.atomic_write_json(path, {
            "command": "python -m moram_bench sweep " + " ".join(argv), "started": time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.localtime(started)), "elapsed_seconds": round(time.time() - started, 1),
            "points": [{"overrides": p.overrides, "output_dir": str(p.out), "state_before": p.state,
                        "result": p.result, "seconds": round(p.seconds, 1), "error": p.error} for p in points]})
    except OSError:
        pass  # the log is a convenience; never fail a sweep over it


def run_sweep(points: list[GridPoint], *, config_file: Optional[str] = None, force_subprocess: bool = False,
              log_path: Optional[Path] = None, argv: Optional[list[str]] = None,
              runner: Optional[Callable[[GridPoint], None]] = None, echo: Callable[[str], None] = print) -> int:
    """Run the planned points one after another; returns the exit code: 0, 1 (a point
    failed), 130 or 143 (interrupted by SIGINT / SIGTERM: the summary and the log are
    written, the interrupted point is counted as interrupted, the rest as not started).

    ``runner`` replaces the per-point execution (tests); by default a point runs in-process
    or as a subprocess (see the module docstring). The log file is locked while the sweep
    runs (``<log>.lock``)."""
    lock = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        lock = rundir.RunLock(Path(log_path).with_suffix(".lock"))
        lock.acquire()
    try:
        with rundir.interruptible():
            return _run_points(points, config_file, force_subprocess, log_path, argv or [], runner, echo)
    finally:
        if lock is not None:
            lock.release()


def _run_points(points, config_file, force_subprocess, log_path, argv, runner, echo) -> int:
    started = time.time()
    total = len(points)
    todo = [p for p in points if p.state != "finished"]
    durations: list[float] = []
    stopped = None
    for p in points:
        head = f"[{p.index + 1}/{total}] {p.label}"
        if p.state == "finished":
            p.result = "skipped"
            echo(f"{head}: already finished in {p.out}, skipped")
            continue
        remaining = sum(1 for q in todo if q.result == "pending")
        eta = (f", ETA {_fmt_duration(remaining * sum(durations) / len(durations))}" if durations
               else "")
        sub = force_subprocess or needs_subprocess(p.cfg)
        how = {"resume": "resuming, " + p.progress, "replace": "replacing the earlier run"}.get(p.state, "starting")
        echo(f"{head} ... ({how}; {p.out}; {'subprocess' if sub else 'in-process'}; "
             f"elapsed {_fmt_duration(time.time() - started)}{eta})")
        t0 = time.time()
        try:
            if runner is not None:
                runner(p)
            elif sub:
                run_subprocess(p, config_file)
            else:
                run_in_process(p)
            p.result = "done"
        except (KeyboardInterrupt, RunInterrupted) as e:
            stopped = e if isinstance(e, RunInterrupted) else RunInterrupted(signal.SIGINT)
            p.result, p.error = "interrupted", str(stopped)
        except Exception as e:  # a failed point never stops the sweep
            p.result = "failed"
            first = str(e).splitlines()[0] if str(e) else ""
            p.error = f"{type(e).__name__}: {first}" if first else type(e).__name__
            expected = isinstance(e, (ConfigError, SubprocessFailed)) or type(e).__name__ in (
                "NonFiniteLossError", "MisconfigurationException")
            if not expected:
                traceback.print_exc()
        p.seconds = time.time() - t0
        durations.append(p.seconds)
        verdict = {"done": "finished", "interrupted": "INTERRUPTED: " + p.error}.get(p.result, "FAILED: " + p.error)
        echo(f"{head}: {verdict} after {_fmt_duration(p.seconds)}")
        _log(points, log_path, argv, started)
        if stopped is not None:
            break

    return summarize(points, started, log_path, argv, echo, signum=stopped.signum if stopped else None)


def summarize(points: list[GridPoint], started: float, log_path: Optional[Path], argv: list[str],
              echo: Callable[[str], None], signum: Optional[int] = None, note: str = "") -> int:
    """The end of a sweep (any launcher): the counts, the failures, the log; returns the
    exit code (128 + ``signum`` when a signal stopped it, 1 when a point failed, else 0)."""
    count = {r: [p for p in points if p.result == r] for r in ("done", "skipped", "failed", "interrupted", "pending")}
    echo(f"\nsweep: {len(count['done'])} run(s) finished now, {len(count['skipped'])} already finished, "
         f"{len(count['failed'])} failed"
         + (f", {len(count['interrupted'])} interrupted" if count["interrupted"] else "")
         + (f", {len(count['pending'])} not started" if count["pending"] else "")
         + f" ({_fmt_duration(time.time() - started)}{note})")
    for p in count["failed"]:
        echo(f"  FAILED [{p.index + 1}/{len(points)}] {p.label}: {p.error} ({p.out})")
    _log(points, log_path, list(argv), started)
    if signum is not None:
        echo(f"interrupted by {signal.Signals(signum).name}: run the same sweep again to continue "
             "(finished runs are skipped, interrupted ones resume after their last finished task)")
        return 128 + int(signum)
    return 1 if count["failed"] else 0


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry: ``python -m moram_bench sweep [--results DIR] [--config FILE]
    [--subprocess] [--dry-run] key=v1,v2 ...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m moram_bench sweep",
        description="Run a grid of fits one after another, skipping finished runs "
                    "(e.g. method=moram,seq-lora stream=xtail-mini seed=0,1,2).")
    parser.add_argument("overrides", nargs="*", help="key=value or key=v1,v2,... (a comma list is a grid axis)")
    parser.add_argument("--results", default=None, help="root of the run directories: DIR/runs/<stream>/<method>/seed<seed> "
                                                        "(default: results)")
    parser.add_argument("--config", default=None, help="a YAML file merged over the defaults for every run")
    parser.add_argument("--subprocess", action="store_true", help="run every point as a `fit` child process")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and each run's state, run nothing")
    parser.add_argument("--status", action="store_true", help="per point: finished/running/queued/failed/interrupted")
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from . import launchers  # launcher=local workers=N | launcher=slurm (moram_bench/launchers.py)

    try:
        launch, args.overrides = launchers.split_launcher_args(args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    if not args.overrides:
        print("error: nothing to sweep; e.g. python -m moram_bench sweep method=moram,seq-lora seed=0,1,2",
              file=sys.stderr)
        return USAGE_ERROR
    try:
        points = plan_sweep(args.overrides, args.config, args.results,
                            running_ok=args.status or launch.name != "sequential")
    except (ConfigError, FileNotFoundError) as e:  # StreamError is a ConfigError
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    root = Path(args.results or "results")
    if args.status:
        return launchers.print_status(points, root, echo=lambda s: print(s, flush=True))
    n_fin = sum(p.state == "finished" for p in points)
    n_res = sum(p.state == "resume" for p in points)
    n_rep = sum(p.state == "replace" for p in points)
    print(f"sweep: {len(points)} run(s): {len(points) - n_fin - n_res - n_rep} new, {n_res} to resume, "
          + (f"{n_rep} to replace, " if n_rep else "") + f"{n_fin} already finished", flush=True)
    if args.dry_run:
        for p in points:
            print(f"  [{p.index + 1}/{len(points)}] {p.label}: {p.state}"
                  + (f" ({p.progress})" if p.progress else "") + f" -> {p.out}")
        return 0
    log_path = root / "sweeps" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    if launch.name == "slurm":
        try:
            return launchers.submit_slurm(points, launch, results=root, config_file=args.config,
                                          echo=lambda s: print(s, flush=True))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return USAGE_ERROR
    if launch.name == "local":
        return launchers.run_local(points, launch, results=root, config_file=args.config, log_path=log_path,
                                   argv=argv, echo=lambda s: print(s, flush=True))
    return run_sweep(points, config_file=args.config, force_subprocess=args.subprocess, log_path=log_path,
                     argv=argv, echo=lambda s: print(s, flush=True))
