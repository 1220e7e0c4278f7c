"""Leaderboards from run directories: ``python -m moram_bench leaderboard [RESULTS_DIR]``.

Reads every run directory below ``RESULTS_DIR`` (default ``results/``; a run directory is
any folder holding ``run_state.json`` or ``metrics.json``, see the README's "The run
directory") and writes three files into ``RESULTS_DIR``:

- ``LEADERBOARD.md``: one table per stream (per *protocol*, see below), one row per method
  (and per setting variant), then paper reference numbers for the real streams and a
  section listing every unfinished or unreadable run;
- ``leaderboard.csv``: the same rows, one per line, numbers unformatted (means, stds,
  which columns the row is best in), plus the paper and the unfinished rows (``status``);
- ``leaderboard.tex``: one booktabs ``table`` per stream table (``\\usepackage{booktabs}``).

If ``RESULTS_DIR/README.md`` (or each ``--readme FILE``) contains the markers
``<!-- leaderboard:start -->`` and ``<!-- leaderboard:end -->``, the tables are also
written between them (files without the markers are left alone).

What is averaged (never runs whose settings differ)
    A *row* averages the runs of one method whose settings are identical except for the
    seed: its key is the stream, the method, the backbone and its weights, the
    fairness-relevant settings (few-shot count, templates, label space, task order from
    the stream's recorded settings; test-time batch voting and anything a method lists
    under ``"fairness"`` in its ``method_settings``) and the whole resolved config minus
    the keys that cannot change results (:data:`IGNORED_CONFIG_KEYS`: seed, output and
    cache folders, the data folder, trainer and data-loader plumbing except
    ``trainer.precision``). Rows of one method that differ in any of these are separate
    rows labelled by what differs, e.g. ``moram (r=8)`` and ``moram (r=16)``.

    A *table* holds the rows that share a stream, a backbone with its weights, the
    stream's fairness-relevant settings and every other setting outside the methods' own
    ``method.*`` sub-tree (iterations, batch size, precision, ...): only numbers measured
    under one protocol are compared (and marked best) against each other. The table
    heading states the protocol, plus the settings in which it differs from other tables
    of the same stream.

Numbers
    Scores are on 0-100 and macro-averaged over tasks (PROTOCOLS.md); every metric is
    recomputed from the run's accuracy matrix with :func:`moram_bench.metrics.compute_all`
    (``matrix.csv`` is checked against ``metrics.json``). A cell is ``mean ± std`` over the
    row's seeds with the *sample* standard deviation (``ddof=1``); with a single seed the
    std is unknown and shown as ``–`` (empty in the CSV), never as 0. Headline metrics:
    image streams Last, Average (``mtil_avg``), Transfer, Avg. incremental, BWT,
    Forgetting; text streams OP (``last``), BWT and ``|BWT|`` of TRACE
    (``bwt_trace_magnitude``).

Best per column
    Bold (Markdown/LaTeX) or listed in the CSV ``best`` column: the highest mean for
    Last/Average/Transfer/Avg. incremental/BWT/FWT, the lowest for Forgetting and TRACE's
    ``|BWT|``. Means are compared at the printed precision (2 decimals), so printed ties
    are all marked. Only rows that train something compete (a row whose runs have zero
    trainable parameters, e.g. ``zeroshot``, is a reference point: it cannot forget), and
    a column is marked only when at least two rows compete.

Cost columns (means over seeds): trainable parameters per task (mean over the tasks),
parameters added over the whole stream, training and evaluation wall-clock time.

Nothing is silently dropped: a run whose ``run_state.json`` says unfinished, whose
``matrix.csv`` has fewer than T+1 rows, or whose files are unreadable or inconsistent is
listed with its progress and the reason; a row also notes seeds that other rows of its
table have but it lacks, and unfinished runs that belong to it.

Function API: :func:`collect_runs` -> :func:`aggregate` -> :func:`render_markdown`,
:func:`render_csv`, :func:`render_latex`; :func:`main` is the CLI.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from . import metrics as M

__all__ = [
    "MetricSpec",
    "HEADLINE_METRICS",
    "IGNORED_CONFIG_KEYS",
    "PAPER_REFERENCES",
    "RunRecord",
    "Row",
    "Table",
    "Leaderboard",
    "read_run",
    "collect_runs",
    "aggregate",
    "references_for",
    "render_markdown",
    "render_csv",
    "render_latex",
    "write_leaderboard",
    "main",
]

RUN_FILES = ("run_state.json", "metrics.json")
OUTPUT_FILES = ("LEADERBOARD.md", "leaderboard.csv", "leaderboard.tex")
README_START = "<!-- leaderboard:start -->"
README_END = "<!-- leaderboard:end -->"
DECIMALS = 2
MISSING = "–"  # shown for an unknown std (single seed) or an undefined metric


# ------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class MetricSpec:
    """A leaderboard column: the ``compute_all`` key, its printed label, and whether the
    best value is the maximum or the minimum."""

    key: str
    label: str
    better: str  # "max" or "min"


HEADLINE_METRICS: dict[str, tuple[MetricSpec, ...]] = {
    "image": (
        MetricSpec("last", "Last", "max"),
        MetricSpec("mtil_avg", "Average", "max"),
        MetricSpec("transfer", "Transfer", "max"),
        MetricSpec("avg_incremental", "Avg. incr.", "max"),
        MetricSpec("bwt", "BWT", "max"),
        MetricSpec("forgetting", "Forgetting", "min"),
    ),
    "text": (
        MetricSpec("last", "OP", "max"),
        MetricSpec("bwt", "BWT", "max"),
        MetricSpec("bwt_trace_magnitude", "|BWT| (TRACE)", "min"),
    ),
}
ALL_METRIC_KEYS = tuple(dict.fromkeys(s.key for specs in HEADLINE_METRICS.values() for s in specs))
COST_KEYS = ("trainable_params_per_task", "params_added", "train_seconds", "eval_seconds")
COST_LABELS = {"trainable_params_per_task": "Trainable / task", "params_added": "Params added",
               "train_seconds": "Train time", "eval_seconds": "Eval time"}

# Config keys (dotted; a trailing ".*" takes a whole sub-tree) that never change results:
# they are left out of the key that decides which runs are averaged together.
IGNORED_CONFIG_KEYS = (
    "seed", "output_dir", "overwrite", "cache_dir", "data_dir", "plugins",
    "trainer.*", "data.*", "backbone.cache_dir",
)
KEPT_CONFIG_KEYS = ("trainer.precision",)  # exceptions to the sub-trees above
# Stream settings (the stream's recorded ``settings``) that define the protocol.
# Stream settings (the stream's recorded ``settings``) that define the protocol: the data
# a method sees and how it is scored and prompted. Seed-dependent entries (``shot_seed``
# following the run's seed, ``data_seed``, ``subset_seed``) are deliberately not here.
STREAM_FAIRNESS_KEYS = (
    "protocol", "shots", "few_shot", "templates", "template", "label_space", "order", "task_order",
    "test", "max_test", "max_test_per_domain", "max_train", "domain_id_at_test",
    "chat_template", "system_prompt", "max_prompt_tokens", "max_answer_tokens", "truncation",
    "repetition_penalty", "no_repeat_ngram_size", "data_sha256",
)
HIDDEN_PROTOCOL_KEYS = ("data_sha256",)  # in the table key (same data), too long to print


# ---------------------------------------------------------------- paper reference numbers

# PROTOCOLS.md, "Reference results (anchors)". Values on 0-100; TRACE's BWT is reported
# as the magnitude of the clipped BWT (our ``bwt_trace_magnitude``).
PAPER_REFERENCES: dict[str, dict[str, Any]] = {
    "xtail": {
        "title": "X-TAIL (10 domains, 16-shot), as reported",
        "rows": [
            ("MoE-Adapter", "ViT-B/16", {"transfer": 56.0, "mtil_avg": 63.0, "last": 70.5}),
            ("RAIL-Primal", "ViT-B/16", {"transfer": 62.4, "mtil_avg": 70.7, "last": 79.1}),
            ("CoDyRA", "ViT-B/16", {"transfer": 63.2, "mtil_avg": 71.3, "last": 79.2}),
            ("MoRAM", "ViT-B/16", {"transfer": 63.3, "mtil_avg": 72.7, "last": 80.9}),
        ],
    },
    "mtil": {
        "title": "MTIL order I (11 domains, full-shot), as reported",
        "rows": [
            ("Zero-shot CLIP", "ViT-B/16", {"transfer": 69.4, "mtil_avg": 65.3, "last": 65.3}),
            ("MoE-Adapters", "ViT-B/16", {"transfer": 68.9, "mtil_avg": 76.7, "last": 85.0}),
        ],
    },
    "trace": {
        "title": "TRACE (8 tasks), as reported: OP and |BWT| (clipped, magnitude)",
        "rows": [
            ("O-LoRA", "LLaMA-2-7B-Chat", {"last": 42.78, "bwt_trace_magnitude": 7.16}),
            ("TreeLoRA", "LLaMA-2-7B-Chat", {"last": 43.52, "bwt_trace_magnitude": 3.46}),
            ("MoRAM", "LLaMA-2-7B-Chat", {"last": 44.54, "bwt_trace_magnitude": 1.37}),
            ("O-LoRA", "Gemma-2B-it", {"last": 33.73, "bwt_trace_magnitude": 12.36}),
            ("TreeLoRA", "Gemma-2B-it", {"last": 33.41, "bwt_trace_magnitude": 8.50}),
            ("MoRAM", "Gemma-2B-it", {"last": 36.27, "bwt_trace_magnitude": 2.74}),
            ("O-LoRA", "LLaMA-3.2-1B-Instruct", {"last": 32.94, "bwt_trace_magnitude": 12.89}),
            ("TreeLoRA", "LLaMA-3.2-1B-Instruct", {"last": 36.14, "bwt_trace_magnitude": 7.36}),
            ("MoRAM", "LLaMA-3.2-1B-Instruct", {"last": 37.77, "bwt_trace_magnitude": 3.12}),
        ],
    },
}


def references_for(stream: str) -> Optional[dict[str, Any]]:
    """The paper anchors for a real stream name (``xtail``, ``x-tail``, ``mtil``,
    ``mtil-i``, ``trace``, ...), or ``None`` (embedded, synthetic and other streams)."""
    norm = re.sub(r"[^a-z0-9]", "", stream.lower())
    if any(word in norm for word in ("mini", "tiny", "synthetic", "toy")):
        return None
    if norm.startswith("xtail"):
        return PAPER_REFERENCES["xtail"]
    if norm.startswith("mtil") and norm[4:] in ("", "1", "i", "order1", "orderi"):
        return PAPER_REFERENCES["mtil"]
    if norm.startswith("trace"):
        return PAPER_REFERENCES["trace"]
    return None


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


def _canon(obj: Any) -> str:
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


def _short_value(v: Any, width: int = 48) -> str:
    if isinstance(v, dict):
        if len(v) > 2:
            return f"{len(v)} values"
        return _short_value([f"{k}: {x}" for k, x in v.items()], width)
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
        return _canon(comparable_config(self.config))

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
    state, state_problem = _read_json(path / "run_state.json")
    met, met_problem = _read_json(path / "metrics.json")
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
    if (path / "matrix.csv").exists():
        try:
            rows, names = M.read_matrix_csv(path / "matrix.csv")
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
    return rec


def _run_dirs(root: Path) -> list[Path]:
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
    for d in _run_dirs(root):
        rec = read_run(d)
        rec.name = d.relative_to(root).as_posix() if d != root else "."
        records.append(rec)
    return records


# ------------------------------------------------------------------------- aggregation


@dataclass
class Row:
    """One table row: the runs (one per seed) of one method under identical settings."""

    method: str
    label: str
    variant: dict[str, Any]
    fairness: dict[str, Any]
    seeds: list[int]
    runs: list[RunRecord]
    mean: dict[str, Optional[float]]
    std: dict[str, Optional[float]]
    costs: dict[str, Optional[float]]
    reference: bool = False  # nothing trained: shown, never marked best
    best: set[str] = field(default_factory=set)
    missing_seeds: list[int] = field(default_factory=list)
    unfinished: list[RunRecord] = field(default_factory=list)
    config_key: str = ""

    @property
    def n(self) -> int:
        return len(self.runs)


@dataclass
class Table:
    """The rows measured under one protocol: the same stream, backbone, weights, stream
    settings and every other non-method setting (``setup``); ``distinct`` holds the
    setup keys in which this table differs from other tables of the same stream."""

    stream: str
    modality: str
    backbone: str
    weights: str
    protocol: dict[str, Any]
    task_names: list[str]
    metrics: tuple[MetricSpec, ...]
    rows: list[Row]
    references: Optional[dict[str, Any]] = None
    setup: dict[str, Any] = field(default_factory=dict)
    distinct: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.stream

    def describe(self) -> str:
        """One line: backbone, weights, task count and the protocol settings."""
        parts = [f"backbone {self.backbone} ({self.weights})" if self.weights else f"backbone {self.backbone}",
                 f"{len(self.task_names)} tasks ({', '.join(self.task_names)})" if self.task_names else ""]
        # a null cap (max_train, max_test, ...) means "no cap": say "all", not "None"
        parts += [f"{k.replace('_', ' ')}: {'all' if v is None and k.startswith('max_') else _short_value(v)}"
                  for k, v in self.protocol.items() if k not in HIDDEN_PROTOCOL_KEYS]
        parts += [f"{k}={_short_value(v, 32)}" for k, v in self.distinct.items()
                  if not (k.startswith("stream.") and k[len("stream."):] in self.protocol)]
        return "; ".join(p for p in parts if p)


@dataclass
class Leaderboard:
    """Everything the renderers need: the tables and the runs left out of them."""

    tables: list[Table]
    problems: list[RunRecord]
    num_runs: int


def _stats(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    vals = [v for v in values if v is not None]
    if not vals or len(vals) != len(values):
        return None, None
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return mean, std


def _variant_labels(rows: list[Row], configs: dict[str, dict[str, Any]]) -> None:
    """Label rows of the same method by the settings in which they differ."""
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    for method, group in by_method.items():
        if len(group) == 1:
            group[0].label = method
            continue
        flat = [{**configs[r.config_key], **{f"fairness.{k}": v for k, v in r.fairness.items()}}
                for r in group]
        keys = sorted(set().union(*flat))
        differing = [k for k in keys if len({_canon(f.get(k, "<unset>")) for f in flat}) > 1]
        for r, f in zip(group, flat):
            r.variant = {k: f.get(k) for k in differing}
            shown = [f"{re.sub(r'^(method|fairness)[.]', '', k)}={_short_value(f.get(k), 24)}"
                     for k in differing[:4]]
            if len(differing) > 4:
                shown.append(f"+{len(differing) - 4} more")
            r.label = f"{method} ({', '.join(shown)})" if shown else method


def _mark_best(table: Table) -> None:
    contenders = [r for r in table.rows if not r.reference]
    for spec in table.metrics:
        scored = [(round(r.mean[spec.key], DECIMALS), r) for r in contenders if r.mean.get(spec.key) is not None]
        if len(scored) < 2:
            continue
        target = max(v for v, _ in scored) if spec.better == "max" else min(v for v, _ in scored)
        for v, r in scored:
            if v == target:
                r.best.add(spec.key)


def aggregate(runs: Sequence[RunRecord], references: bool = True) -> Leaderboard:
    """Group finished runs into tables and rows (see the module docstring for the keys),
    compute means and sample stds over seeds, mark the best values and collect every run
    that is not in a table (with duplicates of a (settings, seed) pair reported too)."""
    problems = [r for r in runs if not r.finished]
    finished = sorted((r for r in runs if r.finished), key=lambda r: (str(r.stream), str(r.method), r.seed or 0, str(r.path)))

    tables: dict[str, dict] = {}
    for run in finished:
        tkey = _canon([run.stream, run.modality, run.backbone, run.weights, run.protocol, run.setup])
        t = tables.setdefault(tkey, {"runs": {}, "first": run})
        rkey = _canon([run.method, run.config_key, run.fairness])
        group = t["runs"].setdefault(rkey, [])
        dup = next((g for g in group if g.seed == run.seed), None)
        if dup is not None:
            run.status = "duplicate"
            run.reason = f"duplicate of {dup.name} (same settings and seed {run.seed}); not averaged twice"
            problems.append(run)
            continue
        group.append(run)

    out_tables: list[Table] = []
    unmatched = [p for p in problems if p.status == "unfinished"]
    for tkey, t in tables.items():
        first: RunRecord = t["first"]
        specs = HEADLINE_METRICS.get(first.modality, HEADLINE_METRICS["image"])
        rows, configs = [], {}
        for rkey, group in t["runs"].items():
            group.sort(key=lambda r: (r.seed if r.seed is not None else -1, str(r.path)))
            mean, std = {}, {}
            for spec in specs:
                mean[spec.key], std[spec.key] = _stats([g.metrics.get(spec.key) for g in group])
            costs = {k: _stats([g.costs.get(k) for g in group])[0] for k in COST_KEYS}
            trains = any((g.costs.get("trainable_params_per_task") or 0) > 0 for g in group)
            head = group[0]
            row = Row(method=str(head.method), label=str(head.method), variant={}, fairness=head.fairness,
                      seeds=[g.seed for g in group], runs=group, mean=mean, std=std, costs=costs,
                      reference=not trains, config_key=head.config_key)
            configs[row.config_key] = comparable_config(head.config)
            rows.append(row)
        _variant_labels(rows, configs)
        rows.sort(key=lambda r: (not r.reference, r.method, r.label))  # reference rows first
        all_seeds = sorted({s for r in rows for s in r.seeds if s is not None})
        for r in rows:
            r.missing_seeds = [s for s in all_seeds if s not in r.seeds]
            for p in list(unmatched):
                if p.method == r.method and p.stream == first.stream and p.config_key == r.config_key:
                    r.unfinished.append(p)
                    unmatched.remove(p)
        table = Table(stream=str(first.stream), modality=first.modality, backbone=str(first.backbone),
                      weights=first.weights, protocol=first.protocol, task_names=first.task_names,
                      metrics=specs, rows=rows, setup=first.setup,
                      references=references_for(str(first.stream)) if references else None)
        _mark_best(table)
        out_tables.append(table)
    for stream in {t.stream for t in out_tables}:
        same = [t for t in out_tables if t.stream == stream]
        if len(same) > 1:
            keys = sorted(set().union(*(t.setup for t in same)))
            differing = [k for k in keys if len({_canon(t.setup.get(k, "<unset>")) for t in same}) > 1]
            for t in same:
                t.distinct = {k: t.setup.get(k) for k in differing}
    out_tables.sort(key=lambda t: (t.stream, t.backbone, t.weights, _canon(t.protocol), _canon(t.setup)))
    problems.sort(key=lambda r: str(r.path))
    return Leaderboard(tables=out_tables, problems=problems, num_runs=len(runs))


# --------------------------------------------------------------------------- formatting


def format_params(n: Optional[float]) -> str:
    """Parameter counts with 3 significant digits: ``0``, ``950``, ``12.3K``, ``1.23M``."""
    if n is None:
        return MISSING
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f}" if n == int(n) else f"{n:.1f}"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(n)  # pragma: no cover


def format_seconds(s: Optional[float]) -> str:
    """Wall-clock time: ``12.3 s`` below 2 min, ``4.5 min`` below 2 h, else ``3.1 h``."""
    if s is None:
        return MISSING
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _num(v: Optional[float]) -> str:
    return MISSING if v is None else f"{v:.{DECIMALS}f}"


def _seeds_note(row: Row) -> str:
    notes = []
    if row.missing_seeds:
        notes.append("missing seed" + ("s " if len(row.missing_seeds) > 1 else " ")
                     + ", ".join(map(str, row.missing_seeds)))
    if row.unfinished:
        notes.append(f"+{len(row.unfinished)} unfinished")
    return f"{row.n} ({'; '.join(notes)})" if notes else str(row.n)


def _cost_cell(key: str, v: Optional[float]) -> str:
    return format_seconds(v) if key.endswith("seconds") else format_params(v)


def _has_settings_column(table: Table) -> bool:
    return any(r.fairness for r in table.rows)


def _settings_text(row: Row) -> str:
    return ", ".join(f"{k.replace('_', ' ')}: {_short_value(v, 24)}" for k, v in row.fairness.items()) or MISSING


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def render_markdown(lb: Leaderboard, heading_level: int = 1, source: str = "results") -> str:
    """The leaderboard as Markdown: a heading, the notes, one table per protocol (with
    paper anchors below it for real streams) and the unfinished/unreadable runs."""
    h = "#" * heading_level
    lines = [f"{h} Leaderboard", "",
             f"Generated by `python -m moram_bench leaderboard {source}` from {lb.num_runs} run "
             f"director{'y' if lb.num_runs == 1 else 'ies'}. Scores on 0-100, macro-averaged over tasks "
             "(PROTOCOLS.md); each cell is mean ± sample std (ddof=1) over the seeds in the *Seeds* column "
             f"(`± {MISSING}`: a single seed). **Bold**: best of its column within the table (highest, "
             "lowest for Forgetting and |BWT| (TRACE)); rows that train nothing (zero-shot) are reference "
             "points and not marked. Runs are averaged only when every setting but the seed is identical; "
             "rows of one method that differ are labelled by what differs. Costs are means over seeds: "
             "trainable parameters per task, parameters added over the stream, training and evaluation "
             "wall-clock time.", ""]
    if not lb.tables:
        lines += ["No finished runs.", ""]
    for table in lb.tables:
        lines += [f"{h}# {table.title}", "", f"*{_md_escape(table.describe())}*", ""]
        for key, value in table.protocol.items():  # long settings in full, e.g. the templates
            if key in HIDDEN_PROTOCOL_KEYS or not isinstance(value, (dict, list, tuple)) or len(value) <= 3:
                continue
            items = ([f"{k}: {x}" for k, x in value.items()] if isinstance(value, dict) else [str(x) for x in value])
            lines += [f"{key.replace('_', ' ').capitalize()}: " + "; ".join(f"`{_md_escape(i)}`" for i in items), ""]
        settings_col = _has_settings_column(table)
        header = ["Method"] + (["Settings"] if settings_col else []) + ["Seeds"]
        header += [s.label for s in table.metrics] + [COST_LABELS[k] for k in COST_KEYS]
        lines.append("| " + " | ".join(_md_escape(c) for c in header) + " |")
        align = [":---"] + ([":---"] if settings_col else []) + [":---"] + ["---:"] * (len(table.metrics) + len(COST_KEYS))
        lines.append("| " + " | ".join(align) + " |")
        for row in table.rows:
            label = row.label + (" (reference)" if row.reference else "")
            cells = [_md_escape(label)] + ([_md_escape(_settings_text(row))] if settings_col else []) + [_seeds_note(row)]
            for spec in table.metrics:
                m, s = row.mean.get(spec.key), row.std.get(spec.key)
                if m is None:
                    cells.append(MISSING)
                    continue
                text = f"{_num(m)} ± {_num(s)}"
                cells.append(f"**{text}**" if spec.key in row.best else text)
            cells += [_cost_cell(k, row.costs.get(k)) for k in COST_KEYS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if table.references:
            ref = table.references
            keys = [s for s in table.metrics if any(s.key in vals for _, _, vals in ref["rows"])]
            lines += [f"Paper reference numbers ({ref['title']}; PROTOCOLS.md anchors, not measured here):", ""]
            lines.append("| Method | Backbone | " + " | ".join(_md_escape(s.label) for s in keys) + " |")
            lines.append("| :--- | :--- | " + " | ".join("---:" for _ in keys) + " |")
            for name, backbone, vals in ref["rows"]:
                lines.append(f"| {name} | {backbone} | " + " | ".join(_num(vals.get(s.key)) for s in keys) + " |")
            lines.append("")
    if lb.problems:
        lines += [f"{h}# Unfinished and unreadable runs", "",
                  "Not in the tables above (finish them by running the same command again; a sweep resumes them).", "",
                  "| Run directory | Method | Stream | Seed | Progress | Status | Reason |",
                  "| :--- | :--- | :--- | ---: | :--- | :--- | :--- |"]
        for p in lb.problems:
            lines.append(f"| `{_md_escape(p.name)}` | {_md_escape(p.method or '?')} | {_md_escape(p.stream or '?')} | "
                         f"{'?' if p.seed is None else p.seed} | {p.progress} | {p.status} | {_md_escape(p.reason)} |")
        lines.append("")
    return "\n".join(lines)


def _csv_num(v: Optional[float]) -> str:
    return "" if v is None else repr(round(float(v), 6))


CSV_COLUMNS = (
    ["status", "stream", "modality", "backbone", "weights", "protocol", "method", "label", "variant", "settings",
     "n_seeds", "seeds", "missing_seeds", "completed_tasks", "num_tasks"]
    + [f"{k}_{stat}" for k in ALL_METRIC_KEYS for stat in ("mean", "std")]
    + ["best", *COST_KEYS, "runs", "note"]
)


def render_csv(lb: Leaderboard) -> str:
    """One line per row (``status`` ``finished``), per paper anchor (``paper``) and per
    unfinished/unreadable run. Metric columns for every stream kind (empty where a
    stream does not report it); ``*_std`` empty for a single seed; ``best`` lists the
    metric keys the row is best in, separated by ``;``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for table in lb.tables:
        base = {"stream": table.stream, "modality": table.modality, "backbone": table.backbone,
                "weights": table.weights, "protocol": _canon(table.protocol) if table.protocol else ""}
        for row in table.rows:
            rec = dict(base, status="finished", method=row.method, label=row.label,
                       variant=_canon(row.variant) if row.variant else "",
                       settings=_canon(row.fairness) if row.fairness else "", n_seeds=row.n,
                       seeds=";".join(str(s) for s in row.seeds),
                       missing_seeds=";".join(str(s) for s in row.missing_seeds),
                       num_tasks=len(table.task_names), completed_tasks=len(table.task_names),
                       best=";".join(s.key for s in table.metrics if s.key in row.best),
                       runs=";".join(r.name for r in row.runs),
                       note=("reference: trains nothing" if row.reference else "")
                       + (f"; {len(row.unfinished)} unfinished run(s)" if row.unfinished else ""))
            for spec in table.metrics:
                rec[f"{spec.key}_mean"] = _csv_num(row.mean.get(spec.key))
                rec[f"{spec.key}_std"] = _csv_num(row.std.get(spec.key))
            for k in COST_KEYS:
                rec[k] = _csv_num(row.costs.get(k))
            w.writerow(rec)
        if table.references:
            for name, backbone, vals in table.references["rows"]:
                rec = dict(base, status="paper", method=name, label=name, backbone=backbone, weights="",
                           note=f"PROTOCOLS.md anchor: {table.references['title']}")
                for key, v in vals.items():
                    rec[f"{key}_mean"] = _csv_num(v)
                w.writerow(rec)
    for p in lb.problems:
        w.writerow({"status": p.status, "stream": p.stream or "", "modality": p.modality, "backbone": p.backbone or "",
                    "weights": p.weights, "method": p.method or "", "label": p.method or "",
                    "seeds": "" if p.seed is None else str(p.seed),
                    "completed_tasks": "" if p.completed_tasks is None else p.completed_tasks,
                    "num_tasks": "" if p.num_tasks is None else p.num_tasks,
                    "runs": p.name, "note": p.reason})
    return buf.getvalue()


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "–": "--", "…": r"\ldots{}", "±": r"$\pm$", "|": r"$|$"}


