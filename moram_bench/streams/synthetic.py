"""``synthetic-tiny``: a procedurally generated image stream for tests and smoke runs.

Every class is a coloured shape or texture ("red circle", "green square", "orange
stripes", ...) drawn on a noisy background whose tint depends on the task. Images are a
pure function of (data seed, task, class, split, index): the same config always gives the
same arrays, on every DDP rank, in a few milliseconds. The data seed is
``stream.data_seed`` when set, otherwise the run's ``seed``.

Global class ``g`` (task ``t``, class ``c``: ``g = t * classes_per_task + c``) gets colour
``g % 8`` and pattern ``(g + g // 8) % 8``, so up to 64 classes have distinct names, and
classes of one task differ in colour and pattern (learnable by a tiny model in a few dozen
steps), while classes of different tasks may share a colour (something to forget).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..registry import register_stream
from .base import ArrayImageSet, Stream, StreamError, Task

COLOURS: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (220, 40, 40)),
    ("green", (40, 180, 60)),
    ("blue", (50, 80, 225)),
    ("yellow", (230, 210, 40)),
    ("purple", (145, 60, 190)),
    ("orange", (240, 140, 30)),
    ("cyan", (40, 205, 215)),
    ("pink", (240, 125, 185)),
]

# per-task background tints (cycled): dark grey, dark blue, dark brown, dark green, ...
BACKGROUNDS: list[tuple[int, int, int]] = [
    (50, 50, 50), (30, 35, 70), (70, 50, 30), (30, 65, 40), (65, 35, 60), (20, 20, 20),
]

DEFAULT_TEMPLATES = ["a picture of a {}.", "a drawing of a {}.", "a rendering of a {}."]


# ---- patterns: boolean masks of shape (n, H, W) ------------------------------------------
# dx, dy: offsets from each image's centre, r: each image's radius, xx, yy: pixel grid
# shifted by each image's phase, p: texture period in pixels (all broadcast to (n, H, W))
def _circle(dx, dy, r, xx, yy, p):
    return dx ** 2 + dy ** 2 <= r ** 2


def _square(dx, dy, r, xx, yy, p):
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r


def _triangle(dx, dy, r, xx, yy, p):  # apex at the top
    return (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r))


def _ring(dx, dy, r, xx, yy, p):
    d2 = dx ** 2 + dy ** 2
    return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)


def _cross(dx, dy, r, xx, yy, p):
    ax, ay, arm = np.abs(dx), np.abs(dy), r / 3.5
    return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))


def _stripes(dx, dy, r, xx, yy, p):  # horizontal bands over the whole image
    return (yy // p) % 2 == 0


def _checkerboard(dx, dy, r, xx, yy, p):
    return ((xx // p) + (yy // p)) % 2 == 0


def _dots(dx, dy, r, xx, yy, p):
    gx, gy = xx % (2 * p) - p, yy % (2 * p) - p
    return gx ** 2 + gy ** 2 <= (0.7 * p) ** 2


PATTERNS: list[tuple[str, Callable[..., np.ndarray]]] = [
    ("circle", _circle),
    ("square", _square),
    ("triangle", _triangle),
    ("ring", _ring),
    ("cross", _cross),
    ("stripes", _stripes),
    ("checkerboard", _checkerboard),
    ("dots", _dots),
]

MAX_CLASSES = len(COLOURS) * len(PATTERNS)


def class_spec(g: int) -> tuple[str, tuple[int, int, int], int]:
    """(class name, RGB colour, pattern index) of global class ``g``."""
    if not 0 <= g < MAX_CLASSES:
        raise StreamError(f"synthetic-tiny has at most {MAX_CLASSES} classes, asked for class {g}")
    colour_name, rgb = COLOURS[g % len(COLOURS)]
    p = (g + g // len(COLOURS)) % len(PATTERNS)
    return f"{colour_name} {PATTERNS[p][0]}", rgb, p


def render_class(seed: int, task: int, cls: int, classes_per_task: int, n: int,
                 image_size: int = 32, split: str = "train") -> np.ndarray:
    """``n`` uint8 RGB images (n, S, S, 3) of class ``cls`` of task ``task``.

    Deterministic in (seed, task, class, split): the random generator is seeded from those
    alone, never from global state. Each image jitters position, size, texture phase,
    foreground and background colour, plus pixel noise.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    _, rgb, p_idx = class_spec(task * classes_per_task + cls)
    rng = np.random.default_rng([int(seed) % 2 ** 63, task, cls, 0 if split == "train" else 1])
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    cx = s / 2 + rng.uniform(-0.12, 0.12, n).astype(np.float32) * s
    cy = s / 2 + rng.uniform(-0.12, 0.12, n).astype(np.float32) * s
    r = (s * rng.uniform(0.25, 0.36, n)).astype(np.float32)[:, None, None]
    phase = rng.integers(0, 8, (n, 2)).astype(np.float32)
    period = max(2, s // 8)
    mask = PATTERNS[p_idx][1](
        xx[None] - cx[:, None, None], yy[None] - cy[:, None, None], r,
        xx[None] + phase[:, 0, None, None], yy[None] + phase[:, 1, None, None], period,
    )
    mask = np.broadcast_to(mask, (n, s, s))
    fg = np.asarray(rgb, np.float32) + rng.normal(0, 12, (n, 3)).astype(np.float32)
    bg = np.asarray(BACKGROUNDS[task % len(BACKGROUNDS)], np.float32) + rng.normal(0, 8, (n, 3)).astype(np.float32)
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    img += rng.normal(0, 10, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


class SyntheticImageSet(ArrayImageSet):
    """In-memory images with a content fingerprint (feature caches key on it)."""

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.images.tobytes())
        h.update(self.labels.tobytes())
        return f"synthetic:{h.hexdigest()[:20]}"


def _opt(cfg: DictConfig, key: str, default: Any) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return default if value is None else value


def _split(seed: int, task: int, classes: int, per_class: int, size: int, split: str) -> SyntheticImageSet:
    images = np.concatenate([render_class(seed, task, c, classes, per_class, size, split) for c in range(classes)])
    labels = np.repeat(np.arange(classes), per_class)
    return SyntheticImageSet(images, labels)


@register_stream("synthetic-tiny")
def build_synthetic(cfg) -> Stream:
    """Tiny procedurally generated image stream (coloured shapes) for tests and smoke runs."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg or {})
    s = lambda key, default: _opt(cfg, f"stream.{key}", default)  # noqa: E731
    num_tasks = int(s("num_tasks", 3))
    classes = int(s("classes_per_task", 3))
    shots = int(s("shots", 8))
    test_per_class = int(s("test_per_class", 12))
    size = int(s("image_size", 32))
    label_space = str(s("label_space", "union"))
    templates = list(s("templates", DEFAULT_TEMPLATES))
    data_seed = int(s("data_seed", _opt(cfg, "seed", 0)))

    if num_tasks < 1 or classes < 1:
        raise StreamError("synthetic-tiny needs num_tasks >= 1 and classes_per_task >= 1")
    if num_tasks * classes > MAX_CLASSES:
        raise StreamError(f"synthetic-tiny has at most {MAX_CLASSES} classes in all "
                          f"(num_tasks * classes_per_task = {num_tasks * classes})")
    if shots < 1 or test_per_class < 1:
        raise StreamError("synthetic-tiny needs shots >= 1 and test_per_class >= 1")
    if size < 8:
        raise StreamError(f"synthetic-tiny image_size must be at least 8, not {size}")
    if label_space not in ("union", "per_task"):
        raise StreamError(f"label_space must be 'union' or 'per_task', not {label_space!r}")
    if not templates or any("{}" not in t for t in templates):
        raise StreamError("synthetic-tiny templates must be a non-empty list of strings containing '{}'")

    tasks = []
    for t in range(num_tasks):
        names = [class_spec(t * classes + c)[0] for c in range(classes)]
        tasks.append(Task(
            name=f"task{t + 1}",
            train=_split(data_seed, t, classes, shots, size, "train"),
            test=_split(data_seed, t, classes, test_per_class, size, "test"),
            classnames=names,
            template=templates[t % len(templates)],
        ))
    settings = {"num_tasks": num_tasks, "classes_per_task": classes, "shots": shots,
                "test_per_class": test_per_class, "image_size": size, "data_seed": data_seed,
                "iterations": s("iterations", None), "batch_size": s("batch_size", None)}
    return Stream(name="synthetic-tiny", modality="image", tasks=tasks, label_space=label_space,
                  settings=settings)
