"""``xtail-mini``: a small X-TAIL-style image stream embedded in the repository.

Five real domains, committed under ``data/xtail_mini/`` (regenerated from Debian packages
and scikit-learn by ``data/build_xtail_mini.py``; provenance and licences in
``data/README.md``), so a fresh checkout runs without downloading anything:

============== ======================================================= ====== ========
domain         classes                                                 pool   test
============== ======================================================= ====== ========
fashion_mnist  10 Fashion-MNIST classes (real names)                   100/cl 1,000
digits         sklearn 8x8 digits named "zero".."nine"                 60/cl  the rest
clipart_nature mammal, insect, bird, fish, dinosaur, flower, tree      ~40 %  ~60 %
clipart_food   fruit, dessert, beverage, meat or eggs, bread, vegetable ~40 %  ~60 %
emoji_things   land vehicle, building, weather or sky, clock, tool,    ~40 %  ~60 %
               household object, office supply
============== ======================================================= ====== ========

Protocol (X-TAIL): ``shots`` training samples per class are drawn from each domain's pool
by a generator seeded only by ``shot_seed`` (null: the run's ``seed``) and the domain's
*name*, so a domain gets the same samples whatever else the stream contains; the test sets
are the full stored test splits; one label space over the classes of all selected domains
(``label_space: union``; ``per_task`` scores each domain in its own classes, MTIL style);
one prompt template per domain; no domain id at test. Every image is presented as 64x64
(Fashion-MNIST is stored at 28x28 and upsampled bicubically, the digits are rendered from
their 8x8 ink counts by :func:`render_digit`).
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..registry import register_stream
from .base import ArrayImageSet, Stream, StreamError, Task, few_shot_indices

IMAGE_SIZE = 64
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "data" / "xtail_mini"
DOMAINS = ("fashion_mnist", "digits", "clipart_nature", "clipart_food", "emoji_things")
DEFAULT_TEMPLATES = {
    "fashion_mnist": "a photo of a {}, a type of clothing.",
    "digits": "a photo of the number {}.",
    "clipart_nature": "a clip art of a {}, a kind of animal or plant.",
    "clipart_food": "a clip art of {}, a kind of food or drink.",
    "emoji_things": "an emoji of a {}.",
}
_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "classnames")


# ---- image rendering -------------------------------------------------------------------
def render_digit(counts: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """One sklearn/optdigits 8x8 ink-count image (0..16, ink = high) as a ``size`` x
    ``size`` pen-on-paper picture (uint8, dark ink on white): the digit gets a one-cell
    paper margin (optdigits crops it to its box), the ink density is upsampled bicubically
    and a sigmoid contrast curve turns the blurred blocks into strokes with soft edges
    (plain bicubic output is a grey blur; nearest-neighbour gives blocks)."""
    padded = np.zeros((10, 10), dtype=np.float32)
    padded[1:9, 1:9] = counts.astype(np.float32) / 16.0
    ink = Image.fromarray(padded)  # mode "F"
    ink = np.asarray(ink.resize((size, size), Image.BICUBIC), dtype=np.float32).clip(0.0, 1.0)
    ink = 1.0 / (1.0 + np.exp(-12.0 * (ink - 0.5)))
    ink = (ink - ink.min()) / max(float(ink.max() - ink.min()), 1e-6)
    return (255.0 * (1.0 - ink)).round().astype(np.uint8)


def to_display(images: np.ndarray, domain: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """Stored images -> (N, size, size[, 3]) uint8 as the stream presents them."""
    if images.shape[1:3] == (size, size):
        return images
    if domain == "digits":
        if images.shape[1:] != (8, 8):
            raise StreamError(f"xtail-mini: digits must be stored as 8x8 ink counts, got {images.shape[1:]}")
        return np.stack([render_digit(x, size) for x in images]) if len(images) else images
    # any other stored resolution (Fashion-MNIST: 28x28) is upsampled bicubically
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC)) for x in images])


# ---- data files --------------------------------------------------------------------------
def _manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StreamError(f"xtail-mini: corrupt data manifest {path}: {e}") from None


def load_domain_file(root: Path, domain: str, manifest: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Read and validate ``<root>/<domain>.npz``; raises a one-line ``StreamError``."""
    path = root / f"{domain}.npz"
    if not path.is_file():
        raise StreamError(f"xtail-mini: data file not found: {path} "
                          "(restore data/xtail_mini/ from the repository or run data/build_xtail_mini.py)")
    expected = (manifest or {}).get("sha256", {}).get(path.name)
    raw = path.read_bytes()
    if expected and hashlib.sha256(raw).hexdigest() != expected:
        raise StreamError(f"xtail-mini: corrupt data file {path} (sha256 differs from manifest.json)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise StreamError(f"xtail-mini: corrupt data file {path}: missing arrays {missing}")
            arrays = {k: z[k] for k in z.files}
    except StreamError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise StreamError(f"xtail-mini: corrupt data file {path}: {type(e).__name__}: {e}") from None
    n_cls = len(arrays["classnames"])
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y) or len(y) == 0:
            raise StreamError(f"xtail-mini: corrupt data file {path}: bad {split} arrays "
                              f"({x.dtype}, {x.shape}, {len(y)} labels)")
        if y.min() < 0 or y.max() >= n_cls:
            raise StreamError(f"xtail-mini: corrupt data file {path}: {split} labels outside 0..{n_cls - 1}")
    return arrays


