"""Task and stream specifications shared by every track.

A *stream* is an ordered list of tasks built deterministically from the config and the
seed (every DDP rank builds the same one). A task holds its train and test data plus
everything needed to turn predictions into scores:

- image tasks: class names, one prompt template, and their offset in the stream's
  label space ("union": one space over all tasks' classes, X-TAIL style; "per_task": each
  task scored in its own classes, MTIL style);
- text tasks (LLM track): prompt/answer pairs, a scorer name and max_new_tokens.

Datasets yield plain dicts; the DataModule adds the task index and the global label.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import StreamError  # noqa: F401  (re-exported; defined with the other error types)


class ImageSet(torch.utils.data.Dataset):
    """A labelled image collection. Subclasses implement ``image(i)`` and set ``labels``
    (task-local class indices, an int64 numpy array)."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image(i).convert("RGB"), "label": int(self.labels[i])}

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return ImageSubset(self, np.asarray(indices, dtype=np.int64))

    def fingerprint(self) -> str:
        """A content hash identifying exactly these samples (keys the feature cache)."""
        h = hashlib.sha256(type(self).__name__.encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        self._fingerprint_update(h)
        return h.hexdigest()[:20]

    def _fingerprint_update(self, h) -> None:
        for i in range(len(self)):
            h.update(np.asarray(self.image(i)).tobytes())


class ArrayImageSet(ImageSet):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, C)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]):
        if len(images) != len(labels):
            raise StreamError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def _fingerprint_update(self, h) -> None:
        h.update(np.ascontiguousarray(self.images).tobytes())


class FileImageSet(ImageSet):
    """Images read from files on disk (paths are absolute or relative to ``root``)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], root: str | None = None):
        import os

        if len(paths) != len(labels):
            raise StreamError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [os.path.join(root, p) if root else p for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")

    def _fingerprint_update(self, h) -> None:
        import os

        for p in self.paths:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())


class ImageSubset(ImageSet):
    def __init__(self, base: ImageSet, indices: np.ndarray):
        self.base, self.indices = base, indices
        self.labels = base.labels[indices]

    def image(self, i: int) -> Image.Image:
        return self.base.image(int(self.indices[i]))

    def _fingerprint_update(self, h) -> None:
        h.update(self.base.fingerprint().encode())
        h.update(self.indices.tobytes())


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` samples per class, chosen by a generator seeded only by ``seed``.

    Depends on nothing but the labels and the seed (not on global RNG state, evaluation
    or world size). Classes with fewer samples contribute all they have. Sorted output.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = min(shots, len(idx))
        chosen.append(rng.choice(idx, size=take, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


@dataclass
class Task:
    """One task of a stream."""

    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    # image tasks
    classnames: list[str] = field(default_factory=list)
    template: str = "a photo of a {}."
    label_offset: int = 0  # first index of this task's classes in the stream label space
    # text tasks
    scorer: str = "accuracy"
    max_new_tokens: int = 16
    epochs: float | None = None  # per-task epochs (LLM streams), overrides the stream's
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self) -> list[str]:
        return [self.template.format(c) for c in self.classnames]


@dataclass
class Stream:
    """An ordered list of tasks plus the protocol settings that make runs comparable."""

    name: str
    modality: str  # "image" or "text"
    tasks: list[Task]
    label_space: str = "union"  # "union" or "per_task" (image streams)
    settings: dict[str, Any] = field(default_factory=dict)  # fairness-relevant, recorded

    def __post_init__(self):
        if self.modality not in ("image", "text"):
            raise StreamError(f"unknown modality {self.modality!r}")
        if not self.tasks:
            raise StreamError(f"stream {self.name!r} has no tasks")
        for t in self.tasks:
            if len(t.train) == 0:
                raise StreamError(f"task {t.name!r} of stream {self.name!r} has no training samples")
            if len(t.test) == 0:
                raise StreamError(f"task {t.name!r} of stream {self.name!r} has no test samples")
        if self.modality == "image":
            offset = 0
            for t in self.tasks:
                t.label_offset = offset if self.label_space == "union" else 0
                offset += t.num_classes

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    # ---- image streams -------------------------------------------------------------
    def all_prompts(self) -> list[str]:
        """Prompts of the whole label space, in label order (union streams)."""
        return [p for t in self.tasks for p in t.prompts()]

    def all_classnames(self) -> list[str]:
        return [c for t in self.tasks for c in t.classnames]

    def class_slice(self, task: int) -> slice:
        """Columns of the stream's label space that task ``task`` is scored in."""
        t = self.tasks[task]
        if self.label_space == "union":
            return slice(0, sum(x.num_classes for x in self.tasks))
        start = sum(x.num_classes for x in self.tasks[:task])
        return slice(start, start + t.num_classes)

    def summary(self) -> str:
        lines = [f"stream {self.name} ({self.modality}, {len(self.tasks)} tasks"
                 + (f", label space: {self.label_space}" if self.modality == "image" else "") + ")"]
        for i, t in enumerate(self.tasks, 1):
            extra = f"{t.num_classes} classes, " if self.modality == "image" else f"scorer {t.scorer}, "
            lines.append(f"  {i}. {t.name}: {extra}{len(t.train)} train / {len(t.test)} test")
        return "\n".join(lines)


StreamBuilder = Callable[[Any], Stream]
