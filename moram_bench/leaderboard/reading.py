"""Reading run directories: one :class:`RunRecord` per folder holding ``run_state.json``
or ``metrics.json``, and the keys that decide which runs may be averaged together.

Nothing here raises for bad contents: a run that is unfinished, unreadable or
inconsistent becomes a record with that ``status`` and a ``reason``, so that the
leaderboard can list it instead of dropping it.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import metrics as M
from .. import rundir
from ..results_io import read_matrix_csv

RUN_FILES = (rundir.STATE, rundir.METRICS)  # a run directory is a folder holding one of these

# Config keys (dotted; a trailing ".*" takes a whole sub-tree) left out of the key that
# decides which runs are averaged together, and the exceptions to those sub-trees: defined
# in rundir, beside the keys that may change between a run and its resumption.
IGNORED_CONFIG_KEYS = rundir.GROUPING_IGNORED_KEYS
KEPT_CONFIG_KEYS = rundir.GROUPING_KEPT_KEYS
# Stream settings (the stream's recorded ``settings``) that define the protocol: the data
# a method sees and how it is scored and prompted. Seed-dependent entries (``shot_seed``
# following the run's seed, ``data_seed``, ``subset_seed``) are deliberately not here.
STREAM_FAIRNESS_KEYS = (
    "protocol", "shots", "few_shot", "templates", "template", "label_space", "order", "task_order",
    "test", "max_test", "max_test_per_domain", "max_train", "domain_id_at_test",
    "chat_template", "system_prompt", "max_prompt_tokens", "max_answer_tokens", "truncation",
    "repetition_penalty", "no_repeat_ngram_size", "train_transform", "data_sha256",
)
HIDDEN_PROTOCOL_KEYS = ("data_sha256",)  # in the table key (same data), too long to print


# -------------------------------------------------------------------------- small helpers


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to ``{"a.b.c": value}``; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    return out


def _ignored(key: str) -> bool:
    if key in KEPT_CONFIG_KEYS:
        return False
    for pat in IGNORED_CONFIG_KEYS:
        if pat.endswith(".*"):
            if key.startswith(pat[:-1]):
                return True
        elif key == pat or key.startswith(pat + "."):
            return True
    return False


def comparable_config(config: dict) -> dict[str, Any]:
    """The flattened config without :data:`IGNORED_CONFIG_KEYS` (what must match for runs
    to be averaged together)."""
    return {k: v for k, v in sorted(flatten(config).items()) if not _ignored(k)}


def canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def _weights(backbone_cfg: Any) -> str:
    """A short description of the backbone's weights from its config: the fallback for
    runs whose metrics.json predates ``backbone_weights`` (the backbone's own description,
    preferred). ``init_seed`` alone says how the weights were seeded, not that they are
    random (mini-clip seeds its projections before aligning them)."""
    if not isinstance(backbone_cfg, dict):
        return ""
    for key in ("pretrained", "weights", "checkpoint", "model_id", "path"):
        v = backbone_cfg.get(key)
        if v not in (None, ""):
            s = str(v)
            return os.path.basename(s.rstrip("/\\")) or s
    if backbone_cfg.get("init_seed") is not None:
        return f"init_seed {backbone_cfg['init_seed']}"
    return "default"


def short_value(v: Any, width: int = 48) -> str:
    if isinstance(v, dict):
        if len(v) > 2:
            return f"{len(v)} values"
        return short_value([f"{k}: {x}" for k, x in v.items()], width)
    if isinstance(v, (list, tuple)):
        items = [str(x) for x in v]
        if len(items) > 3:
            return f"{len(items)} values"
        s = " / ".join(items)
    elif isinstance(v, bool):
        s = "on" if v else "off"
    else:
        s = str(v)
    return s if len(s) <= width else s[: width - 1] + "…"


def method_fairness(method_settings: Any) -> dict[str, Any]:
    """The fairness-relevant part of a run's ``method_settings``: every key containing
    ``voting`` (test-time batch voting) and the entries of a ``"fairness"`` mapping."""
    if not isinstance(method_settings, dict):
        return {}
    out = {k: v for k, v in method_settings.items() if "voting" in str(k).lower()}
    extra = method_settings.get("fairness")
    if isinstance(extra, dict):
        out.update(extra)
    return dict(sorted(out.items()))


def stream_fairness(stream_settings: Any) -> dict[str, Any]:
    """The protocol part of a stream's recorded ``settings`` (:data:`STREAM_FAIRNESS_KEYS`)."""
    if not isinstance(stream_settings, dict):
        return {}
    return {k: stream_settings[k] for k in STREAM_FAIRNESS_KEYS if k in stream_settings}



