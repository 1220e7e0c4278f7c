"""Rendering a :class:`~.aggregate.Leaderboard`: Markdown, CSV (one line per row, numbers
unformatted) and LaTeX (booktabs). No file I/O here."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import pandas as pd

from .aggregate import COST_KEYS, HEADLINE_METRICS, Leaderboard, Row, Table
from .reading import HIDDEN_PROTOCOL_KEYS, canon, short_value

__all__ = ["format_params", "format_seconds", "tex_escape", "render_markdown", "render_csv", "render_latex",
           "CSV_COLUMNS", "CSV_METRIC_KEYS"]

DECIMALS = 2
MISSING = "–"  # shown for an unknown interval (single seed) or an undefined metric
TIED = "≈"  # after a bold cell: tied with the column's best (not significantly different)
COST_LABELS = {"trainable_params_per_task": "Trainable / task", "params_added": "Params added",
               "train_seconds": "Train time", "eval_seconds": "Eval time"}

INTRO = (
    "Scores on 0-100, macro-averaged over tasks. Each cell is the mean over the row's seeds ± the "
    "half-width of its 95 % confidence interval (Student t with n − 1 degrees of freedom, n in the "
    f"*Seeds* column; `± {MISSING}`: a single seed, no interval). **Bold**: the best mean of its column "
    "within the table (highest; lowest for Forgetting and |BWT| (TRACE)) and, marked "
    f"{TIED}, every row tied with it: a two-sided paired t-test of the row against the best row over "
    "their common seeds finds no significant difference at the 5 % level (p ≥ 0.05), so the ranking "
    "between them is within the seed noise. Rows sharing fewer than two seeds with the best are not "
    "tested and not marked; rows that train nothing (zero-shot) are reference points and never marked. "
    "Plasticity: the mean over tasks of the accuracy on a task right after training it (the matrix "
    "diagonal); Forgetting is the stability side of the trade-off. Runs are averaged only when every "
    "setting but the seed is identical; rows of one method that differ are labelled by what differs. "
    "Costs are means over seeds: trainable parameters per task, parameters added over the stream, "
    "training and evaluation wall-clock time of one run.")


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
    return ", ".join(f"{k.replace('_', ' ')}: {short_value(v, 24)}" for k, v in row.fairness.items()) or MISSING


def _row_label(row: Row) -> str:
    return row.label + (" (reference)" if row.reference else "")


def _header(table: Table) -> list[str]:
    header = ["Method"] + (["Settings"] if _has_settings_column(table) else []) + ["Seeds"]
    return header + [s.label for s in table.metrics] + [COST_LABELS[k] for k in COST_KEYS]


def timing_line(table: Table) -> str:
    """How long the table's runs took: per row the mean wall time of one run (training +
    evaluation), and the total over every run of the table."""
    parts = [f"{_row_label(r)} {format_seconds(r.seconds_per_run)}" for r in table.rows]
    total = sum((g.costs.get("train_seconds") or 0.0) + (g.costs.get("eval_seconds") or 0.0)
                for r in table.rows for g in r.runs)
    n = sum(r.n for r in table.rows)
    whole = f"All {n} runs of this table: " if n != 1 else "The table's one run: "
    return (f"Time per run (training + evaluation, mean over seeds): {'; '.join(parts)}. "
            f"{whole}{format_seconds(total)}.")


def transform_line(table: Table) -> str:
    """A sentence when the stream trains through the evaluation transform ("" otherwise)."""
    if not table.trains_through_eval_transform:
        return ""
    return (f"Training images go through the evaluation transform (train transform: "
            f"{table.protocol['train_transform']}): no training augmentation.")


# ----------------------------------------------------------------------------- Markdown


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def _md_cell(row: Row, key: str) -> str:
    m = row.mean.get(key)
    if m is None:
        return MISSING
    text = f"{_num(m)} ± {_num(row.ci.get(key))}"
    if key in row.best:
        return f"**{text}**"
    return f"**{text}** {TIED}" if key in row.tied_best else text


def render_markdown(lb: Leaderboard, heading_level: int = 1, source: str = "results",
                    figures: Optional[Mapping[str, str]] = None) -> str:
    """The leaderboard as Markdown: a heading, the notes, one table per protocol (with
    paper anchors below it for real streams), the picture of each stream (``figures``:
    stream -> link) and the unfinished/unreadable runs."""
    h = "#" * heading_level
    lines = [f"{h} Leaderboard", "",
             f"Generated by `python -m moram_bench leaderboard {source}` from {lb.num_runs} run "
             f"director{'y' if lb.num_runs == 1 else 'ies'}. " + INTRO, ""]
    if not lb.tables:
        lines += ["No finished runs.", ""]
    pictured: set[str] = set()
    for table in lb.tables:
        lines += [f"{h}# {table.title}", "", f"*{_md_escape(table.describe())}*", ""]
        if transform_line(table):
            lines += [f"*{transform_line(table)}*", ""]
        for key, value in table.protocol.items():  # long settings in full, e.g. the templates
            if key in HIDDEN_PROTOCOL_KEYS or not isinstance(value, (dict, list, tuple)) or len(value) <= 3:
                continue
            items = ([f"{k}: {x}" for k, x in value.items()] if isinstance(value, dict) else [str(x) for x in value])
            lines += [f"{key.replace('_', ' ').capitalize()}: " + "; ".join(f"`{_md_escape(i)}`" for i in items), ""]
        lines += [_md_escape(timing_line(table)), ""]
        settings_col = _has_settings_column(table)
        header = _header(table)
        lines.append("| " + " | ".join(_md_escape(c) for c in header) + " |")
        lines.append("| " + " | ".join([":---"] * (len(header) - len(table.metrics) - len(COST_KEYS))
                                       + ["---:"] * (len(table.metrics) + len(COST_KEYS))) + " |")
        for row in table.rows:
            cells = [_md_escape(_row_label(row))] + ([_md_escape(_settings_text(row))] if settings_col else [])
            cells += [_seeds_note(row)] + [_md_cell(row, s.key) for s in table.metrics]
            cells += [_cost_cell(k, row.costs.get(k)) for k in COST_KEYS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if table.references:
            ref = table.references
            keys = [s for s in table.metrics if any(s.key in vals for _, _, vals in ref["rows"])]
            lines += [f"Paper reference numbers ({ref['title']}; not measured here):", ""]
            lines.append("| Method | Backbone | " + " | ".join(_md_escape(s.label) for s in keys) + " |")
            lines.append("| :--- | :--- | " + " | ".join("---:" for _ in keys) + " |")
            for name, backbone, vals in ref["rows"]:
                lines.append(f"| {name} | {backbone} | " + " | ".join(_num(vals.get(s.key)) for s in keys) + " |")
            lines.append("")
        if figures and table.stream in figures and table.stream not in pictured:
            pictured.add(table.stream)
            lines += [f"![{table.stream}: average accuracy over seen tasks after each task, and plasticity "
                      f"against forgetting, mean and 95 % CI over seeds]({figures[table.stream]})", ""]
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


# ---------------------------------------------------------------------------------- CSV


def _csv_num(v: Optional[float]) -> str:
    return "" if v is None else repr(round(float(v), 6))


CSV_METRIC_KEYS = tuple(dict.fromkeys(s.key for specs in HEADLINE_METRICS.values() for s in specs))
CSV_COLUMNS = (
    ["status", "stream", "modality", "backbone", "weights", "protocol", "task_order", "method", "label",
     "variant", "settings", "n_seeds", "seeds", "missing_seeds", "completed_tasks", "num_tasks"]
    + [f"{k}_{stat}" for k in CSV_METRIC_KEYS for stat in ("mean", "ci95", "tied_best", "std", "p_vs_best")]
    + ["best", *COST_KEYS, "runs", "note"]
)


def render_csv(lb: Leaderboard) -> str:
    """One line per row (``status`` ``finished``), per paper anchor (``paper``) and per
    unfinished/unreadable run. Per metric: ``<metric>_mean``, ``<metric>_ci95`` (95 % CI
    half-width, empty for a single seed), ``<metric>_tied_best`` (``true`` for the
    column's best and the rows not significantly different from it, else ``false``;
    empty where the column is not marked), ``<metric>_std`` and ``<metric>_p_vs_best``
    (the paired t-test's p-value, empty when untested); empty for metrics a stream does
    not report. ``best`` lists the metric keys in which the row has the best mean."""
    records: list[dict[str, Any]] = []
    for table in lb.tables:
        base = {"stream": table.stream, "modality": table.modality, "backbone": table.backbone,
                "weights": table.weights, "protocol": canon(table.protocol) if table.protocol else "",
                "task_order": ";".join(table.task_names)}
        for row in table.rows:
            rec = dict(base, status="finished", method=row.method, label=row.label,
                       variant=canon(row.variant) if row.variant else "",
                       settings=canon(row.fairness) if row.fairness else "", n_seeds=row.n,
                       seeds=";".join(str(s) for s in row.seeds),
                       missing_seeds=";".join(str(s) for s in row.missing_seeds),
                       num_tasks=len(table.task_names), completed_tasks=len(table.task_names),
                       best=";".join(s.key for s in table.metrics if s.key in row.best),
                       runs=";".join(r.name for r in row.runs),
                       note=("reference: trains nothing" if row.reference else "")
                       + (f"; {len(row.unfinished)} unfinished run(s)" if row.unfinished else ""))
            marked = {s.key for s in table.metrics for r in table.rows if s.key in r.best}
            for spec in table.metrics:
                k = spec.key
                rec[f"{k}_mean"] = _csv_num(row.mean.get(k))
                rec[f"{k}_ci95"] = _csv_num(row.ci.get(k))
                rec[f"{k}_std"] = _csv_num(row.std.get(k))
                rec[f"{k}_p_vs_best"] = _csv_num(row.p_vs_best.get(k))
                rec[f"{k}_tied_best"] = ("true" if k in row.tied_best else "false") if k in marked else ""
            for k in COST_KEYS:
                rec[k] = _csv_num(row.costs.get(k))
            records.append(rec)
        if table.references:
            for name, backbone, vals in table.references["rows"]:
                rec = dict(base, status="paper", method=name, label=name, backbone=backbone, weights="",
                           note=f"as reported: {table.references['title']}")
                rec.update({f"{key}_mean": _csv_num(v) for key, v in vals.items()})
                records.append(rec)
    for p in lb.problems:
        records.append({"status": p.status, "stream": p.stream or "", "modality": p.modality,
                        "backbone": p.backbone or "", "weights": p.weights, "method": p.method or "",
                        "label": p.method or "", "seeds": "" if p.seed is None else str(p.seed),
                        "completed_tasks": "" if p.completed_tasks is None else p.completed_tasks,
                        "num_tasks": "" if p.num_tasks is None else p.num_tasks, "runs": p.name, "note": p.reason})
    frame = pd.DataFrame([[rec.get(c, "") for c in CSV_COLUMNS] for rec in records], columns=CSV_COLUMNS)
    return frame.to_csv(index=False, lineterminator="\n")


# -------------------------------------------------------------------------------- LaTeX

_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "–": "--", "…": r"\ldots{}", "±": r"$\pm$", "|": r"$|$", "→": r"$\rightarrow$",
                "≈": r"$\approx$", "≥": r"$\geq$", "−": "-"}


def tex_escape(s: Any) -> str:
    """Escape LaTeX's special characters in plain text."""
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(s))