# ---- config helpers ------------------------------------------------------------------------
def _get(node, key: str, default=None):
    try:
        value = node.get(key, default)
    except AttributeError:
        value = getattr(node, key, default)
    return default if value is None else value


def shot_seed_for(shot_seed: int, domain: str) -> int:
    """The few-shot seed of one domain: a function of ``shot_seed`` and the domain name only."""
    digest = hashlib.sha256(f"xtail-mini/{int(shot_seed)}/{domain}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def selected_domains(scfg) -> list[str]:
    chosen = _get(scfg, "domains")
    if chosen is None:
        return list(DOMAINS)
    domains = [str(chosen)] if isinstance(chosen, str) else [str(d) for d in chosen]
    if not domains:
        raise StreamError(f"stream.domains is empty; choose among {', '.join(DOMAINS)}")
    for d in domains:
        if d not in DOMAINS:
            raise StreamError(f"unknown xtail-mini domain {d!r} in stream.domains; valid: {', '.join(DOMAINS)}")
        if domains.count(d) > 1:
            raise StreamError(f"domain {d!r} appears twice in stream.domains")
    return domains


@register_stream("xtail-mini")
def build_xtail_mini(cfg) -> Stream:
    """Embedded X-TAIL-style stream: 5 real domains, 40 classes, 16 shots/class, union label space (no data_dir)."""
    scfg = cfg.stream
    domains = selected_domains(scfg)
    shots = _get(scfg, "shots", 16)
    if isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0:
        raise StreamError(f"stream.shots must be a positive integer, got {shots!r}")
    shot_seed = _get(scfg, "shot_seed", _get(cfg, "seed", 0))
    if isinstance(shot_seed, bool) or not isinstance(shot_seed, int):
        raise StreamError(f"stream.shot_seed must be an integer or null, got {shot_seed!r}")
    label_space = str(_get(scfg, "label_space", "union"))
    if label_space not in ("union", "per_task"):
        raise StreamError(f"stream.label_space must be union or per_task, got {label_space!r}")
    root = Path(str(_get(scfg, "data_root", DEFAULT_DATA_ROOT))).expanduser()
    templates = dict(DEFAULT_TEMPLATES)
    templates.update({str(k): str(v) for k, v in dict(_get(scfg, "templates", {}) or {}).items()})
    manifest = _manifest(root)

    tasks, per_domain = [], {}
    for d in domains:
        if "{}" not in templates[d]:
            raise StreamError(f"stream.templates.{d} must contain '{{}}', got {templates[d]!r}")
        a = load_domain_file(root, d, manifest)
        classnames = [str(c) for c in a["classnames"]]
        pool_y, test_y = a["train_labels"].astype(np.int64), a["test_labels"].astype(np.int64)
        pick = few_shot_indices(pool_y, shots, shot_seed_for(shot_seed, d))
        train = ArrayImageSet(to_display(a["train_images"][pick], d), pool_y[pick])
        test = ArrayImageSet(to_display(a["test_images"], d), test_y)
        tasks.append(Task(name=d, train=train, test=test, classnames=classnames, template=templates[d],
                          extra={"domain": d, "pool_indices": pick.tolist()}))
        per_domain[d] = {"classes": len(classnames), "pool": int(len(pool_y)), "train": int(len(pick)),
                         "test": int(len(test_y))}

    settings = {
        "protocol": "X-TAIL (embedded mini)",
        "domains": domains,
        "shots": int(shots),
        "shot_seed": int(shot_seed),
        "shot_seed_source": "stream.shot_seed" if _get(scfg, "shot_seed") is not None else "seed",
        "test": "full",
        "label_space": label_space,
        "num_classes": sum(v["classes"] for v in per_domain.values()),
        "templates": {d: templates[d] for d in domains},
        "per_domain": per_domain,
        "image_size": IMAGE_SIZE,
        "data_root": None if _get(scfg, "data_root") is None else str(root),  # None: the embedded data
        "data_sha256": {f"{d}.npz": manifest.get("sha256", {}).get(f"{d}.npz") for d in domains},
        "domain_id_at_test": False,
    }
    return Stream("xtail-mini", "image", tasks, label_space=label_space, settings=settings)