# ------------------------------------------------------------------------------- runs


@dataclass
class RunRecord:
    """One run directory as read from disk.

    ``status`` is ``"finished"`` (complete and consistent: it enters the tables),
    ``"unfinished"`` (in progress or interrupted: ``completed_tasks`` of ``num_tasks``),
    ``"unreadable"`` (missing, corrupt or inconsistent files) or ``"duplicate"`` (set by
    :func:`aggregate`: a second run with the same settings and seed); ``reason`` says why a
    run is not in the tables.
    """

    path: Path
    status: str
    reason: str = ""
    name: str = ""  # the path relative to the results folder (what the files show)
    method: Optional[str] = None
    display_name: Optional[str] = None  # a method's own row name (metrics.json ``display_name``)
    stream: Optional[str] = None
    seed: Optional[int] = None
    backbone: Optional[str] = None
    weights: str = ""
    modality: str = "image"
    num_tasks: Optional[int] = None
    completed_tasks: Optional[int] = None
    task_names: list[str] = field(default_factory=list)
    matrix: Optional[np.ndarray] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, Optional[float]] = field(default_factory=dict)
    stream_settings: dict[str, Any] = field(default_factory=dict)
    method_settings: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def config_key(self) -> str:
        """Canonical JSON of :func:`comparable_config` (stream, method and backbone included)."""
        return canon(comparable_config(self.config))

    @property
    def protocol(self) -> dict[str, Any]:
        return stream_fairness(self.stream_settings)

    @property
    def setup(self) -> dict[str, Any]:
        """The comparable config without the method's own sub-tree: stream, backbone,
        precision, ... (what every row of one table shares)."""
        return {k: v for k, v in comparable_config(self.config).items() if not k.startswith("method.")}

    @property
    def fairness(self) -> dict[str, Any]:
        return method_fairness(self.method_settings)

    @property
    def progress(self) -> str:
        if self.num_tasks is None:
            return "unknown"
        done = "?" if self.completed_tasks is None else str(self.completed_tasks)
        return f"{done}/{self.num_tasks} tasks"


def _read_json(path: Path) -> tuple[Optional[dict], str]:
    """``(data, problem)``: ``(None, "")`` when the file does not exist."""
    if not path.exists():
        return None, ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"{path.name} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(data, dict):
        return None, f"{path.name} does not hold a JSON object"
    return data, ""


def _as_int(v: Any) -> Optional[int]:
    try:
        return None if v is None or isinstance(v, bool) else int(v)
    except (TypeError, ValueError):
        return None