def _tex_num(v: float) -> str:
    text = _num(v)
    return "$-$" + text[1:] if text.startswith("-") else text


def _tex_cell(row: Row, key: str) -> str:
    m = row.mean.get(key)
    if m is None:
        return "--"
    ci = row.ci.get(key)
    mean = _tex_num(m)
    text = f"{mean} $\\pm$ {'--' if ci is None else _num(ci)}"
    if key in row.best:
        return f"\\textbf{{{text}}}"
    return f"\\textbf{{{text}}} $\\approx$" if key in row.tied_best else text


def render_latex(lb: Leaderboard) -> str:
    """One booktabs ``table`` per leaderboard table (needs ``\\usepackage{booktabs}``);
    best and tied-best cells in ``\\textbf`` (ties followed by ``$\\approx$``); the paper
    anchors and unfinished runs as comments."""
    out = ["% Generated by `python -m moram_bench leaderboard`; requires \\usepackage{booktabs}.",
           "% Scores 0-100, macro-averaged over tasks; mean $\\pm$ 95% CI half-width over seeds (Student t),",
           "% -- = single seed. Bold: best mean, and rows not significantly different from it",
           "% ($\\approx$; two-sided paired t-test over common seeds, p >= 0.05).",
           ""]
    for table in lb.tables:
        settings_col = _has_settings_column(table)
        header = _header(table)
        caption = f"{table.title}: {table.describe().rstrip('.')}. {timing_line(table)}"
        if transform_line(table):
            caption += " " + transform_line(table)
        out += ["\\begin{table}[t]", "\\centering", "\\small",
                f"\\caption{{{tex_escape(caption)}}}",
                "\\begin{tabular}{l" + ("l" if settings_col else "") + "r" * (len(header) - 1 - int(settings_col)) + "}",
                "\\toprule",
                " & ".join(tex_escape(c) for c in header) + " \\\\",
                "\\midrule"]
        for row in table.rows:
            cells = [tex_escape(_row_label(row))] + ([tex_escape(_settings_text(row))] if settings_col else [])
            cells.append(tex_escape(_seeds_note(row)))
            cells += [_tex_cell(row, s.key) for s in table.metrics]
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
