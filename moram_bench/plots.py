"""Pictures of a run (the accuracy matrix, the average-accuracy curve, routing shares) and
of the leaderboard (methods compared on a stream, mean and confidence interval over seeds).

Headless by construction: figures are built with ``matplotlib.figure.Figure`` on an Agg
canvas, never through ``pyplot``, so no display, no global backend switch and no figure
registry to leak from. The ``*_figure`` functions return the figure (e.g. for TensorBoard's
``add_figure``); the ``*_png`` functions save it atomically (see
:func:`moram_bench.results_io.atomic_write_bytes`) and return the path.

Every accuracy picture accepts a partial matrix: the finished rows ``0..k`` of a run in
progress (shape ``(k + 1, T)``); unfinished rows are drawn as empty grey cells.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .metrics import validate_rows
from .results_io import atomic_write_bytes

__all__ = [
    "heatmap_figure",
    "heatmap_png",
    "curve_figure",
    "curve_png",
    "routing_figure",
    "routing_png",
    "save_figure_png",
    "heatmap_figsize",
    "comparison_figure",
    "comparison_png",
]

DPI = 100
_MAX_LABEL = 16


def _short(name: Any, width: int = _MAX_LABEL) -> str:
    name = str(name)
    return name if len(name) <= width else name[: width - 2] + ".."


def _names(task_names: Sequence[str], T: int) -> list[str]:
    names = [str(n) for n in task_names]
    if len(names) != T:
        raise ValueError(f"{len(names)} task names for {T} tasks")
    return names


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _cell_fontsize(n: int) -> float:
    return 10.0 if n <= 6 else 8.0 if n <= 10 else 6.5


def save_figure_png(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Render ``fig`` to PNG in memory and write it atomically to ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


def heatmap_figsize(T: int) -> tuple[float, float]:
    """Figure size in inches of :func:`heatmap_figure` for ``T`` tasks."""
    return (3.0 + 0.62 * T, 2.4 + 0.42 * (T + 1))


def _draw_cells(ax, data: np.ndarray, fmt: str, vmax: float, fontsize: float) -> None:
    """Write each finite value in its cell, dark text on light cells and vice versa."""
    for (r, c), v in np.ndenumerate(data):
        if np.isfinite(v):
            color = "white" if v < 0.55 * vmax else "black"  # viridis is dark at the bottom
            ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=fontsize, color=color)


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#e6e6e6")  # unfinished / missing cells


def heatmap_figure(R: Any, task_names: Sequence[str], title: Optional[str] = None) -> Figure:
    """The accuracy matrix as a heatmap: rows ``"0 zero-shot"``, ``"1"`` .. ``"T"`` (after
    training task i), columns the task names (test task j), each cell's value printed,
    a colorbar on the fixed 0-100 scale. The diagonal (task j right after learning it) is
    outlined and row 0 set apart by a line. ``R`` may hold only the finished rows
    ``0..k``; the rest are drawn empty."""
    rows = validate_rows(R)
    k1, T = rows.shape
    names = _names(task_names, T)
    data = np.full((T + 1, T), np.nan)
    data[:k1] = rows

    fig = _new_figure(heatmap_figsize(T))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(data), cmap=_cmap("viridis"), vmin=0.0, vmax=100.0,
                   aspect="auto", interpolation="nearest")
    _draw_cells(ax, data, ".1f", 100.0, _cell_fontsize(T))
    for i in range(1, min(k1, T + 1)):
        ax.add_patch(Rectangle((i - 1 - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=1.4))
    ax.axhline(0.5, color="white", lw=2.5)

    ax.set_xticks(range(T), [_short(n) for n in names], rotation=45, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(T + 1), ["0 zero-shot"] + [str(i) for i in range(1, T + 1)])
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.tick_params(length=0)
    if title is None:
        title = "Accuracy matrix (%)"
        if k1 < T + 1:
            title += f", after task {k1 - 1} of {T}"
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy (%)", shrink=0.9)
    return fig


def heatmap_png(R: Any, task_names: Sequence[str], path: str | os.PathLike,
                title: Optional[str] = None) -> Path:
    """Save :func:`heatmap_figure` as a PNG at ``path`` (atomically); returns the path."""
    return save_figure_png(heatmap_figure(R, task_names, title), path)


def curve_figure(R: Any, task_names: Sequence[str], title: Optional[str] = None) -> Figure:
    """Average accuracy vs the number of tasks trained ``t = 0..k``: over the tasks seen
    so far (mean of ``R[t, :t]``, from t = 1: nothing is seen at t = 0) and over all T
    tasks (mean of ``R[t, :]``, from the zero-shot row t = 0). Macro averages. The x axis
    always spans 0..T, so a run in progress shows how far it got."""
    rows = validate_rows(R)
    k1, T = rows.shape
    names = _names(task_names, T)
    t = np.arange(k1)
    avg_all = rows.mean(axis=1)
    avg_seen = np.array([rows[i, :i].mean() if i else np.nan for i in range(k1)])

    fig = _new_figure((max(5.0, 2.5 + 0.45 * T), 4.2))
    ax = fig.add_subplot()
    ax.plot(t[1:], avg_seen[1:], "o-", color="#1f77b4", label="seen tasks: mean R[t, 1..t]")
    ax.plot(t, avg_all, "s--", color="#ff7f0e", label="all tasks: mean R[t, 1..T]")
    ax.axhline(avg_all[0], color="grey", lw=0.8, ls=":", label="zero-shot, all tasks")
    ax.set_xlim(-0.4, T + 0.4)
    ax.set_ylim(0, 100)
    ax.set_xticks(range(T + 1), ["0 zero-shot"] + [f"{i} {_short(n, 12)}" for i, n in enumerate(names, 1)],
                  rotation=45, ha="right", rotation_mode="anchor")
    ax.set_xlabel("after training task t")
    ax.set_ylabel("macro average accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "Average accuracy over the stream")
    return fig


def curve_png(R: Any, task_names: Sequence[str], path: str | os.PathLike,
              title: Optional[str] = None) -> Path:
    """Save :func:`curve_figure` as a PNG at ``path`` (atomically); returns the path."""
    return save_figure_png(curve_figure(R, task_names, title), path)


def routing_figure(M: Any, task_names: Sequence[str], title: Optional[str] = None) -> Figure:
    """A routing-share heatmap: row j = test domain j, column i = task i whose
    atoms/experts took the share ``M[j, i]`` (0..1, rows typically summing to 1).

    ``M`` is ``T x T`` for ``T = len(task_names)``; fewer columns (only the tasks trained
    so far) or rows are accepted, and NaN cells are drawn empty."""
    try:
        arr = np.asarray(M, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"routing matrix must be a 2-D array of numbers: {e}") from None
    names = [str(n) for n in task_names]
    if arr.ndim != 2 or not (1 <= arr.shape[0] <= len(names) and 1 <= arr.shape[1] <= len(names)):
        raise ValueError(f"routing matrix must be T x T for T = {len(names)} tasks, got shape {arr.shape}")
    finite = arr[np.isfinite(arr)]
    if np.isinf(arr).any() or (finite.size and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6)):
        raise ValueError("routing shares must lie in [0, 1] (NaN for missing cells)")
    n_rows, n_cols = arr.shape
    T = len(names)

    fig = _new_figure(heatmap_figsize(T))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=_cmap("viridis"), vmin=0.0, vmax=1.0,
                   aspect="auto", interpolation="nearest")
    _draw_cells(ax, arr, ".2f", 1.0, _cell_fontsize(T))
    for i in range(min(n_rows, n_cols)):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=1.4))
    ax.set_xticks(range(n_cols), [_short(n) for n in names[:n_cols]], rotation=45, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(n_rows), [_short(n) for n in names[:n_rows]])
    ax.set_xlabel("atoms / experts of task i")
    ax.set_ylabel("test domain j")
    ax.tick_params(length=0)
    ax.set_title(title or "Routing share")
    fig.colorbar(im, ax=ax, label="share", shrink=0.9)
    return fig


def routing_png(M: Any, task_names: Sequence[str], path: str | os.PathLike,
                title: Optional[str] = None) -> Path:
    """Save :func:`routing_figure` as a PNG at ``path`` (atomically); returns the path."""
    return save_figure_png(routing_figure(M, task_names, title), path)


# ------------------------------------------------------------------ leaderboard pictures


def _ci_band(values: Sequence[Optional[float]]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def comparison_figure(panels: Sequence[dict], title: Optional[str] = None) -> Figure:
    """Methods compared on one stream, one line of two plots per panel (a table of the
    leaderboard, e.g. one per task order):

    - left: the average accuracy over the tasks seen so far after each task t = 1..T,
      one line per method (its mean over seeds) with its confidence band;
    - right: plasticity (x) against forgetting (y), one point per method with its
      confidence interval as error bars (up and to the right: learns well but forgets;
      the lower right corner is the good one).

    Each panel: ``{"title": str, "task_names": [...], "series": [{"label": str,
    "curve": [(mean, ci), ...] (one per task), "plasticity": (mean, ci), "forgetting":
    (mean, ci), "reference": bool}, ...]}``; a ``ci`` of ``None`` (a single seed) draws
    no band or bar, a ``mean`` of ``None`` leaves the point out."""
    if not panels:
        raise ValueError("no panels to draw")
    T_max = max(len(p["task_names"]) for p in panels)
    fig = _new_figure((max(11.0, 6.0 + 0.9 * T_max), 4.6 * len(panels)))
    axes = fig.subplots(len(panels), 2, squeeze=False, gridspec_kw={"width_ratios": [1.4, 1.0]})
    # one colour per method across the panels (in order of first appearance)
    labels = list(dict.fromkeys(s["label"] for p in panels for s in p["series"] if not s.get("reference")))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for (ax_c, ax_t), panel in zip(axes, panels):
        names = [str(n) for n in panel["task_names"]]
        T = len(names)
        x = np.arange(1, T + 1)
        for s in panel["series"]:
            color = "grey" if s.get("reference") else colors[s["label"]]
            style = "--" if s.get("reference") else "-"
            if len(s["curve"]) != T:
                raise ValueError(f"{s['label']}: {len(s['curve'])} curve points for {T} tasks")
            mean = _ci_band([m for m, _ in s["curve"]])
            ci = _ci_band([c for _, c in s["curve"]])
            ax_c.plot(x, mean, style, marker="o", ms=4, color=color, label=s["label"])
            if np.isfinite(ci).any():
                ax_c.fill_between(x, mean - ci, mean + ci, color=color, alpha=0.15, lw=0)
            (pm, pc), (fm, fc) = s["plasticity"], s["forgetting"]
            if pm is not None and fm is not None:
                ax_t.errorbar([pm], [fm], xerr=None if pc is None else [pc], yerr=None if fc is None else [fc],
                              fmt="s" if s.get("reference") else "o", color=color, capsize=3, ms=6,
                              label=s["label"])
                ax_t.annotate(s["label"], (pm, fm), textcoords="offset points", xytext=(5, 5), fontsize=7,
                              color=color)
        ax_c.set_xticks(x, [f"{i} {_short(n, 12)}" for i, n in enumerate(names, 1)], rotation=30, ha="right",
                        rotation_mode="anchor")
        ax_c.set_xlim(0.7, T + 0.3)
        ax_c.set_ylim(0, 100)
        ax_c.set_xlabel("after training task t")
        ax_c.set_ylabel("mean accuracy over seen tasks (%)")
        ax_c.grid(alpha=0.3)
        ax_c.legend(loc="best", fontsize=7)
        ax_c.set_title(panel.get("title", ""), fontsize=9)
        ax_t.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax_t.set_xlabel("plasticity: accuracy right after training a task (%)")
        ax_t.set_ylabel("forgetting (%)")
        ax_t.grid(alpha=0.3)
        ax_t.set_title("trade-off (mean, 95 % CI over seeds)", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def comparison_png(panels: Sequence[dict], path: str | os.PathLike, title: Optional[str] = None) -> Path:
    """Save :func:`comparison_figure` as a PNG at ``path`` (atomically); returns the path."""
    return save_figure_png(comparison_figure(panels, title), path)
