"""Where a sweep's grid points run: ``launcher=local workers=N`` or ``launcher=slurm``.

``sweep`` plans the grid (``sweep.plan_sweep``: configs, run directories, finished points)
and hands the points that are not finished to a launcher:

- **sequential** (default, no ``launcher=``): one after another in the sweep's process
  (``sweep.run_sweep``).
- **local** (``launcher=local workers=N``, ``conf/launcher/local.yaml``): N points at once,
  each a ``python -m moram_bench fit`` child with its own share of the machine: with GPUs,
  worker ``i`` sees GPU ``gpus[i % len(gpus)]`` only (``CUDA_VISIBLE_DEVICES``); without,
  the usable cores are split evenly (``trainer.num_threads`` and ``OMP_NUM_THREADS`` of each
  child, unless the sweep sets ``trainer.num_threads``). Each child's output goes to
  ``RESULTS/sweeps/logs/<point>.log``; the sweep prints the same start / finished / ETA
  lines and failure summary as the sequential sweep. SIGINT/SIGTERM stop the children the
  same way (each saves its finished tasks) and the sweep exits 130/143.
- **slurm** (``launcher=slurm``, ``conf/launcher/slurm.yaml``, through ``submitit``): one
  SLURM job array, one array task per point, resources from the config (partition, time,
  GPUs and CPUs per run, memory, account/qos/constraint and any other sbatch option under
  ``additional``, shell ``setup`` lines). It prints the job id and the log folder and
  returns. Each array task runs :class:`FitJob`, which runs the point in-process with
  ``runner.run`` (with ``trainer.devices=N`` the array task has N SLURM tasks, one per GPU,
  and Lightning takes its ranks from SLURM).

Preemption and time limits use **submitit's checkpointing**: SLURM sends ``USR2``
``signal_delay_s`` seconds before the time limit (and on preemption where the cluster
sends it); submitit then calls :meth:`FitJob.checkpoint`, which returns the same job, and
requeues it (at most ``max_requeues`` times for time limits). The requeued job resumes the
run through the runner's own resume path: after the last finished task, whose checkpoint
the runner writes atomically at the end of every task (the task in progress is redone).
Lightning's own SLURM auto-requeue is not used (it would save Lightning checkpoints the
runner does not read). Running the same ``sweep ... launcher=slurm`` again submits only the
points that are neither finished nor queued/running.

``sweep --status`` prints, per point, ``finished``, ``running``, ``queued``, ``failed``
(with the last line of its log), ``interrupted`` (k of T tasks saved, nothing running) or
``not started``, from the run directories, the run locks and the launchers' records
(``RESULTS/sweeps/launcher-*.json``; SLURM job states from ``sacct`` through submitit).
"""
from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, RunInterrupted

LAUNCHERS = ("sequential", "local", "slurm")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "launcher"
RECORD_GLOB = "launcher-*.json"


