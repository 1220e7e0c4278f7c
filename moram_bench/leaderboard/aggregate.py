"""Aggregating runs: finished runs grouped into tables (one protocol each) and rows (one
method under identical settings, one run per seed); per cell the mean and its 95 %
confidence interval over seeds; per column the best row and the rows tied with it.

Plain table work (grouping, means, sample stds, counts, the seed-by-row layout of the
paired test) is done with pandas; the keys that decide what is grouped, and the
statistics (:mod:`.stats`), are our own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from .reading import HIDDEN_PROTOCOL_KEYS, RunRecord, canon, comparable_config, short_value
from .references import references_for
from .stats import ALPHA, ci95, paired_t_test

__all__ = ["MetricSpec", "HEADLINE_METRICS", "STAT_KEYS", "COST_KEYS", "Row", "Table", "Leaderboard", "aggregate"]


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
        MetricSpec("plasticity", "Plasticity", "max"),
        MetricSpec("bwt", "BWT", "max"),
        MetricSpec("forgetting", "Forgetting", "min"),
    ),
    "text": (
        MetricSpec("last", "OP", "max"),
        MetricSpec("plasticity", "Plasticity", "max"),
        MetricSpec("bwt", "BWT", "max"),
        MetricSpec("bwt_trace_magnitude", "|BWT| (TRACE)", "min"),
    ),
}
# every metric a row keeps statistics of (the headline ones, and what the trade-off
# picture needs whatever the stream kind)
STAT_KEYS = tuple(dict.fromkeys([s.key for specs in HEADLINE_METRICS.values() for s in specs]
                                + ["plasticity", "forgetting"]))
COST_KEYS = ("trainable_params_per_task", "params_added", "train_seconds", "eval_seconds")


@dataclass
class Row:
    """One table row: the runs (one per seed) of one method under identical settings.

    Per metric key: ``mean``, sample ``std`` and ``ci`` (95 % CI half-width, Student t)
    over the seeds (``None`` where undefined: a single seed has no spread); ``best`` holds
    the keys in which the row has the column's best mean, ``tied_best`` those in which it
    is the best or not significantly different from it (paired t-test, p >= 0.05; the
    p-value in ``p_vs_best``, ``None`` when untested). ``curve`` is the average accuracy
    over the tasks seen so far after each task ``t = 1..T``: ``(mean, ci)`` per task."""

    method: str
    label: str
    variant: dict[str, Any]
    fairness: dict[str, Any]
    seeds: list[Any]
    runs: list[RunRecord]
    mean: dict[str, Optional[float]]
    std: dict[str, Optional[float]]
    ci: dict[str, Optional[float]]
    costs: dict[str, Optional[float]]
    curve: list[tuple[Optional[float], Optional[float]]] = field(default_factory=list)
    reference: bool = False  # nothing trained: shown, never marked best
    best: set[str] = field(default_factory=set)
    tied_best: set[str] = field(default_factory=set)
    p_vs_best: dict[str, Optional[float]] = field(default_factory=dict)
    missing_seeds: list[Any] = field(default_factory=list)
    unfinished: list[RunRecord] = field(default_factory=list)
    config_key: str = ""
    key: str = ""  # the row's grouping key

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seconds_per_run(self) -> Optional[float]:
        """Mean wall-clock time of one run, training plus evaluation."""
        t, e = self.costs.get("train_seconds"), self.costs.get("eval_seconds")
        return None if t is None or e is None else t + e


@dataclass
class Table:
    """The rows measured under one protocol: the same stream, backbone, weights, stream
    settings and every other non-method setting (``setup``); ``distinct`` holds the
    setup keys in which this table differs from other tables of the same stream, and
    ``show_order`` is set when those tables train the tasks in different orders."""

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
    show_order: bool = False

    @property
    def title(self) -> str:
        if self.show_order and self.task_names:
            return f"{self.stream}, task order {' → '.join(self.task_names)}"
        return self.stream

    def describe(self) -> str:
        """One line: backbone, weights, task count and the protocol settings."""
        parts = [f"backbone {self.backbone} ({self.weights})" if self.weights else f"backbone {self.backbone}",
                 f"{len(self.task_names)} tasks ({', '.join(self.task_names)})" if self.task_names else ""]
        # a null cap (max_train, max_test, ...) means "no cap": say "all", not "None"
        parts += [f"{k.replace('_', ' ')}: {'all' if v is None and k.startswith('max_') else short_value(v)}"
                  for k, v in self.protocol.items() if k not in HIDDEN_PROTOCOL_KEYS]
        for k, v in self.distinct.items():
            if k.startswith("stream.") and k[len("stream."):] in self.protocol:
                continue  # shown above
            if self.show_order and isinstance(v, (list, tuple)) and [str(x) for x in v] == self.task_names:
                continue  # the task order, in the title
            parts.append(f"{k}={'default' if v is None else short_value(v, 32)}")
        return "; ".join(p for p in parts if p)

    @property
    def trains_through_eval_transform(self) -> bool:
        """The stream says (``train_transform``) that training images go through the
        evaluation transform, i.e. no training augmentation."""
        v = self.protocol.get("train_transform")
        return isinstance(v, str) and bool(re.search(r"eval|test", v, re.I))


@dataclass
class Leaderboard:
    """Everything the renderers need: the tables and the runs left out of them."""

    tables: list[Table]
    problems: list[RunRecord]
    num_runs: int


def _variant_labels(rows: list[Row], configs: dict[str, dict[str, Any]]) -> None:
    """Label rows of the same method by the settings in which they differ."""
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    for group in by_method.values():
        name = group[0].label  # the method's display name, or its registry name
        if len(group) == 1:
            continue
        flat = [{**configs[r.config_key], **{f"fairness.{k}": v for k, v in r.fairness.items()}}
                for r in group]
        keys = sorted(set().union(*flat))
        differing = [k for k in keys if len({canon(f.get(k, "<unset>")) for f in flat}) > 1]
        for r, f in zip(group, flat):
            r.variant = {k: f.get(k) for k in differing}
            shown = [f"{re.sub(r'^(method|fairness)[.]', '', k)}={short_value(f.get(k), 24)}"
                     for k in differing[:4]]
            if len(differing) > 4:
                shown.append(f"+{len(differing) - 4} more")
            r.label = f"{name} ({', '.join(shown)})" if shown else name


def _seed_key(run: RunRecord) -> Any:
    # a string (pandas sorts the pivot's index); a run without a seed pairs with nothing
    return str(run.seed) if run.seed is not None else f"?{run.name}"


def _mark_best(table: Table, wide: dict[str, pd.DataFrame]) -> None:
    """Per column: the best mean among the rows that train something (at least two must
    compete), then a paired t-test of every other such row against it over their common
    seeds; p >= ALPHA marks the row tied with the best."""
    for spec in table.metrics:
        scored = [r for r in table.rows if not r.reference and r.mean.get(spec.key) is not None]
        if len(scored) < 2:
            continue
        sign = 1.0 if spec.better == "max" else -1.0
        top = max(sign * r.mean[spec.key] for r in scored)
        best = [r for r in scored if sign * r.mean[spec.key] >= top - 1e-9]
        for r in best:
            r.best.add(spec.key)
            r.tied_best.add(spec.key)
        values = wide[spec.key]
        for r in scored:
            if r in best:
                continue
            pair = values[[best[0].key, r.key]].dropna()
            p = paired_t_test(pair[best[0].key].tolist(), pair[r.key].tolist()) if len(pair) >= 2 else None
            r.p_vs_best[spec.key] = p
            if p is not None and p >= ALPHA:
                r.tied_best.add(spec.key)


def _avg_seen_curve(R: np.ndarray) -> list[float]:
    """Mean accuracy over the tasks seen so far after each task t = 1..T."""
    return [float(R[t, :t].mean()) for t in range(1, R.shape[1] + 1)]


def _opt(v: Any) -> Optional[float]:
    return None if v is None or pd.isna(v) else float(v)


def aggregate(runs: Sequence[RunRecord], references: bool = True) -> Leaderboard:
    """Group finished runs into tables and rows (see the package docstring for the keys),
    compute means, sample stds and 95 % CIs over seeds, mark the best and tied-best rows
    and collect every run that is not in a table (duplicates of a (settings, seed) pair
    included)."""
    problems = [r for r in runs if not r.finished]
    finished = sorted((r for r in runs if r.finished),
                      key=lambda r: (str(r.stream), str(r.method), r.seed or 0, str(r.path)))

    # 1. keys: which table and row each run belongs to; a second run of one (row, seed)
    #    is a duplicate and reported, never averaged twice
    groups: dict[str, dict[str, list[RunRecord]]] = {}
    for run in finished:
        tkey = canon([run.stream, run.modality, run.backbone, run.weights, run.protocol, run.setup])
        rkey = canon([tkey, run.method, run.config_key, run.fairness])
        group = groups.setdefault(tkey, {}).setdefault(rkey, [])
        dup = next((g for g in group if g.seed == run.seed), None)
        if dup is not None:
            run.status = "duplicate"
            run.reason = f"duplicate of {dup.name} (same settings and seed {run.seed}); not averaged twice"
            problems.append(run)
            continue
        group.append(run)

    # 2. one line per run, then means / stds / counts per row (pandas)
    records, curve_records = [], []
    for tkey, rows_of in groups.items():
        for rkey, group in rows_of.items():
            for run in group:
                rec = {"table": tkey, "row": rkey, "seed": _seed_key(run)}
                rec.update({k: run.metrics.get(k) for k in STAT_KEYS})
                rec.update({k: run.costs.get(k) for k in COST_KEYS})
                records.append(rec)
                curve_records += [{"row": rkey, "t": t, "avg_seen": v}
                                  for t, v in enumerate(_avg_seen_curve(run.matrix), 1)]
    columns = ["table", "row", "seed", *STAT_KEYS, *COST_KEYS]
    df = pd.DataFrame(records, columns=columns)
    value_cols = [*STAT_KEYS, *COST_KEYS]
    df[value_cols] = df[value_cols].apply(pd.to_numeric, errors="coerce")
    by_row = df.groupby("row", sort=False)[value_cols]
    means, stds, counts, sizes = by_row.mean(), by_row.std(ddof=1), by_row.count(), by_row.size()
    curves = pd.DataFrame(curve_records, columns=["row", "t", "avg_seen"]).groupby(["row", "t"])["avg_seen"]
    curve_stats = pd.DataFrame({"mean": curves.mean(), "std": curves.std(ddof=1), "n": curves.count()})

    def cell(frame: pd.DataFrame, rkey: str, col: str) -> Optional[float]:
        # a cell is defined only when every run of the row has the value
        return _opt(frame.at[rkey, col]) if counts.at[rkey, col] == sizes[rkey] else None

    # 3. rows and tables
    out_tables: list[Table] = []
    unmatched = [p for p in problems if p.status == "unfinished"]
    for tkey, rows_of in groups.items():
        first = next(iter(rows_of.values()))[0]
        specs = HEADLINE_METRICS.get(first.modality, HEADLINE_METRICS["image"])
        rows, configs = [], {}
        for rkey, group in rows_of.items():
            group.sort(key=lambda r: (r.seed if r.seed is not None else -1, str(r.path)))
            n = int(sizes[rkey])
            mean = {k: cell(means, rkey, k) for k in STAT_KEYS}
            std = {k: (cell(stds, rkey, k) if n > 1 else None) for k in STAT_KEYS}
            ci = {k: ci95(std[k], n) for k in STAT_KEYS}
            costs = {k: cell(means, rkey, k) for k in COST_KEYS}
            curve = [(_opt(c["mean"]), ci95(_opt(c["std"]), int(c["n"])))
                     for _, c in curve_stats.loc[rkey].iterrows()]
            head = group[0]
            trains = any((g.costs.get("trainable_params_per_task") or 0) > 0 for g in group)
            label = head.display_name or str(head.method)
            row = Row(method=str(head.method), label=label, variant={}, fairness=head.fairness,
                      seeds=[g.seed for g in group], runs=group, mean=mean, std=std, ci=ci, costs=costs,
                      curve=curve, reference=not trains, config_key=head.config_key, key=rkey)
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
        sub = df[df["table"] == tkey]
        _mark_best(table, {s.key: sub.pivot(index="seed", columns="row", values=s.key) for s in specs})
        out_tables.append(table)

    for stream in {t.stream for t in out_tables}:
        same = [t for t in out_tables if t.stream == stream]
        if len(same) > 1:
            keys = sorted(set().union(*(t.setup for t in same)))
            differing = [k for k in keys if len({canon(t.setup.get(k, "<unset>")) for t in same}) > 1]
            orders = {tuple(t.task_names) for t in same}
            for t in same:
                t.distinct = {k: t.setup.get(k) for k in differing}
                t.show_order = len(orders) > 1
    # per stream the main protocol first: the most runs, then the most rows, then the table
    # at default settings (fewest differing settings that are set), then a fixed order
    out_tables.sort(key=lambda t: (t.stream, -sum(r.n for r in t.rows), -len(t.rows),
                                   sum(v is not None for v in t.distinct.values()), t.backbone, t.weights,
                                   canon(t.protocol), canon(t.setup)))
    problems.sort(key=lambda r: str(r.path))
    return Leaderboard(tables=out_tables, problems=problems, num_runs=len(runs))