def tex_escape(s: Any) -> str:
    """Escape LaTeX's special characters in plain text."""
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(s))


def _tex_num(v: float) -> str:
    text = _num(v)
    return "$-$" + text[1:] if text.startswith("-") else text


def render_latex(lb: Leaderboard) -> str:
    """One booktabs ``table`` per leaderboard table (needs ``\\usepackage{booktabs}``);
    best means in ``\\textbf``; the paper anchors and unfinished runs as comments."""
    out = ["% Generated by `python -m moram_bench leaderboard`; requires \\usepackage{booktabs}.",
           "% Scores 0-100, macro-averaged over tasks; mean $\\pm$ sample std (ddof=1) over seeds, -- = single seed.",
           ""]
    for table in lb.tables:
        settings_col = _has_settings_column(table)
        ncols = 2 + int(settings_col) + len(table.metrics) + len(COST_KEYS)
        header = ["Method"] + (["Settings"] if settings_col else []) + ["Seeds"]
        header += [s.label for s in table.metrics] + [COST_LABELS[k] for k in COST_KEYS]
        out += ["\\begin{table}[t]", "\\centering", "\\small",
                f"\\caption{{{tex_escape(table.title)}: {tex_escape(table.describe().rstrip('.'))}.}}",
                "\\begin{tabular}{l" + ("l" if settings_col else "") + "r" + "r" * (ncols - 2 - int(settings_col)) + "}",
                "\\toprule",
                " & ".join(tex_escape(c) for c in header) + " \\\\",
                "\\midrule"]
        for row in table.rows:
            label = row.label + (" (reference)" if row.reference else "")
            cells = [tex_escape(label)] + ([tex_escape(_settings_text(row))] if settings_col else [])
            cells.append(tex_escape(_seeds_note(row)))
            for spec in table.metrics:
                m, s = row.mean.get(spec.key), row.std.get(spec.key)
                if m is None:
                    cells.append("--")
                    continue
                mean = _tex_num(m)
                mean = f"\\textbf{{{mean}}}" if spec.key in row.best else mean
                cells.append(f"{mean} $\\pm$ {'--' if s is None else _num(s)}")
            cells += [tex_escape(_cost_cell(k, row.costs.get(k))) for k in COST_KEYS]
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        if table.references:
            out.append(f"% Paper reference numbers ({tex_escape(table.references['title'])}):")
            for name, backbone, vals in table.references["rows"]:
                out.append("%   " + tex_escape(f"{name} ({backbone}): ")
                           + ", ".join(f"{k} {v:.2f}" for k, v in vals.items()))
        out.append("")
    for p in lb.problems:
        out.append(f"% not in the tables: {p.name} ({p.method}, {p.stream}, seed {p.seed}): "
                   f"{p.status}, {p.progress}, {p.reason}".replace("\n", " "))
    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------- writing