def _as_float(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_run(path: str | os.PathLike) -> RunRecord:
    """Read one run directory (never raises for bad contents: problems become the
    record's ``status`` and ``reason``)."""
    path = Path(path)
    state, state_problem = _read_json(path / rundir.STATE)
    met, met_problem = _read_json(path / rundir.METRICS)
    src = met or state or {}
    config = src.get("config") if isinstance(src.get("config"), dict) else {}
    if met is not None and not config and state and isinstance(state.get("config"), dict):
        config = state["config"]
    rec = RunRecord(path=path, status="unreadable", name=path.as_posix(), config=config)

    def pick(key: str) -> Any:
        for d in (met, state):
            if d and d.get(key) is not None:
                return d[key]
        return None

    def cfg_name(group: str) -> Optional[str]:
        node = config.get(group)
        return node.get("name") if isinstance(node, dict) else (node if isinstance(node, str) else None)

    rec.method = pick("method") or cfg_name("method")
    rec.stream = pick("stream") or cfg_name("stream")
    rec.backbone = (met or {}).get("backbone") or cfg_name("backbone")
    rec.weights = (met or {}).get("backbone_weights") or _weights(config.get("backbone"))
    rec.seed = _as_int(pick("seed") if pick("seed") is not None else config.get("seed"))
    stream_cfg = config.get("stream") if isinstance(config.get("stream"), dict) else {}
    rec.modality = str((met or {}).get("modality") or stream_cfg.get("modality") or "image")
    rec.num_tasks = _as_int(pick("num_tasks"))
    rec.completed_tasks = _as_int((state or {}).get("completed_tasks"))

    rows = names = None
    matrix_problem = ""
    if (path / rundir.MATRIX).exists():
        try:
            rows, names = read_matrix_csv(path / rundir.MATRIX)
        except ValueError as e:
            matrix_problem = f"matrix.csv is unreadable ({e})"
    else:
        matrix_problem = "matrix.csv is missing"
    if rows is not None:
        rec.task_names = names
        if rec.num_tasks is None:
            rec.num_tasks = len(names)
        if rec.completed_tasks is None:
            rec.completed_tasks = rows.shape[0] - 1
    if met is not None and isinstance(met.get("task_names"), list):
        rec.task_names = [str(n) for n in met["task_names"]]

    problems = [p for p in (state_problem, met_problem) if p]
    if problems:
        rec.reason = "; ".join(problems)
        return rec
    if state is not None and not state.get("finished"):
        rec.status = "unfinished"
        rec.reason = "run_state.json says unfinished (interrupted or still running)"
        return rec
    if met is None:
        rec.status = "unfinished"
        rec.reason = "metrics.json is missing (run_state.json says finished)" if state else "no metrics.json"
        return rec
    if not met.get("finished", False):
        rec.status = "unfinished"
        rec.reason = "metrics.json does not say finished"
        return rec
    try:
        R = M.validate_matrix(met.get("matrix"))
    except ValueError as e:
        rec.reason = f"metrics.json has no valid accuracy matrix ({e})"
        return rec
    T = R.shape[1]
    rec.num_tasks = T
    if matrix_problem:
        rec.reason = matrix_problem
        return rec
    if rows.shape[1] != T:
        rec.reason = f"matrix.csv has {rows.shape[1]} task columns, metrics.json {T}"
        return rec
    if rows.shape[0] < T + 1:
        rec.status = "unfinished"
        rec.completed_tasks = rows.shape[0] - 1
        rec.reason = f"matrix.csv has {rows.shape[0]} of T+1 = {T + 1} rows"
        return rec
    if float(np.max(np.abs(rows - R))) > 1e-3:  # matrix.csv keeps 4 decimals
        rec.reason = "matrix.csv and metrics.json hold different accuracy matrices"
        return rec

    rec.status = "finished"
    rec.completed_tasks = T
    rec.matrix = R
    rec.metrics = M.compute_all(R)
    per_task = met.get("trainable_params_per_task")
    if isinstance(per_task, list) and per_task:
        vals = [_as_float(v) for v in per_task]
        rec.costs["trainable_params_per_task"] = (None if any(v is None for v in vals)
                                                  else statistics.fmean(vals))
    else:
        rec.costs["trainable_params_per_task"] = _as_float(per_task)
    for key in ("params_added", "train_seconds", "eval_seconds"):
        rec.costs[key] = _as_float(met.get(key))
    rec.stream_settings = met.get("stream_settings") if isinstance(met.get("stream_settings"), dict) else {}
    rec.method_settings = met.get("method_settings") if isinstance(met.get("method_settings"), dict) else {}
    display = met.get("display_name") or rec.method_settings.get("display_name")
    rec.display_name = str(display) if display else None
    return rec


def run_dirs(root: Path) -> list[Path]:
    """Every run directory below ``root`` (a folder holding run_state.json or
    metrics.json; hidden folders and a run's own sub-folders are not searched)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(f in filenames for f in RUN_FILES):
            found.append(Path(dirpath))
            dirnames[:] = []  # a run's own sub-folders (tensorboard/) hold no runs
    return found


def collect_runs(root: str | os.PathLike) -> list[RunRecord]:
    """Every run directory below ``root`` (sorted by path), read with :func:`read_run`."""
    root = Path(root)
    records = []
    for d in run_dirs(root):
        rec = read_run(d)
        rec.name = d.relative_to(root).as_posix() if d != root else "."
        records.append(rec)
    return records

