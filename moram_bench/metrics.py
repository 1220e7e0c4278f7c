"""Continual-learning metrics: pure functions of the accuracy matrix.

The accuracy matrix ``R`` (see ``docs/PROTOCOLS.md``) has ``T + 1`` rows and ``T`` columns:

- row 0 is the untrained backbone (zero-shot), row ``i`` (1-based) is the model after
  training task ``i``;
- column ``j`` (1-based in the formulas, ``j - 1`` as a numpy index) is the score on task
  ``j``'s test set, on a 0-100 scale.

So in numpy terms ``R[i, j - 1]`` is "after task i, on task j", and the diagonal of the
trained part (task ``j`` right after learning it) is ``R[j, j - 1]``.

Every metric is a *macro* average: each task counts once, whatever its test-set size
(sample-weighted "micro" averages are not computed here). Masks are by index, never by
value, so an accuracy of exactly 0 counts like any other number.

Metrics that need at least two tasks (``transfer``, ``bwt``, ``forgetting``, ``fwt``)
return ``None`` for ``T == 1``: ``None`` is JSON-serialisable (``null``) and cannot be
silently averaged into a table the way ``NaN`` can. Every returned number is a plain
Python ``float``.

The file I/O (``matrix.csv``, atomic writes) lives in :mod:`moram_bench.results_io`; its
names are still importable from here (``metrics.atomic_write_json``, ...) for older
callers.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "MACRO_NOTE",
    "METRIC_NAMES",
    "validate_matrix",
    "validate_rows",
    "last",
    "avg_incremental",
    "mtil_avg",
    "transfer",
    "bwt",
    "bwt_trace_clipped",
    "forgetting",
    "fwt",
    "plasticity",
    "compute_all",
    "partial_metrics",
    "format_matrix",
    "format_metrics",
]

MACRO_NOTE = (
    "macro averages: every task counts once (task-averaged, not weighted by test-set size); "
    "scores on a 0-100 scale"
)

# The metrics of docs/PROTOCOLS.md, in the order they are reported.
METRIC_NAMES = (
    "last",
    "avg_incremental",
    "mtil_avg",
    "transfer",
    "bwt",
    "bwt_trace_clipped",
    "forgetting",
    "fwt",
    "plasticity",
)

ZERO_SHOT_LABEL = "0 (zero-shot)"


# --------------------------------------------------------------------------- validation


def _as_2d_float(R: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a 2-D array of numbers: {e}") from None
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows = after task i, columns = task j), got shape {arr.shape}")
    return arr


def _check_values(arr: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{what} has a non-finite value {arr[r, c]!r} at row {r}, column {c}")
    out = (arr < 0.0) | (arr > 100.0)
    if out.any():
        r, c = np.argwhere(out)[0]
        raise ValueError(
            f"{what} has {arr[r, c]!r} at row {r}, column {c}: scores must lie in [0, 100] "
            "(a 0-1 fraction must be multiplied by 100)"
        )


def validate_matrix(R: Any) -> np.ndarray:
    """Check a complete accuracy matrix and return it as a float64 array.

    ``R`` must have shape ``(T + 1, T)`` with ``T >= 1``, only finite values, all in
    ``[0, 100]``. Raises ``ValueError`` naming the first problem found.
    """
    arr = _as_2d_float(R, "accuracy matrix")
    n_rows, T = arr.shape
    if T < 1:
        raise ValueError("accuracy matrix has no task columns")
    if n_rows != T + 1:
        raise ValueError(
            f"accuracy matrix must have T + 1 = {T + 1} rows for T = {T} tasks "
            f"(row 0 = zero-shot, row i = after task i), got shape {arr.shape}"
        )
    _check_values(arr, "accuracy matrix")
    return arr


def validate_rows(rows: Any, num_tasks: Optional[int] = None) -> np.ndarray:
    """Check the finished rows ``0..k`` of an accuracy matrix (a run in progress).

    Shape ``(k + 1, T)`` with ``0 <= k <= T``; ``num_tasks`` (if given) must equal ``T``.
    Values as in :func:`validate_matrix`. Returns a float64 array.
    """
    arr = _as_2d_float(rows, "accuracy rows")
    n_rows, T = arr.shape
    if T < 1:
        raise ValueError("accuracy rows have no task columns")
    if num_tasks is not None and T != num_tasks:
        raise ValueError(f"accuracy rows have {T} columns, expected {num_tasks} tasks")
    if not 1 <= n_rows <= T + 1:
        raise ValueError(
            f"accuracy rows must hold 1 to T + 1 = {T + 1} rows (row 0 = zero-shot first), "
            f"got shape {arr.shape}"
        )
    _check_values(arr, "accuracy rows")
    return arr


# ------------------------------------------------------------------------------ metrics
# In the code below columns are 0-based: task j (1-based) is column j - 1.


def last(R: Any) -> float:
    """Average accuracy over all tasks after the last task: ``mean_j R[T, j]``
    (TRACE's "OP", MTIL's "Last")."""
    R = validate_matrix(R)
    return float(R[-1].mean())


def avg_incremental(R: Any) -> float:
    """``mean over t=1..T of (mean over j<=t of R[t, j])``: the average, over the training
    steps, of the accuracy on the tasks seen so far."""
    R = validate_matrix(R)
    T = R.shape[1]
    return float(np.mean([R[t, :t].mean() for t in range(1, T + 1)]))


def mtil_avg(R: Any) -> float:
    """X-TAIL/MTIL "Average": mean of ``R[1..T, 1..T]`` (all ``T*T`` entries, past and
    future tasks alike; row 0 excluded)."""
    R = validate_matrix(R)
    return float(R[1:].mean())


def transfer(R: Any) -> Optional[float]:
    """X-TAIL/MTIL "Transfer": ``mean over j=2..T of (mean over i=1..j-1 of R[i, j])``,
    the accuracy on tasks not trained yet (strict upper triangle of rows 1..T, selected by
    index). ``None`` for ``T == 1``."""
    R = validate_matrix(R)
    T = R.shape[1]
    if T < 2:
        return None
    # column j - 1 (task j), rows 1..j-1 -> numpy rows 1:j
    return float(np.mean([R[1:j, j - 1].mean() for j in range(2, T + 1)]))


def bwt(R: Any) -> Optional[float]:
    """GEM backward transfer: ``1/(T-1) * sum over j<T of (R[T, j] - R[j, j])``.

    Negative when tasks were forgotten. ``None`` for ``T == 1``."""
    R = validate_matrix(R)
    T = R.shape[1]
    if T < 2:
        return None
    return float(np.mean([R[T, j - 1] - R[j, j - 1] for j in range(1, T)]))


def bwt_trace_clipped(R: Any) -> float:
    """TRACE's backward transfer: ``1/T * sum over j=1..T of min(R[T, j] - R[j, j], 0)``.

    Returned signed, as defined, so it is always ``<= 0``; TRACE's tables report its
    magnitude (``abs`` of this value, ``bwt_trace_magnitude`` in :func:`compute_all`).
    Only drops count (gains are clipped to 0), and the divisor is ``T`` (the last task's
    term is 0 by construction). Defined (0.0) for ``T == 1``.
    """
    R = validate_matrix(R)
    T = R.shape[1]
    terms = [min(R[T, j - 1] - R[j, j - 1], 0.0) for j in range(1, T + 1)]
    return float(sum(terms) / T) + 0.0  # + 0.0 turns -0.0 into 0.0


def forgetting(R: Any) -> Optional[float]:
    """Chaudhry et al. average forgetting:
    ``1/(T-1) * sum over j<T of (max over l in j..T-1 of R[l, j] - R[T, j])``.

    The maximum runs over the rows from the one right after learning task ``j`` up to the
    one before the last (1-based rows ``j..T-1``), never over row 0 or rows before ``j``.
    Positive when tasks were forgotten (opposite sign to :func:`bwt`); it can be negative
    if the final accuracy beats every earlier one. ``None`` for ``T == 1``.
    """
    R = validate_matrix(R)
    T = R.shape[1]
    if T < 2:
        return None
    # rows j..T-1 (1-based, inclusive) -> numpy rows j:T
    return float(np.mean([R[j:T, j - 1].max() - R[T, j - 1] for j in range(1, T)]))


def fwt(R: Any) -> Optional[float]:
    """GEM forward transfer: ``1/(T-1) * sum over j=2..T of (R[j-1, j] - R[0, j])``.

    The reference is row 0, the untrained backbone's (zero-shot) score on task ``j``.
    ``None`` for ``T == 1``."""
    R = validate_matrix(R)
    T = R.shape[1]
    if T < 2:
        return None
    return float(np.mean([R[j - 1, j - 1] - R[0, j - 1] for j in range(2, T + 1)]))


def plasticity(R: Any) -> float:
    """Learning accuracy: ``1/T * sum over j=1..T of R[j, j]``, the mean over tasks of the
    accuracy on task ``j`` right after training task ``j`` (the diagonal of the trained
    part). The plasticity side of the plasticity-stability trade-off; :func:`forgetting`
    is the stability side. Defined for ``T == 1``."""
    R = validate_matrix(R)
    T = R.shape[1]
    return float(np.mean([R[j, j - 1] for j in range(1, T + 1)]))


def compute_all(R: Any) -> dict:
    """All metrics of ``docs/PROTOCOLS.md`` for a complete matrix, as a JSON-serialisable dict.

    Keys: ``num_tasks``, every name in :data:`METRIC_NAMES`, ``bwt_trace_magnitude`` (the
    positive number TRACE reports, ``abs(bwt_trace_clipped)``), ``zero_shot_avg`` (mean of
    row 0) and ``averaging`` (a note: these are macro, task-averaged). Metrics undefined
    for ``T == 1`` are ``None``.
    """
    R = validate_matrix(R)
    out: dict[str, Any] = {"num_tasks": int(R.shape[1])}
    out["last"] = last(R)
    out["avg_incremental"] = avg_incremental(R)
    out["mtil_avg"] = mtil_avg(R)
    out["transfer"] = transfer(R)
    out["bwt"] = bwt(R)
    out["bwt_trace_clipped"] = bwt_trace_clipped(R)
    out["bwt_trace_magnitude"] = abs(out["bwt_trace_clipped"])
    out["forgetting"] = forgetting(R)
    out["fwt"] = fwt(R)
    out["plasticity"] = plasticity(R)
    out["zero_shot_avg"] = float(R[0].mean())
    out["averaging"] = MACRO_NOTE
    return out


def partial_metrics(rows: Any) -> dict:
    """Metrics of a run in progress whose rows ``0..k`` are finished (``0 <= k <= T``).

    Everything is what is defined from the finished rows, as if the stream had stopped
    after task ``k`` (the metrics of the top-left ``(k+1) x k`` block), plus averages over
    all ``T`` tasks:

    - ``tasks_done`` (k), ``num_tasks`` (T), ``zero_shot_avg`` (mean of row 0);
    - ``avg_all``: mean of row k over all T tasks (the zero-shot average when k = 0);
    - ``avg_seen``: mean of row k over tasks 1..k (``None`` when k = 0);
    - ``last``, ``avg_incremental``, ``mtil_avg``, ``transfer``, ``bwt``,
      ``bwt_trace_clipped``, ``bwt_trace_magnitude``, ``forgetting``, ``fwt`` of the first
      k tasks (``None`` where undefined, e.g. everything for k = 0, the two-task metrics
      for k = 1);
    - ``averaging``: the macro note.

    When ``k == T`` the metric values equal :func:`compute_all`'s.
    """
    R = validate_rows(rows)
    k = R.shape[0] - 1
    T = R.shape[1]
    out: dict[str, Any] = {
        "tasks_done": k,
        "num_tasks": T,
        "zero_shot_avg": float(R[0].mean()),
        "avg_all": float(R[k].mean()),
        "avg_seen": float(R[k, :k].mean()) if k >= 1 else None,
    }
    if k >= 1:
        sub = compute_all(R[:, :k])
        for name in METRIC_NAMES + ("bwt_trace_magnitude",):
            out[name] = sub[name]
    else:
        for name in METRIC_NAMES + ("bwt_trace_magnitude",):
            out[name] = None
    out["averaging"] = MACRO_NOTE
    return out


# ---------------------------------------------------------------------------- formatting


def _short(name: str, width: int) -> str:
    name = str(name)
    if len(name) <= width:
        return name
    return name[: width - 2] + ".."


def format_matrix(R: Any, task_names: Sequence[str], *, decimals: int = 2, max_name: int = 12) -> str:
    """A fixed-width text table of the accuracy matrix (complete or rows ``0..k`` only).

    Row labels ``"0 (zero-shot)"``, ``"1"``, ...; column headers are the task names,
    truncated to ``max_name`` characters (ending in ``..``). A first line states the
    orientation. Non-finite cells print as ``-``.
    """
    arr = _as_2d_float(R, "accuracy matrix")
    T = arr.shape[1]
    names = list(task_names)
    if len(names) != T:
        raise ValueError(f"{len(names)} task names for a matrix with {T} columns")
    headers = [_short(n, max_name) for n in names]
    cells = [["-" if not math.isfinite(v) else f"{v:.{decimals}f}" for v in row] for row in arr]
    labels = [ZERO_SHOT_LABEL] + [str(i) for i in range(1, arr.shape[0])]
    lw = max(len("after task"), *(len(s) for s in labels))
    widths = [max(len(h), *(len(row[c]) for row in cells), 6) for c, h in enumerate(headers)]
    lines = ["rows: after training task i (0 = untrained backbone); columns: test task j; scores 0-100"]
    lines.append("  ".join(["after task".ljust(lw)] + [h.rjust(w) for h, w in zip(headers, widths)]))
    lines.append("  ".join(["-" * lw] + ["-" * w for w in widths]))
    for label, row in zip(labels, cells):
        lines.append("  ".join([label.ljust(lw)] + [c.rjust(w) for c, w in zip(row, widths)]))
    return "\n".join(lines)


def format_metrics(d: Mapping[str, Any], *, decimals: int = 2) -> str:
    """Readable ``name: value`` lines for a :func:`compute_all` / :func:`partial_metrics`
    dict (``None`` prints as ``n/a``); the averaging note goes last."""
    order = [
        "tasks_done", "num_tasks", "zero_shot_avg", "avg_seen", "avg_all",
        *METRIC_NAMES, "bwt_trace_magnitude",
    ]
    keys = [k for k in order if k in d] + [k for k in d if k not in order and k != "averaging"]
    width = max((len(k) for k in keys), default=0)
    lines = []
    for k in keys:
        v = d[k]
        if v is None:
            s = "n/a"
        elif isinstance(v, (bool, np.bool_)):
            s = str(bool(v))
        elif isinstance(v, (int, np.integer)):
            s = str(int(v))
        elif isinstance(v, (float, np.floating)):
            s = f"{float(v):.{decimals}f}"
        else:
            s = str(v)
        lines.append(f"{k.ljust(width)} : {s}")
    lines.append(f"({d.get('averaging', MACRO_NOTE)})")
    return "\n".join(lines)


# ------------------------------------------------------------- file I/O (moved, still here)

_MOVED_TO_RESULTS_IO = ("MatrixFileError", "write_matrix_csv", "read_matrix_csv", "atomic_write_text",
                        "atomic_write_bytes", "atomic_write_json")


def __getattr__(name: str) -> Any:
    """``metrics.atomic_write_json`` and the other file helpers, now in
    :mod:`moram_bench.results_io` (imported lazily: results_io imports this module)."""
    if name in _MOVED_TO_RESULTS_IO:
        from . import results_io

        return getattr(results_io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