def update_readme(path: Path, body: str) -> bool:
    """Replace the text between the leaderboard markers of ``path``; ``False`` if the file
    or its markers are absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return False
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(README_START)] + "\n" + body.rstrip("\n") + "\n" + text[end:]
    if new != text:
        M.atomic_write_text(path, new)
    return True


def write_leaderboard(root: str | os.PathLike, references: bool = True,
                      readmes: Optional[Sequence[str | os.PathLike]] = None) -> tuple[Leaderboard, list[Path]]:
    """Collect, aggregate and write ``LEADERBOARD.md``, ``leaderboard.csv`` and
    ``leaderboard.tex`` into ``root``, and the tables into the marked block of each of
    ``readmes`` (default ``root/README.md``) that has the markers. Returns the
    leaderboard and the paths written."""
    root = Path(root)
    lb = aggregate(collect_runs(root), references=references)
    source = os.fspath(root)
    written = [M.atomic_write_text(root / "LEADERBOARD.md", render_markdown(lb, source=source)),
               M.atomic_write_text(root / "leaderboard.csv", render_csv(lb)),
               M.atomic_write_text(root / "leaderboard.tex", render_latex(lb))]
    block = render_markdown(lb, heading_level=3, source=source)
    for readme in (readmes if readmes is not None else [root / "README.md"]):
        if update_readme(Path(readme), block):
            written.append(Path(readme))
    return lb, written


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m moram_bench leaderboard [RESULTS_DIR] [--no-references] [--readme FILE ...]``.

    Exit codes: 0 written; 1 no run directories found (nothing written, so a committed
    leaderboard is never replaced by an empty one); 2 usage errors."""
    parser = argparse.ArgumentParser(prog="python -m moram_bench leaderboard",
                                     description="Write LEADERBOARD.md, leaderboard.csv and leaderboard.tex "
                                                 "from every run directory below RESULTS_DIR.")
    parser.add_argument("results", nargs="?", default="results", help="folder holding run directories (default: results)")
    parser.add_argument("--no-references", action="store_true", help="leave out the paper reference numbers")
    parser.add_argument("--readme", action="append", default=None, metavar="FILE",
                        help="a Markdown file whose leaderboard markers get the tables; repeatable "
                             "(default: RESULTS_DIR/README.md)")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0)
    root = Path(args.results)
    if not root.is_dir():
        print(f"error: results folder {str(root)!r} does not exist", file=sys.stderr)
        return 2
    if not _run_dirs(root):
        print(f"error: no run directories (run_state.json or metrics.json) below {str(root)!r}; nothing written",
              file=sys.stderr)
        return 1
    lb, written = write_leaderboard(root, references=not args.no_references, readmes=args.readme)
    n_rows = sum(len(t.rows) for t in lb.tables)
    n_runs = sum(r.n for t in lb.tables for r in t.rows)
    print(f"leaderboard: {len(lb.tables)} table(s), {n_rows} row(s) from {n_runs} finished run(s)"
          + (f"; {len(lb.problems)} run(s) not in the tables (unfinished or unreadable, listed)" if lb.problems else ""))
    for p in lb.problems:
        print(f"  not in the tables: {p.name}: {p.status}, {p.progress}: {p.reason}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
