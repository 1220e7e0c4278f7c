"""File I/O of the results: atomic writes and the ``matrix.csv`` format.

Every file the project writes goes through :func:`atomic_write_bytes` (or its text and
JSON forms): the bytes go to a temp file in the same directory, which is flushed,
fsync'ed and ``os.replace``'d over the target, so a reader never sees a half-written
file and a crash leaves the old one. :func:`write_matrix_csv` / :func:`read_matrix_csv`
write and read the accuracy matrix of a run (``after_task,<task names>`` and one line
per finished evaluation). The formulas live in :mod:`moram_bench.metrics`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from .metrics import validate_rows

__all__ = [
    "MatrixFileError",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "write_matrix_csv",
    "read_matrix_csv",
]


# -------------------------------------------------------------------------- atomic writes

_umask_lock = threading.Lock()
_file_mode: Optional[int] = None


def _default_file_mode() -> int:
    """0o666 minus the process umask (what ``open(path, "w")`` would give)."""
    global _file_mode
    if _file_mode is None:
        with _umask_lock:
            um = os.umask(0o022)
            os.umask(um)
            _file_mode = 0o666 & ~um
    return _file_mode


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably; returns the path.

    The bytes go to a temp file in the same directory (created if missing), which is
    flushed, fsync'ed and then ``os.replace``'d over ``path``; the directory is fsync'ed
    where the OS allows. On any error the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = path.stat().st_mode & 0o777 if path.exists() else _default_file_mode()
            os.chmod(tmp, mode)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (POSIX; not possible on Windows)
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _json_key(k: Any) -> Any:
    if isinstance(k, np.generic):
        k = k.item()
    return k if k is None or isinstance(k, (str, int, float, bool)) else str(k)


def _jsonable(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays, paths, tuples and sets into JSON types;
    non-finite floats become ``None`` (strict JSON has no NaN/Infinity)."""
    if isinstance(obj, Mapping):
        return {_json_key(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: Optional[int] = 2,
                      sort_keys: bool = False) -> Path:
    """Write ``obj`` as strict JSON (UTF-8, trailing newline) to ``path`` atomically.

    numpy scalars and arrays, tuples, sets and paths are converted; NaN and infinities
    are written as ``null``. Anything else ``json`` cannot encode raises ``TypeError``
    before the file is touched.
    """
    text = json.dumps(_jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False,
                      ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


# ---------------------------------------------------------------------------- matrix.csv


class MatrixFileError(ValueError):
    """A matrix.csv file is missing, malformed or inconsistent."""


def _check_task_names(task_names: Iterable[Any], T: Optional[int]) -> list[str]:
    names = [str(n) for n in task_names]
    if T is not None and len(names) != T:
        raise ValueError(f"{len(names)} task names for {T} task columns")
    if any(not n.strip() for n in names):
        raise ValueError("task names must be non-empty")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate task names: {dup}")
    if "after_task" in names:
        raise ValueError("'after_task' cannot be a task name (it is the index column)")
    return names


def write_matrix_csv(path: str | os.PathLike, R_rows: Any, task_names: Sequence[str],
                     *, decimals: int = 4) -> Path:
    """Write the finished rows ``0..k`` of the accuracy matrix to ``path`` (atomically).

    Header ``after_task,<task names>``; then one line per finished evaluation, the row
    index first (0 = zero-shot), values with ``decimals`` (2-4) decimals. Task names with
    commas or quotes are CSV-quoted.
    """
    if not 2 <= decimals <= 4:
        raise ValueError("decimals must be 2, 3 or 4")
    R = validate_rows(R_rows)
    names = _check_task_names(task_names, R.shape[1])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["after_task", *names])
    for i, row in enumerate(R):
        w.writerow([i, *(f"{v:.{decimals}f}" for v in row)])
    return atomic_write_text(path, buf.getvalue())


def read_matrix_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read a ``matrix.csv`` written by :func:`write_matrix_csv`.

    Returns ``(rows, task_names)`` where ``rows`` has shape ``(k + 1, T)`` (the finished
    rows; ``k == T`` for a complete matrix). Raises :class:`MatrixFileError` (a
    ``ValueError``) with the file and line for a missing file, a wrong header, a row with
    the wrong number of fields, a row index out of sequence, a non-number, or a value
    outside [0, 100].
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MatrixFileError(f"{path}: no such matrix file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MatrixFileError(f"{path}: cannot read matrix file: {e}") from None
    try:
        records = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise MatrixFileError(f"{path}: not a valid CSV file: {e}") from None
    numbered = [(n, r) for n, r in enumerate(records, start=1) if r and any(c.strip() for c in r)]
    if not numbered:
        raise MatrixFileError(f"{path}: empty matrix file")
    hline, header = numbered[0]
    if header[0].strip() != "after_task":
        raise MatrixFileError(f"{path}:{hline}: header must start with 'after_task', got {header[0]!r}")
    if len(header) < 2:
        raise MatrixFileError(f"{path}:{hline}: header names no task columns")
    try:
        names = _check_task_names([h.strip() for h in header[1:]], None)
    except ValueError as e:
        raise MatrixFileError(f"{path}:{hline}: {e}") from None
    T = len(names)
    body = numbered[1:]
    if not body:
        raise MatrixFileError(f"{path}: no rows after the header (row 0, zero-shot, comes first)")
    if len(body) > T + 1:
        raise MatrixFileError(f"{path}: {len(body)} rows for {T} tasks (at most T + 1 = {T + 1})")
    rows = np.empty((len(body), T), dtype=np.float64)
    for expect, (n, rec) in enumerate(body):
        if len(rec) != T + 1:
            raise MatrixFileError(f"{path}:{n}: {len(rec)} fields, expected {T + 1} (after_task + {T} tasks)")
        try:
            idx = int(rec[0].strip())
        except ValueError:
            raise MatrixFileError(f"{path}:{n}: row index {rec[0]!r} is not an integer") from None
        if idx != expect:
            raise MatrixFileError(f"{path}:{n}: row index {idx}, expected {expect} (rows 0, 1, ... in order)")
        for c, cell in enumerate(rec[1:]):
            try:
                v = float(cell.strip())
            except ValueError:
                raise MatrixFileError(f"{path}:{n}: value {cell!r} for task {names[c]!r} is not a number") from None
            if not math.isfinite(v) or not 0.0 <= v <= 100.0:
                raise MatrixFileError(f"{path}:{n}: value {v!r} for task {names[c]!r} is not in [0, 100]")
            rows[expect, c] = v
    return rows, names
