"""Loaders for the eleven image datasets of the X-TAIL and MTIL streams, read from a user's
local folders in the layouts of CoOp's dataset guide (Zhou et al., DATASETS.md) and the
usual torchvision layouts for MNIST and CIFAR-100.

``data_dir`` holds one folder per dataset::

    data_dir/
      fgvc_aircraft/   images/  variants.txt  images_variant_{train,val,test}.txt
      caltech-101/     101_ObjectCategories/  split_zhou_Caltech101.json
      cifar-100-python/  train  test  meta                      (python pickles)
      dtd/             images/  split_zhou_DescribableTextures.json
      eurosat/         2750/  split_zhou_EuroSAT.json
      oxford_flowers/  jpg/  split_zhou_OxfordFlowers.json
      food-101/        images/  split_zhou_Food101.json
      MNIST/raw/       {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
      oxford_pets/     images/  split_zhou_OxfordPets.json
      stanford_cars/   cars_train/  cars_test/  split_zhou_StanfordCars.json
      sun397/          SUN397/  split_zhou_SUN397.json

A few common variants are accepted too (``fgvc_aircraft/data/``, ``dtd/dtd/``,
``mnist/MNIST/raw/``); the documented folder is the one named in error messages.

A CoOp split file is ``{"train": [[rel_path, label, classname], ...], "val": [...],
"test": [...]}`` with paths relative to the dataset's image folder. Class names come from
the split file (label order), from ``variants.txt`` (aircraft), from ``meta`` (CIFAR-100)
or from the committed list (MNIST); see ``classnames``.

Loading reads only paths and labels (plus the small MNIST label files and the CIFAR-100
pickles, which hold labels and pixels together); image files are opened lazily by
``FileImageSet``. Problems raise ``DataMissing`` or ``DataMalformed`` (both
``StreamError``) naming the exact path.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from . import classnames as C
from .base import ArrayImageSet, FileImageSet, ImageSet, StreamError

COOP_GUIDE = "see docs/REAL_BENCHMARKS.md (CoOp's DATASETS.md layout)"


# ---- errors --------------------------------------------------------------------------------
class DataProblem(StreamError):
    """A dataset folder is not usable; ``path`` is the exact path that was expected."""

    kind = "problem"

    def __init__(self, domain: str, path: os.PathLike | str, detail: str):
        self.domain, self.path, self.detail = domain, str(path), detail
        super().__init__(self.message())

    def message(self) -> str:  # pragma: no cover - overridden
        return f"{self.domain}: {self.detail}: {self.path}"


class DataMissing(DataProblem):
    """An expected file or folder does not exist."""

    kind = "missing"

    def message(self) -> str:
        return f"{self.domain}: {self.detail} not found, expected {self.path}"


class DataMalformed(DataProblem):
    """A file exists but cannot be parsed or is inconsistent."""

    kind = "malformed"

    def message(self) -> str:
        return f"{self.domain}: malformed {self.path}: {self.detail}"


# ---- what a loader returns -----------------------------------------------------------------
@dataclass
class DomainData:
    domain: str
    root: Path
    classnames: list[str]  # prompt-ready, in label order
    train: ImageSet
    test: ImageSet
    val: ImageSet | None = None
    source: str = ""  # where the class names came from
    notes: list[str] = field(default_factory=list)
    raw_classnames: list[str] | None = None  # as the split file spells them (CoOp split domains)

    def counts(self) -> dict[str, int]:
        out = {"classes": len(self.classnames), "train": len(self.train)}
        if self.val is not None:
            out["val"] = len(self.val)
        out["test"] = len(self.test)
        return out

    def image_files(self) -> list[str]:
        """Every image file the splits list (empty for array-backed datasets)."""
        files: list[str] = []
        for part in (self.train, self.val, self.test):
            if isinstance(part, FileImageSet):
                files.extend(part.paths)
        return files


@dataclass(frozen=True)
class DatasetSpec:
    key: str  # the domain name streams use
    title: str
    folders: tuple[str, ...]  # candidate roots under data_dir; the first is the documented one
    markers: tuple[str, ...]  # a root is recognised by any of these files
    loader: Callable[[str, Path], DomainData]
    layout: str  # one line: what the root must hold


DATASETS: dict[str, DatasetSpec] = {}


def _dataset(key: str, title: str, folders, markers, layout: str):
    def deco(fn):
        DATASETS[key] = DatasetSpec(key, title, tuple(folders), tuple(markers), fn, layout)
        return fn

    return deco


def dataset_root(domain: str, data_dir: os.PathLike | str) -> Path:
    """The folder of ``domain`` under ``data_dir``: the first candidate holding a marker
    file, else the first that exists, else the documented one."""
    spec = _spec(domain)
    base = Path(data_dir).expanduser()
    cands = [base / f for f in spec.folders]
    for c in cands:
        if any((c / m).exists() for m in spec.markers):
            return c
    for c in cands:
        if c.is_dir():
            return c
    return cands[0]


def _spec(domain: str) -> DatasetSpec:
    if domain not in DATASETS:
        raise StreamError(f"unknown domain {domain!r}; valid domains: {', '.join(sorted(DATASETS))}")
    return DATASETS[domain]


def load_domain(domain: str, data_dir: os.PathLike | str | None) -> DomainData:
    """Load one dataset's splits (paths and labels) from ``data_dir``."""
    spec = _spec(domain)
    if data_dir is None or str(data_dir) == "":
        raise StreamError(f"{domain}: data_dir is not set; pass data_dir=PATH (the folder holding the datasets, {COOP_GUIDE})")
    base = Path(data_dir).expanduser()
    if not base.is_dir():
        raise DataMissing(domain, base, "data_dir")
    root = dataset_root(domain, base)
    if not root.is_dir():
        raise DataMissing(domain, root, f"dataset folder (with {spec.layout})")
    data = spec.loader(domain, root)
    expected = C.NUM_CLASSES.get(domain)
    if expected is not None and len(data.classnames) != expected:
        data.notes.append(f"the full dataset has {expected} classes")
    return data


