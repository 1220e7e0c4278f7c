"""Shared pieces of the text (LLM) streams: JSON readers with one-line errors, a light
prompt/answer dataset, deterministic subsetting and case-insensitive folder lookup.

JSON files are read with the ``datasets`` library from local files (``Dataset.from_json``:
a JSON list of objects or JSON Lines); any problem becomes a ``StreamError`` naming the file
and what was expected.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .base import StreamError


class DataFileError(StreamError):
    """A missing or malformed data file or folder. ``str()`` is the one-line message; for
    check-data, ``kind`` is "missing" or "malformed", ``path`` the file/folder at fault and
    ``detail`` the message without the path."""

    def __init__(self, message: str, kind: str, path, detail: str):
        super().__init__(message)
        self.kind, self.path, self.detail = kind, str(path), detail


def missing(path, what: str, expected: str) -> DataFileError:
    """``missing <what> <path> (expected <expected>)``."""
    return DataFileError(f"missing {what} {path} (expected {expected})", "missing", path,
                         f"{what} not found (expected {expected})")


def malformed(path, problem: str, expected: str) -> DataFileError:
    """``<path>: <problem> (expected <expected>)``; JSON syntax problems read
    ``malformed JSON in <path>: <parser message> (expected ...)``."""
    if problem.startswith("malformed JSON: "):
        message = f"malformed JSON in {path}: {problem[len('malformed JSON: '):]} (expected {expected})"
    else:
        message = f"{path}: {problem} (expected {expected})"
    return DataFileError(message, "malformed", path, f"{problem} (expected {expected})")


class TextPairs(torch.utils.data.Dataset):
    """Prompt/answer pairs held as two lists; items are ``{"prompt", "answer"}``."""

    def __init__(self, prompts: Sequence[str], answers: Sequence[str]):
        if len(prompts) != len(answers):
            raise StreamError(f"{len(prompts)} prompts but {len(answers)} answers")
        self.prompts = [str(p) for p in prompts]
        self.answers = [str(a) for a in answers]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "answer": self.answers[i]}

    def subset(self, indices: Sequence[int]) -> "TextPairs":
        return TextPairs([self.prompts[i] for i in indices], [self.answers[i] for i in indices])


def hf_cache_dir(cfg: Any) -> str | None:
    """Where ``datasets`` may write its Arrow cache: ``<cache>/hf_datasets``."""
    root = None
    if cfg is not None:
        root = cfg.get("cache_dir") if hasattr(cfg, "get") else None
    root = root or os.environ.get("MORAM_BENCH_CACHE") or Path.home() / ".cache" / "moram_bench"
    return str(Path(root).expanduser() / "hf_datasets")


def _first_line(e: BaseException) -> str:
    for exc in (e.__cause__, e.__context__, e):
        if exc is not None and str(exc).strip():
            return str(exc).strip().splitlines()[0][:200]
    return type(e).__name__


def read_json_records(path: Path, fields: Sequence[str], what: str, cache_dir: str | None = None) -> dict[str, list]:
    """Columns ``fields`` of a JSON file of records (a list of objects, or JSON Lines).

    Raises ``StreamError`` (one line, naming ``path`` and ``what`` was expected) when the
    file is missing, is not valid JSON, or lacks one of ``fields``.
    """
    path = Path(path)
    if not path.is_file():
        raise missing(path, "file", what)
    if path.stat().st_size == 0:
        raise malformed(path, "empty file", what)
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_json(str(path), cache_dir=cache_dir, keep_in_memory=True)
    except Exception as e:  # datasets wraps pyarrow's parse errors in its own exceptions
        raise malformed(path, f"malformed JSON: {_first_line(e)}", what) from None
    absent = [f for f in fields if f not in ds.column_names]
    if absent:
        raise malformed(path, f"no field {absent[0]!r} (found: {', '.join(ds.column_names) or 'none'})", what)
    out = {f: ds[f] for f in fields}
    for f, col in out.items():
        if any(v is None for v in col):
            raise malformed(path, f"some records have no {f!r} value", what)
    return out


def read_json_list(path: Path, what: str) -> list:
    """A small JSON file holding a list (e.g. O-LoRA's labels.json)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise missing(path, "file", what)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise malformed(path, f"malformed JSON: {str(e).splitlines()[0]}", what) from None
    if not isinstance(value, list) or not value:
        raise malformed(path, "not a non-empty JSON list", what)
    return value


def find_child(parent: Path, name: str) -> Path | None:
    """``parent/name`` matched case-insensitively (exact spelling first), or None."""
    exact = parent / name
    if exact.is_dir():
        return exact
    if not parent.is_dir():
        return None
    for child in sorted(parent.iterdir()):
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def subset_seed(seed: int, task: str, split: str) -> list[int]:
    """A seed for ``capped`` that depends only on ``seed`` and the task and split names,
    so a task gets the same subset whatever the stream's order or task selection."""
    return [int(seed), zlib.crc32(f"{task}/{split}".encode())]


def capped(ds: TextPairs, cap: int | None, seed) -> TextPairs:
    """At most ``cap`` samples, chosen by ``numpy.random.default_rng(seed)`` alone (an int or
    a list of ints); the original order is kept."""
    if cap is None or int(cap) <= 0 or len(ds) <= int(cap):
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=int(cap), replace=False))
    return ds.subset(idx.tolist())


def require_data_dir(cfg: Any, stream: str, expected: str) -> Path:
    """``cfg.data_dir`` as a Path, or StreamError saying ``data_dir=PATH`` is required."""
    value = cfg.get("data_dir") if cfg is not None else None
    if not value:
        raise StreamError(f"stream {stream} needs data_dir=PATH ({expected})")
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise StreamError(f"data_dir {path} does not exist or is not a folder (stream {stream} expects {expected})")
    return path


def select_tasks(names: Sequence[str], wanted: Sequence[str] | None, stream: str) -> list[str]:
    """``wanted`` (a subset/reordering of ``names``, case-insensitive) or all ``names``."""
    if not wanted:
        return list(names)
    by_lower = {n.lower(): n for n in names}
    out = []
    for w in wanted:
        if str(w).lower() not in by_lower:
            raise StreamError(f"stream {stream}: unknown task {w!r}; valid tasks: {', '.join(names)}")
        out.append(by_lower[str(w).lower()])
    return out