# ---- configuration -------------------------------------------------------------------------------
def split_launcher_args(overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """Take ``launcher=NAME``, ``workers=N`` and ``launcher.<key>=value`` out of a sweep's
    arguments; returns ``(launcher config, the fit overrides)``. ConfigError (one line)
    for an unknown launcher or key."""
    name, rest, keys = "sequential", [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key == "launcher":
            name = value
        elif key == "workers" or key.startswith("launcher."):
            keys.append((key[len("launcher."):] if key.startswith("launcher.") else key, value))
        else:
            rest.append(item)
    if name not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {name!r}; choose one of {', '.join(LAUNCHERS)}")
    path = CONF_DIR / f"{name}.yaml"
    cfg = OmegaConf.load(path) if path.exists() else OmegaConf.create({})
    cfg.name = name
    for key, value in keys:
        if key not in cfg:
            known = ", ".join(k for k in cfg if k != "name") or "none"
            raise ConfigError(f"launcher {name} has no setting {key!r} (settings: {known})")
        try:
            parsed = OmegaConf.from_dotlist([f"v={value}"]).v
        except Exception:
            parsed = value
        OmegaConf.update(cfg, key, parsed, merge=False)
    if name == "local" and (not isinstance(cfg.workers, int) or cfg.workers < 1):
        raise ConfigError(f"workers must be a positive integer (got {cfg.workers!r})")
    return cfg, rest


def fit_command(point, config_file: Optional[str] = None, extra: tuple = ()) -> list[str]:
    """``python -m moram_bench fit ... output_dir=<point dir>`` for one grid point."""
    cmd = [sys.executable, "-m", "moram_bench", "fit"]
    if config_file:
        cmd += ["--config", str(config_file)]
    cmd += [o for o in point.overrides if not o.startswith("output_dir=")] + list(extra) + [f"output_dir={point.out}"]
    return cmd


def _safe_name(point) -> str:
    return f"{point.index + 1:03d}-" + re.sub(r"[^A-Za-z0-9._=+-]+", "_", str(point.out)).strip("_")[-120:]


def _write_record(root: Path, kind: str, key: str, data: dict) -> Path:
    from . import results_io

    path = root / "sweeps" / f"launcher-{kind}-{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results_io.atomic_write_json(path, data)
    return path


def _last_line(path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ---- local: N fit children at once ---------------------------------------------------------------
def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() != ""]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # pragma: no cover
        return []


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def worker_env(slot: int, workers: int, gpus: list[str], threads: Optional[int]) -> dict:
    """The environment of the child in worker ``slot``: its GPU, or its share of the cores."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_local(points, lcfg: DictConfig, *, results: Path, config_file: Optional[str] = None,
              echo: Callable[[str], None] = print, log_path: Optional[Path] = None, argv=()) -> int:
    """Run the points that are not finished, ``lcfg.workers`` at a time; returns the exit
    code (0, 1 when a point failed, 130/143 when interrupted)."""
    from .sweep import _fmt_duration, _log, summarize

    workers = int(lcfg.workers)
    gpus = visible_gpus() if lcfg.get("gpus") is None else [str(g) for g in lcfg.gpus]
    user_threads = any(o.startswith("trainer.num_threads=") for p in points for o in p.overrides)
    threads = None if gpus else int(lcfg.get("threads_per_worker") or max(1, usable_cores() // workers))
    extra = () if (user_threads or threads is None) else (f"trainer.num_threads={threads}",)
    logs = results / "sweeps" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    total = len(points)
    todo = [p for p in points if p.state not in ("finished", "running")]
    for p in points:
        if p.state in ("finished", "running"):
            p.result = "skipped"
            why = "already finished" if p.state == "finished" else "running in another process"
            echo(f"[{p.index + 1}/{total}] {p.label}: {why} in {p.out}, skipped")
    share = f"GPU {', '.join(gpus)} round-robin" if gpus else f"{threads if threads else 'own'} threads each"
    echo(f"local launcher: {len(todo)} run(s), {workers} at a time ({share}); logs in {logs}")
    record = {"launcher": "local", "host": os.uname().nodename, "points": {}}
    record_key = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    lock = threading.Lock()
    procs: dict[int, subprocess.Popen] = {}
    durations: list[float] = []
    stop: list[int] = []
    free: "queue.Queue[int]" = queue.Queue()
    for s in range(workers):
        free.put(s)

    def one(p, slot: int) -> None:
        head = f"[{p.index + 1}/{total}] {p.label}"
        log = logs / f"{_safe_name(p)}.log"
        with lock:
            if stop:
                return
            remaining = sum(1 for q in todo if q.result == "pending")
            eta = (f", ETA {_fmt_duration(remaining * sum(durations) / len(durations) / workers)}" if durations else "")
            how = {"resume": "resuming, " + p.progress, "replace": "replacing the earlier run"}.get(p.state, "starting")
            where = f"GPU {gpus[slot % len(gpus)]}" if gpus else f"worker {slot + 1}"
            echo(f"{head} ... ({how}; {p.out}; {where}; elapsed {_fmt_duration(time.time() - started)}{eta})")
            p.result = "running"
            t0 = time.time()
            with open(log, "ab") as fh:
                proc = subprocess.Popen(fit_command(p, config_file, extra), stdout=fh, stderr=subprocess.STDOUT,
                                        env=worker_env(slot, workers, gpus, threads), start_new_session=True)
            procs[p.index] = proc
            record["points"][str(p.out)] = {"index": p.index, "pid": proc.pid, "log": str(log)}
            _write_record(results, "local", record_key, record)
        code = proc.wait()
        with lock:
            p.seconds = time.time() - t0
            durations.append(p.seconds)
            procs.pop(p.index, None)
            if code == 0:
                p.result, verdict = "done", "finished"
            elif code in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM):
                p.result, p.error = "interrupted", _last_line(log)
                verdict = "INTERRUPTED"
            else:
                msg = _last_line(log)
                p.result = "failed"
                p.error = f"fit exited with code {code}" + (f": {msg[7:] if msg.startswith('error: ') else msg}" if msg else "")
                verdict = f"FAILED: {p.error} (log {log})"
            echo(f"{head}: {verdict} after {_fmt_duration(p.seconds)}")
            _log(points, log_path, list(argv), started)

    def worker_loop(items: "queue.Queue") -> None:
        while not stop:
            try:
                p = items.get_nowait()
            except queue.Empty:
                return
            slot = free.get()
            try:
                one(p, slot)
            finally:
                free.put(slot)

    items: "queue.Queue" = queue.Queue()
    for p in todo:
        items.put(p)
    threads_ = [threading.Thread(target=worker_loop, args=(items,), daemon=True) for _ in range(min(workers, len(todo)))]
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, frame):
        with lock:
            if not stop:
                stop.append(signum)
            for proc in procs.values():
                try:
                    proc.send_signal(signum)  # each child saves its finished tasks and exits 130/143
                except OSError:
                    pass

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for s in previous:
            signal.signal(s, on_signal)
    try:
        for t in threads_:
            t.start()
        for t in threads_:
            while t.is_alive():
                t.join(0.2)
    finally:
        if in_main:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    return summarize(points, started, log_path, argv, echo, signum=stop[0] if stop else None,
                     note=f", {workers} workers")


# ---- slurm through submitit ----------------------------------------------------------------------
class FitJob:
    """The job function of one grid point (SLURM array task, or submitit's local executor):
    ``runner.run`` of the point's config, in this process.

    ``checkpoint()`` is submitit's preemption / time-limit hook: it returns this same job,
    which submitit requeues; the requeued job resumes from the run directory's last finished
    task. ``attempt`` counts the starts (1, then 2 after a requeue...)."""

    def __init__(self, overrides: list[str], output_dir: str, config_file: Optional[str] = None):
        self.overrides = [o for o in overrides if not o.startswith("output_dir=")]
        self.output_dir = str(output_dir)
        self.config_file = config_file
        self.attempt = 0

    def __call__(self) -> dict:
        from .config import resolve_config
        from .runner import run

        self.attempt += 1
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        cfg = resolve_config(self.overrides + [f"output_dir={self.output_dir}"], self.config_file)
        run(cfg)
        return {"output_dir": self.output_dir, "attempt": self.attempt}

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"FitJob({' '.join(self.overrides)} output_dir={self.output_dir})"


def _require_submitit():
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ConfigError("launcher=slurm needs submitit: pip install 'moram_bench[cluster]'") from None
    import submitit

    return submitit


def slurm_parameters(lcfg: DictConfig, points) -> dict:
    """submitit ``SlurmExecutor.update_parameters`` arguments from the launcher config and
    the points (GPUs per run = ``trainer.devices`` of the points, one SLURM task per GPU)."""
    devices = {int(p.cfg.trainer.devices) if str(p.cfg.trainer.devices).isdigit() else 1 for p in points}
    if len(devices) > 1:
        raise ConfigError(f"launcher=slurm submits one job array: every point needs the same trainer.devices "
                          f"(got {sorted(devices)}); sweep them separately")
    gpus = lcfg.gpus_per_run if lcfg.gpus_per_run is not None else devices.pop() if devices else 1
    gpus = int(gpus)
    nodes = int(lcfg.nodes)
    params = {"job_name": str(lcfg.job_name), "time": int(lcfg.time_min), "nodes": nodes,
              "ntasks_per_node": max(1, gpus), "cpus_per_task": int(lcfg.cpus_per_task),
              "array_parallelism": int(lcfg.array_parallelism), "signal_delay_s": int(lcfg.signal_delay_s),
              "stderr_to_stdout": False}
    if gpus > 0:
        params["gpus_per_node"] = gpus
    if lcfg.mem_gb is not None:
        params["mem"] = f"{int(lcfg.mem_gb)}GB"
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if lcfg.get(key) is not None:
            params[key] = str(lcfg[key])
    if lcfg.get("setup"):
        params["setup"] = [str(s) for s in lcfg.setup]
    if lcfg.get("additional"):
        params["additional_parameters"] = {str(k): v for k, v in OmegaConf.to_container(lcfg.additional).items()}
    return params


def slurm_folder(lcfg: DictConfig, results: Path) -> Path:
    return Path(lcfg.folder) if lcfg.get("folder") else results / "slurm"


def submit_slurm(points, lcfg: DictConfig, *, results: Path, config_file: Optional[str] = None,
                 echo: Callable[[str], None] = print) -> int:
    """Submit the points that are neither finished nor queued/running as one job array."""
    submitit = _require_submitit()
    states = point_states(points, results)
    todo = [p for p in points if states[p.index][0] not in ("finished", "running", "queued")]
    skipped = [p for p in points if p not in todo]
    for p in skipped:
        echo(f"  [{p.index + 1}/{len(points)}] {p.label}: {states[p.index][0]}, not submitted")
    if not todo:
        echo("sweep: nothing to submit (every point is finished, queued or running); see sweep --status")
        return 0
    folder = slurm_folder(lcfg, results)
    try:
        executor = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=int(lcfg.max_requeues))
    except RuntimeError:  # submitit looks for srun
        raise ConfigError("launcher=slurm: no SLURM here (srun not found); run the sweep on the cluster's "
                          "login node, or use launcher=local workers=N") from None
    try:
        executor.update_parameters(**slurm_parameters(lcfg, todo))
    except ValueError as e:
        raise ConfigError(f"launcher=slurm: {str(e).splitlines()[0]}") from None
    try:
        with executor.batch():
            jobs = [executor.submit(FitJob(p.overrides, str(p.out), config_file)) for p in todo]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
        raise ConfigError(f"sbatch refused the job array: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
    array_id = str(jobs[0].job_id).split("_")[0]
    record = {"launcher": "slurm", "job_id": array_id, "folder": str(folder), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "points": {str(p.out): {"index": p.index, "job_id": str(j.job_id), "log": str(j.paths.stdout),
                                      "err": str(j.paths.stderr), "folder": str(j.paths.folder)}
                         for p, j in zip(todo, jobs)}}
    path = _write_record(results, "slurm", array_id, record)
    echo(f"submitted SLURM job array {array_id}: {len(todo)} array task(s) "
         f"({len(skipped)} point(s) finished, queued or running were not submitted)")
    echo(f"logs: {folder / array_id}_<task>/ (stdout {jobs[0].paths.stdout.name}); record {path}")
    echo("follow it with the same command and --status; run the same command again to resubmit unfinished points")
    return 0


# ---- status ------------------------------------------------------------------------------------------
def _records(results: Path) -> dict[str, dict]:
    """The latest launcher record of every run directory (by the record file's time)."""
    out: dict[str, dict] = {}
    files = sorted((results / "sweeps").glob(RECORD_GLOB), key=lambda f: f.stat().st_mtime)
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for d, rec in (data.get("points") or {}).items():
            out[os.path.normpath(os.path.abspath(d))] = {**rec, "launcher": data.get("launcher"),
                                                         "host": data.get("host")}
    return out


def slurm_state(job_id: str, folder: str) -> str:
    """SLURM's state of one array task through submitit (``sacct``); ``UNKNOWN`` when it
    cannot be asked (no SLURM here)."""
    try:
        import submitit

        return str(submitit.SlurmJob(folder=folder, job_id=job_id).state)
    except Exception:
        return "UNKNOWN"


QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESIZING", "PREEMPTED")
RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING")


def point_states(points, results: Path, job_state: Callable[[str, str], str] = slurm_state) -> dict[int, tuple[str, str]]:
    """``{point index: (status, detail)}`` with status one of finished / running / queued /
    failed / interrupted / not started."""
    from . import rundir

    recs = _records(Path(results))
    out = {}
    for p in points:
        try:
            state = rundir.read_state(p.out)
        except ConfigError:
            state = None
        done = int((state or {}).get("completed_tasks") or 0)
        total = (state or {}).get("num_tasks", "?")
        if state and state.get("finished"):
            out[p.index] = ("finished", str(p.out))
            continue
        rec = recs.get(os.path.normpath(os.path.abspath(p.out)))
        progress = f"{done}/{total} tasks saved" if state else "no task saved"
        owner = rundir.RunLock(Path(p.out) / rundir.LOCK).live_owner()
        if owner:
            out[p.index] = ("running", f"{progress}; {owner}")
            continue
        if rec and rec.get("launcher") == "slurm":
            s = job_state(rec["job_id"], rec.get("folder", ""))
            head = s.split()[0] if s else "UNKNOWN"
            if head in RUNNING:
                out[p.index] = ("running", f"job {rec['job_id']}; {progress}")
            elif head in QUEUED:
                out[p.index] = ("queued", f"job {rec['job_id']} {head.lower()}; {progress}")
            elif head == "COMPLETED":
                out[p.index] = ("failed", f"job {rec['job_id']} completed but the run is not finished: "
                                          f"{_last_line(rec.get('err', '')) or _last_line(rec.get('log', ''))}")
            elif head == "UNKNOWN":
                out[p.index] = ("interrupted" if state else "not started", f"job {rec['job_id']} state unknown "
                                                                           f"(no sacct here); {progress}")
            else:
                out[p.index] = ("failed", f"job {rec['job_id']} {head}: "
                                          f"{_last_line(rec.get('err', '')) or _last_line(rec.get('log', ''))}")
            continue
        if rec and rec.get("log"):  # the local launcher: the child's log tells how it ended
            last = _last_line(rec["log"])
            if "interrupted" in last.lower():
                out[p.index] = ("interrupted", f"{progress}; {last}")
            elif last.startswith("error:") or "Error" in last:
                out[p.index] = ("failed", last)
            else:
                out[p.index] = ("interrupted" if state else "not started", progress)
            continue
        out[p.index] = ("interrupted", progress) if state else ("not started", "")
    return out


def print_status(points, results: Path, echo: Callable[[str], None] = print,
                 job_state: Callable[[str, str], str] = slurm_state) -> int:
    """The ``sweep --status`` table; returns 0."""
    states = point_states(points, results, job_state)
    counts: dict[str, int] = {}
    for p in points:
        status, detail = states[p.index]
        counts[status] = counts.get(status, 0) + 1
        echo(f"  [{p.index + 1}/{len(points)}] {p.label}: {status}" + (f" ({detail})" if detail else ""))
    echo("status: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0