# ---- helpers -------------------------------------------------------------------------------
def _require(domain: str, path: Path, what: str, is_dir: bool = False) -> Path:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        raise DataMissing(domain, path, what)
    return path


def _safe_rel(rel: str) -> bool:
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts


def _check_parent_dirs(domain: str, image_dir: Path, rels) -> None:
    """Every folder the split lists files in exists (cheap; catches partial extractions)."""
    seen = set()
    for rel in rels:
        parent = os.path.dirname(rel)
        if parent and parent not in seen:
            seen.add(parent)
            if not (image_dir / parent).is_dir():
                raise DataMissing(domain, image_dir / parent, "image folder listed in the split file")


def read_zhou_split(domain: str, split_path: Path, rename: dict[str, str] | None = None):
    """Parse a CoOp split file. Returns ``({split: (paths, labels)}, classnames)`` with the
    names as the file spells them (after ``rename``); ``C.prompt_name`` cleans them."""
    try:
        with open(split_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataMalformed(domain, split_path, f"not valid JSON ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise DataMalformed(domain, split_path, f"cannot be read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise DataMalformed(domain, split_path, 'expected an object {"train": [...], "val": [...], "test": [...]}')
    for key in ("train", "test"):
        if key not in raw:
            raise DataMalformed(domain, split_path, f"no {key!r} list")
    names: dict[int, str] = {}
    splits: dict[str, tuple[list[str], list[int]]] = {}
    for key in ("train", "val", "test"):
        items = raw.get(key)
        if items is None and key == "val":
            continue
        if not isinstance(items, list):
            raise DataMalformed(domain, split_path, f"{key!r} is not a list")
        paths, labels = [], []
        for i, item in enumerate(items):
            if (not isinstance(item, (list, tuple)) or len(item) != 3 or not isinstance(item[0], str)
                    or not isinstance(item[1], int) or isinstance(item[1], bool) or not isinstance(item[2], str)):
                raise DataMalformed(domain, split_path, f"entry {i} of {key!r} is not [path, label, classname]: {str(item)[:80]}")
            rel, label, name = item
            if label < 0:
                raise DataMalformed(domain, split_path, f"entry {i} of {key!r} has a negative label")
            if not _safe_rel(rel):
                raise DataMalformed(domain, split_path, f"entry {i} of {key!r}: path {rel!r} is not relative to the image folder")
            if rename:
                name = rename.get(name, name)
            if names.setdefault(label, name) != name:
                raise DataMalformed(domain, split_path, f"label {label} is named both {names[label]!r} and {name!r}")
            paths.append(rel)
            labels.append(label)
        splits[key] = (paths, labels)
    if not names:
        raise DataMalformed(domain, split_path, "the split lists no images")
    k = max(names) + 1
    gaps = [i for i in range(k) if i not in names]
    if gaps:
        raise DataMalformed(domain, split_path, f"labels are not 0..{k - 1}: label {gaps[0]} never occurs")
    return splits, [names[i] for i in range(k)]


def _load_coop(domain: str, root: Path, image_subdir: str, split_name: str,
               rename: dict[str, str] | None = None) -> DomainData:
    image_dir = _require(domain, root / image_subdir, "image folder", is_dir=True) if image_subdir else root
    split_path = _require(domain, root / split_name, f"CoOp split file {split_name}")
    splits, raw = read_zhou_split(domain, split_path, rename)
    for paths, _ in splits.values():
        _check_parent_dirs(domain, image_dir, paths)
    sets = {k: FileImageSet(p, l, root=str(image_dir)) for k, (p, l) in splits.items()}
    return DomainData(domain, root, [C.prompt_name(n) for n in raw], sets["train"], sets["test"], sets.get("val"),
                      source=f"{split_path} (CoOp split file)", raw_classnames=raw)


# ---- the CoOp datasets ---------------------------------------------------------------------
@_dataset("caltech101", "Caltech101", ["caltech-101"], ["split_zhou_Caltech101.json"],
          "101_ObjectCategories/ and split_zhou_Caltech101.json")
def load_caltech101(domain: str, root: Path) -> DomainData:
    return _load_coop(domain, root, "101_ObjectCategories", "split_zhou_Caltech101.json", C.CALTECH101_RENAME)


@_dataset("oxford_pets", "Oxford-IIIT Pets", ["oxford_pets"], ["split_zhou_OxfordPets.json"],
          "images/ and split_zhou_OxfordPets.json")
def load_oxford_pets(domain: str, root: Path) -> DomainData:
    return _load_coop(domain, root, "images", "split_zhou_OxfordPets.json")


@_dataset("stanford_cars", "Stanford Cars", ["stanford_cars"], ["split_zhou_StanfordCars.json"],
          "cars_train/, cars_test/ and split_zhou_StanfordCars.json")
def load_stanford_cars(domain: str, root: Path) -> DomainData:
    # split paths are relative to the dataset folder ("cars_train/00001.jpg")
    return _load_coop(domain, root, "", "split_zhou_StanfordCars.json")


@_dataset("oxford_flowers", "Oxford Flowers 102", ["oxford_flowers"], ["split_zhou_OxfordFlowers.json"],
          "jpg/ and split_zhou_OxfordFlowers.json")
def load_oxford_flowers(domain: str, root: Path) -> DomainData:
    return _load_coop(domain, root, "jpg", "split_zhou_OxfordFlowers.json")


@_dataset("food101", "Food-101", ["food-101"], ["split_zhou_Food101.json"],
          "images/ and split_zhou_Food101.json")
def load_food101(domain: str, root: Path) -> DomainData:
    return _load_coop(domain, root, "images", "split_zhou_Food101.json")


@_dataset("sun397", "SUN397", ["sun397"], ["split_zhou_SUN397.json"],
          "SUN397/ and split_zhou_SUN397.json")
def load_sun397(domain: str, root: Path) -> DomainData:
    return _load_coop(domain, root, "SUN397", "split_zhou_SUN397.json")


@_dataset("dtd", "Describable Textures", ["dtd", "dtd/dtd"], ["split_zhou_DescribableTextures.json"],
          "images/ and split_zhou_DescribableTextures.json")
def load_dtd(domain: str, root: Path) -> DomainData:
    return _load_coop(domain, root, "images", "split_zhou_DescribableTextures.json")


@_dataset("eurosat", "EuroSAT", ["eurosat"], ["split_zhou_EuroSAT.json"],
          "2750/ and split_zhou_EuroSAT.json")
def load_eurosat(domain: str, root: Path) -> DomainData:
    return _load_coop(domain, root, "2750", "split_zhou_EuroSAT.json", C.EUROSAT_RENAME)


@_dataset("aircraft", "FGVC-Aircraft", ["fgvc_aircraft", "fgvc_aircraft/data", "fgvc-aircraft-2013b/data"],
          ["variants.txt"], "images/, variants.txt and images_variant_{train,val,test}.txt")
def load_aircraft(domain: str, root: Path) -> DomainData:
    image_dir = _require(domain, root / "images", "image folder", is_dir=True)
    vpath = _require(domain, root / "variants.txt", "class list variants.txt")
    variants = [ln.strip() for ln in _read_lines(domain, vpath) if ln.strip()]
    if not variants:
        raise DataMalformed(domain, vpath, "no variants listed")
    if len(set(variants)) != len(variants):
        dup = next(v for v in variants if variants.count(v) > 1)
        raise DataMalformed(domain, vpath, f"variant {dup!r} is listed twice")
    label_of = {v: i for i, v in enumerate(variants)}
    sets = {}
    for split in ("train", "val", "test"):
        path = root / f"images_variant_{split}.txt"
        if split == "val" and not path.exists():
            continue
        _require(domain, path, f"split file images_variant_{split}.txt")
        paths, labels = [], []
        for n, line in enumerate(_read_lines(domain, path), 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(" ", 1)
            if len(parts) != 2 or not parts[0] or not _safe_rel(parts[0]):
                raise DataMalformed(domain, path, f"line {n} is not '<image id> <variant>': {line[:80]!r}")
            image_id, variant = parts[0], parts[1].strip()
            if variant not in label_of:
                raise DataMalformed(domain, path, f"line {n}: variant {variant!r} is not in variants.txt")
            paths.append(f"{image_id}.jpg")
            labels.append(label_of[variant])
        sets[split] = FileImageSet(paths, labels, root=str(image_dir))
    return DomainData(domain, root, [C.prompt_name(v) for v in variants], sets["train"], sets["test"],
                      sets.get("val"), source=f"{vpath} (line order)")


def _read_lines(domain: str, path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataMalformed(domain, path, f"not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DataMalformed(domain, path, f"cannot be read ({e.strerror or e})") from None


# ---- MNIST (torchvision layout: MNIST/raw/ IDX files, gzipped or not) ------------------------
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_file(domain: str, raw: Path, stem: str) -> Path:
    for cand in (raw / stem, raw / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise DataMissing(domain, raw / stem, f"IDX file {stem} (or {stem}.gz)")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(domain: str, path: Path, f, ndim: int) -> tuple[int, ...]:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08 or head[3] != ndim:
        raise DataMalformed(domain, path, f"not an IDX file of unsigned bytes with {ndim} dimension(s)")
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataMalformed(domain, path, "truncated IDX header")
    return struct.unpack(f">{ndim}I", dims)


class IdxImageSet(ImageSet):
    """MNIST images from an IDX file, read into memory on first access."""

    def __init__(self, path: Path, labels: np.ndarray, shape: tuple[int, int, int], domain: str):
        self.path, self.shape, self.domain = Path(path), tuple(shape), domain
        self.labels = np.asarray(labels, dtype=np.int64)
        self._array: np.ndarray | None = None
        self._offset = 4 + 4 * len(shape)

    def array(self) -> np.ndarray:
        if self._array is None:
            n = int(np.prod(self.shape))
            if self.path.suffix == ".gz":
                with gzip.open(self.path, "rb") as f:
                    buf = f.read()
                if len(buf) < self._offset + n:
                    raise DataMalformed(self.domain, self.path, f"truncated: {len(buf) - self._offset} pixel bytes for {self.shape}")
                self._array = np.frombuffer(buf, dtype=np.uint8, count=n, offset=self._offset).reshape(self.shape)
            else:
                self._array = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._offset, shape=self.shape)
        return self._array

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(np.array(self.array()[i], dtype=np.uint8))  # 2-D uint8: mode "L"

    def __getstate__(self):  # DataLoader workers re-read the file instead of pickling pixels
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def _fingerprint_update(self, h) -> None:
        st = os.stat(self.path)
        h.update(f"{self.path}|{st.st_size}|{st.st_mtime_ns}|{self.shape}".encode())


def _read_mnist_split(domain: str, raw: Path, split: str) -> IdxImageSet:
    img_path = _idx_file(domain, raw, _MNIST_FILES[split][0])
    lab_path = _idx_file(domain, raw, _MNIST_FILES[split][1])
    try:
        with _open(lab_path) as f:
            (n,) = _idx_header(domain, lab_path, f, 1)
            labels = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataMalformed(domain, lab_path, f"cannot be read ({e})") from None
    try:
        with _open(img_path) as f:
            shape = _idx_header(domain, img_path, f, 3)
    except (OSError, EOFError) as e:
        raise DataMalformed(domain, img_path, f"cannot be read ({e})") from None
    if len(labels) != n:
        raise DataMalformed(domain, lab_path, f"header says {n} labels, file holds {len(labels)}")
    if shape[0] != n:
        raise DataMalformed(domain, img_path, f"{shape[0]} images but {lab_path.name} has {n} labels")
    if labels.size and labels.max() > 9:
        raise DataMalformed(domain, lab_path, f"label {int(labels.max())} is not a digit")
    if img_path.suffix != ".gz":
        expected = 16 + int(np.prod(shape))
        if img_path.stat().st_size < expected:
            raise DataMalformed(domain, img_path, f"truncated: {img_path.stat().st_size} bytes, expected {expected}")
    return IdxImageSet(img_path, labels, shape, domain)


@_dataset("mnist", "MNIST", ["MNIST/raw", "mnist/MNIST/raw", "mnist/raw"],
          ["train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz"],
          "{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte (gzipped or not)")
def load_mnist(domain: str, root: Path) -> DomainData:
    train = _read_mnist_split(domain, root, "train")
    test = _read_mnist_split(domain, root, "test")
    return DomainData(domain, root, list(C.MNIST_CLASSNAMES), train, test, None,
                      source="committed (the digits 0-9)")


# ---- CIFAR-100 (torchvision layout: cifar-100-python/ pickles) --------------------------------
def _unpickle(domain: str, path: Path) -> dict:
    _require(domain, path, f"CIFAR-100 file {path.name}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")  # the official format; the user's own file
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a broken file
        raise DataMalformed(domain, path, f"not a CIFAR-100 python pickle ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise DataMalformed(domain, path, "not a CIFAR-100 python pickle (no dict inside)")
    return obj


def _cifar_split(domain: str, path: Path, num_classes: int) -> ArrayImageSet:
    d = _unpickle(domain, path)
    if b"data" not in d or b"fine_labels" not in d:
        raise DataMalformed(domain, path, "no b'data' / b'fine_labels' entries")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"fine_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataMalformed(domain, path, f"expected uint8 data of shape (N, 3072) and N labels, got {data.shape} and {len(labels)}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataMalformed(domain, path, f"fine label {int(labels.max())} outside the {num_classes} names of meta")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return ArrayImageSet(images, labels)


@_dataset("cifar100", "CIFAR-100", ["cifar-100-python", "cifar100/cifar-100-python"], ["meta"],
          "train, test and meta (python pickles)")
def load_cifar100(domain: str, root: Path) -> DomainData:
    meta_path = root / "meta"
    meta = _unpickle(domain, meta_path)
    names = meta.get(b"fine_label_names")
    if not isinstance(names, list) or not names:
        raise DataMalformed(domain, meta_path, "no b'fine_label_names' list")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    train = _cifar_split(domain, root / "train", len(names))
    test = _cifar_split(domain, root / "test", len(names))
    return DomainData(domain, root, [C.prompt_name(n) for n in names], train, test, None,
                      source=f"{meta_path} (fine_label_names)")
