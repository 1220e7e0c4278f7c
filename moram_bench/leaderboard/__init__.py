"""Leaderboards from run directories: ``python -m moram_bench leaderboard [RESULTS_DIR]``.

Reads every run directory below ``RESULTS_DIR`` (default ``results/``; a run directory is
any folder holding ``run_state.json`` or ``metrics.json``) and writes into ``RESULTS_DIR``:

- ``LEADERBOARD.md``: one table per stream (per *protocol*, see below), one row per method
  (and per setting variant), paper reference numbers below the tables of the real
  streams, a picture per stream, and a section listing every unfinished or unreadable run;
- ``leaderboard.csv``: the same rows, one per line, numbers unformatted, plus the paper
  and the unfinished rows (``status``);
- ``leaderboard.tex``: one booktabs ``table`` per stream table (``\\usepackage{booktabs}``);
- ``<stream>.png``: per stream, the average accuracy over the tasks seen so far after each
  task (one line per method with its confidence band) and plasticity against forgetting
  (one point per method with confidence intervals as error bars), one line of plots per
  table of the stream.

If ``RESULTS_DIR/README.md`` (or each ``--readme FILE``) contains the markers
``<!-- leaderboard:start -->`` and ``<!-- leaderboard:end -->``, the tables are also
written between them (files without the markers are left alone).

The package: :mod:`.reading` (run directories to :class:`RunRecord`), :mod:`.aggregate`
(records to tables and rows, statistics), :mod:`.stats` (confidence intervals and the
paired t-test), :mod:`.references` (the paper numbers, from ``references.yaml``),
:mod:`.render` (Markdown, CSV, LaTeX) and :mod:`.cli` (writing the files, the command).

What is averaged (never runs whose settings differ)
    A *row* averages the runs of one method whose settings are identical except for the
    seed: its key is the stream, the method, the backbone and its weights, the
    fairness-relevant settings (few-shot count, templates, label space, task order and
    training transform from the stream's recorded settings; test-time batch voting and
    anything a method lists under ``"fairness"`` in its ``method_settings``) and the whole
    resolved config minus the keys that cannot change results (seed, output and cache
    folders, the data folder, trainer and data-loader plumbing except
    ``trainer.precision``). Rows of one method that differ in any of these are separate
    rows labelled by what differs, e.g. ``moram (r=8)`` and ``moram (r=16)``. A row is
    named by the method's ``display_name`` when its metrics.json gives one (top level or
    in ``method_settings``), else by the method's registry name.

    A *table* holds the rows that share a stream, a backbone with its weights, the
    stream's fairness-relevant settings and every other setting outside the methods' own
    ``method.*`` sub-tree (iterations, batch size, precision, the domain order, ...):
    only numbers measured under one protocol are compared against each other. The heading
    states the protocol, the settings in which it differs from other tables of the same
    stream, the task order when the stream's tables differ in it, whether training goes
    through the evaluation transform, and how long the runs took.

Numbers
    Scores are on 0-100 and macro-averaged over tasks; every metric is recomputed from the
    run's accuracy matrix with :func:`moram_bench.metrics.compute_all` (``matrix.csv`` is
    checked against ``metrics.json``). A cell is the mean over the row's seeds ± the
    half-width of its 95 % confidence interval (Student t with n - 1 degrees of freedom);
    with a single seed the interval is unknown and shown as ``–`` (empty in the CSV).
    Headline metrics: image streams Last, Average (``mtil_avg``), Transfer, Avg.
    incremental, Plasticity, BWT, Forgetting; text streams OP (``last``), Plasticity, BWT
    and ``|BWT|`` of TRACE (``bwt_trace_magnitude``).

Best and tied-best per column
    The best mean (highest; lowest for Forgetting and TRACE's ``|BWT|``) among the rows
    that train something (a row whose runs have zero trainable parameters, e.g.
    ``zeroshot``, is a reference point), when at least two rows compete. Every other row
    is compared with the best row by a two-sided paired t-test over their common seeds;
    p >= 0.05 marks it tied with the best (``<metric>_tied_best`` true in the CSV, bold
    with ``≈`` in Markdown and LaTeX). Rows sharing fewer than two seeds with the best
    are not tested and not marked.

Cost columns (means over seeds): trainable parameters per task (mean over the tasks),
parameters added over the whole stream, training and evaluation wall-clock time.

Nothing is silently dropped: a run whose ``run_state.json`` says unfinished, whose
``matrix.csv`` has fewer than T+1 rows, or whose files are unreadable or inconsistent is
listed with its progress and the reason; a row also notes seeds that other rows of its
table have but it lacks, and unfinished runs that belong to it.

Function API: :func:`collect_runs` -> :func:`aggregate` -> :func:`render_markdown`,
:func:`render_csv`, :func:`render_latex`; :func:`write_leaderboard` does all of it;
:func:`main` is the CLI.
"""
from __future__ import annotations

from .aggregate import COST_KEYS, HEADLINE_METRICS, STAT_KEYS, Leaderboard, MetricSpec, Row, Table, aggregate
from .cli import OUTPUT_FILES, README_END, README_START, figure_name, main, update_readme, write_leaderboard
from .reading import (
    IGNORED_CONFIG_KEYS,
    RunRecord,
    collect_runs,
    comparable_config,
    method_fairness,
    read_run,
    stream_fairness,
)
from .references import load_references, references_for
from .render import CSV_COLUMNS, format_params, format_seconds, render_csv, render_latex, render_markdown, tex_escape
from .stats import ci95, paired_t_test, t_quantile

__all__ = [
    "MetricSpec", "HEADLINE_METRICS", "STAT_KEYS", "COST_KEYS", "IGNORED_CONFIG_KEYS", "CSV_COLUMNS",
    "OUTPUT_FILES", "README_START", "README_END",
    "RunRecord", "Row", "Table", "Leaderboard",
    "read_run", "collect_runs", "comparable_config", "method_fairness", "stream_fairness",
    "aggregate", "load_references", "references_for", "ci95", "paired_t_test", "t_quantile",
    "render_markdown", "render_csv", "render_latex", "format_params", "format_seconds", "tex_escape",
    "figure_name", "update_readme", "write_leaderboard", "main",
]
