"""The eleven X-TAIL/MTIL dataset loaders on tiny fixtures written in each dataset's real
layout (CoOp's DATASETS.md folders and split files, torchvision's MNIST IDX files and
CIFAR-100 pickles). Each image's pixel value encodes its label, so a wrong path/label
pairing is caught when the image is decoded.

``make_domain`` is also used by test_xtail_protocol.py.
"""
from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moram_bench.streams import classnames as C
from moram_bench.streams.base import StreamError
from moram_bench.streams.coop import (DATASETS, DataMalformed, DataMissing, DomainData, IdxImageSet,
                                      dataset_root, load_domain)

ALL_DOMAINS = ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "oxford_flowers", "food101", "mnist",
               "oxford_pets", "stanford_cars", "sun397")

# CoOp split-file datasets: folder, image folder, split file, classes as
# (folder name on disk or None, class name in the split file, name shown to the text encoder)
COOP = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   [("accordion", "accordion", "accordion"), ("airplanes", "airplane", "airplane"),
                    ("Leopards", "leopard", "leopard")]),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                    [("Abyssinian", "abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog", "american bulldog"),
                     ("Bengal", "bengal", "bengal")]),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json",
                      [(None, "2012 AM General Hummer SUV", "2012 AM General Hummer SUV"),
                       (None, "2012 Acura RL Sedan", "2012 Acura RL Sedan"),
                       (None, "2007 BMW X5 SUV", "2007 BMW X5 SUV")]),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                       [(None, "pink primrose", "pink primrose"),
                        (None, "hard-leaved pocket orchid", "hard-leaved pocket orchid"),
                        (None, "canterbury bells", "canterbury bells")]),
    "food101": ("food-101", "images", "split_zhou_Food101.json",
                [("apple_pie", "apple_pie", "apple pie"), ("baby_back_ribs", "baby_back_ribs", "baby back ribs"),
                 ("baklava", "baklava", "baklava")]),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json",
               [("a/abbey", "abbey", "abbey"), ("a/apse/indoor", "indoor apse", "indoor apse"),
                ("a/airplane_cabin", "airplane_cabin", "airplane cabin")]),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json",
            [("banded", "banded", "banded"), ("blotchy", "blotchy", "blotchy"), ("braided", "braided", "braided")]),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json",
                [("AnnualCrop", "Annual Crop Land", "Annual Crop Land"), ("Forest", "Forest", "Forest"),
                 ("SeaLake", "Sea or Lake", "Sea or Lake")]),
}
AIRCRAFT_VARIANTS = ["707-320", "A300B4", "Cessna 172"]
CIFAR_NAMES = ["apple", "aquarium_fish", "baby"]


def pixel(label: int) -> int:
    return 30 + 60 * label


def write_image(path: Path, label: int, size=(8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), pixel(label), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG", quality=95)


def _rel_path(domain: str, folder: str | None, label: int, n: int, part: str) -> str:
    if domain == "caltech101":
        return f"{folder}/image_{n:04d}.jpg"
    if domain == "oxford_pets":
        return f"{folder}_{n}.jpg"
    if domain == "stanford_cars":
        return f"cars_{'test' if part == 'test' else 'train'}/{label}{n:04d}.jpg"
    if domain == "oxford_flowers":
        return f"image_{label}{n:04d}.jpg"
    if domain == "food101":
        return f"{folder}/{1000 + n}.jpg"
    if domain == "sun397":
        return f"{folder}/sun_{n:04d}.jpg"
    if domain == "dtd":
        return f"{folder}/{folder}_{n:04d}.jpg"
    return f"{folder}/{folder}_{n}.jpg"  # eurosat


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_domain(data_dir: Path, domain: str, train_per_class: int = 5, test_per_class: int = 2,
                val_per_class: int = 1, raw_names: bool = False, root: Path | None = None) -> dict:
    """Write a tiny copy of ``domain`` in its real layout under ``data_dir``; returns what the
    loader must find (prompt-ready class names and split sizes)."""
    data_dir = Path(data_dir)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    if domain in COOP:
        folder, images, split_name, classes = COOP[domain]
        root = root or data_dir / folder
        image_dir = root / images if images else root
        split = {"train": [], "val": [], "test": []}
        n = 0
        for label, (cfolder, split_name_cls, _) in enumerate(classes):
            for part in ("train", "val", "test"):
                for _ in range(counts[part]):
                    n += 1
                    rel = _rel_path(domain, cfolder, label, n, part)
                    write_image(image_dir / rel, label)
                    name = cfolder if raw_names and cfolder else split_name_cls
                    split[part].append([rel, label, name])
        root.mkdir(parents=True, exist_ok=True)
        (root / split_name).write_text(json.dumps(split))
        # the other files of the real layout (not read by the loaders)
        if domain == "oxford_pets":
            (root / "annotations").mkdir(exist_ok=True)
            (root / "annotations" / "list.txt").write_text("#Image CLASS-ID SPECIES BREED ID\n")
        if domain == "oxford_flowers":
            (root / "cat_to_name.json").write_text(json.dumps({str(i + 1): c[1] for i, c in enumerate(classes)}))
        if domain == "dtd":
            for sub in ("imdb", "labels"):
                (root / sub).mkdir(exist_ok=True)
        names = [c[2] for c in classes]
    elif domain == "aircraft":
        root = root or data_dir / "fgvc_aircraft"
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "variants.txt").write_text("\n".join(AIRCRAFT_VARIANTS) + "\n")
        n = 1000000
        for part in ("train", "val", "test"):
            lines = []
            for label, v in enumerate(AIRCRAFT_VARIANTS):
                for _ in range(counts[part]):
                    n += 1
                    write_image(root / "images" / f"{n}.jpg", label)
                    lines.append(f"{n} {v}")
            (root / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
        names = list(AIRCRAFT_VARIANTS)
    elif domain == "mnist":
        raw = root or data_dir / "MNIST" / "raw"
        for part, prefix, gz in (("train", "train", True), ("test", "t10k", False)):
            labels = np.repeat(np.arange(10), counts[part]).astype(np.uint8)
            images = np.repeat(labels[:, None, None], 28 * 28, axis=1).reshape(-1, 28, 28) * 20 + 10
            suffix = ".gz" if gz else ""
            _idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images.astype(np.uint8))
            _idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        names = [str(d) for d in range(10)]
        counts = {"train": 10 * train_per_class, "test": 10 * test_per_class}
        return {"classnames": names, "train": counts["train"], "test": counts["test"], "val": None}
    elif domain == "cifar100":
        root = root or data_dir / "cifar-100-python"
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "meta", "wb") as f:
            pickle.dump({b"fine_label_names": [s.encode() for s in CIFAR_NAMES],
                         b"coarse_label_names": [b"fruit_and_vegetables", b"fish", b"people"]}, f)
        for part in ("train", "test"):
            labels = [lab for lab in range(len(CIFAR_NAMES)) for _ in range(counts[part])]
            data = np.stack([np.full(3072, pixel(lab), dtype=np.uint8) for lab in labels])
            with open(root / part, "wb") as f:
                pickle.dump({b"filenames": [b"x.png"] * len(labels), b"fine_labels": labels,
                             b"coarse_labels": labels, b"data": data}, f)
        names = ["apple", "aquarium fish", "baby"]
        return {"classnames": names, "train": 3 * train_per_class, "test": 3 * test_per_class, "val": None}
    else:  # pragma: no cover
        raise KeyError(domain)
    k = len(names)
    return {"classnames": names, "train": k * train_per_class, "test": k * test_per_class, "val": k * val_per_class}


def mean_pixel(im: Image.Image) -> float:
    return float(np.asarray(im.convert("L"), dtype=np.float64).mean())


# ---- every dataset through its real loader -----------------------------------------------------
def test_every_domain_has_a_loader_and_a_template():
    assert set(DATASETS) == set(ALL_DOMAINS)
    assert set(C.TEMPLATES) == set(ALL_DOMAINS)
    for t in C.TEMPLATES.values():
        assert t.count("{}") == 1
    assert sum(C.NUM_CLASSES[d] for d in ALL_DOMAINS if d != "cifar100") == 1100


@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_loader_reads_the_real_layout(tmp_path, domain):
    expected = make_domain(tmp_path, domain)
    data = load_domain(domain, tmp_path)
    assert isinstance(data, DomainData)
    assert data.classnames == expected["classnames"]
    assert len(data.train) == expected["train"] and len(data.test) == expected["test"]
    if expected["val"] is None:
        assert data.val is None
    else:
        assert len(data.val) == expected["val"]
    k = len(expected["classnames"])
    for part in (data.train, data.test):
        assert sorted(set(part.labels.tolist())) == list(range(k))
        assert part.labels.dtype == np.int64
    assert data.source  # where the class names came from is recorded
    # the image at each index carries the label the split gives it (first and last of each part)
    for part in (data.train, data.test):
        for i in (0, len(part) - 1):
            item = part[i]
            assert item["image"].mode == "RGB"
            got = mean_pixel(item["image"])
            want = (pixel(item["label"]) if domain != "mnist" else 10 + 20 * item["label"])
            assert abs(got - want) < 6, (domain, i, got, want)
    # a tiny fixture has fewer classes than the full dataset: a note, not an error
    assert any("full dataset has" in n for n in data.notes) == (domain != "mnist")


def test_split_file_paths_are_relative_to_the_image_folder(tmp_path):
    make_domain(tmp_path, "sun397")
    data = load_domain("sun397", tmp_path)
    assert data.train.paths[0].startswith(str(tmp_path / "sun397" / "SUN397" / "a" / "abbey"))
    make_domain(tmp_path, "stanford_cars")
    cars = load_domain("stanford_cars", tmp_path)
    assert all("/cars_test/" in p for p in cars.test.paths)
    assert all("/cars_train/" in p for p in cars.train.paths)


def test_coop_renamings_apply_to_raw_folder_names(tmp_path):
    make_domain(tmp_path, "eurosat", raw_names=True)
    assert load_domain("eurosat", tmp_path).classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]
    make_domain(tmp_path, "caltech101", raw_names=True)
    assert load_domain("caltech101", tmp_path).classnames == ["accordion", "airplane", "leopard"]


@pytest.mark.parametrize("domain,folder", [("dtd", "dtd/dtd"), ("aircraft", "fgvc_aircraft/data"),
                                           ("mnist", "mnist/MNIST/raw")])
def test_common_layout_variants_are_accepted(tmp_path, domain, folder):
    make_domain(tmp_path, domain, root=tmp_path / folder)
    assert dataset_root(domain, tmp_path) == tmp_path / folder
    assert len(load_domain(domain, tmp_path).train) > 0


def test_mnist_reads_gzipped_and_plain_idx_lazily(tmp_path):
    make_domain(tmp_path, "mnist")
    data = load_domain("mnist", tmp_path)
    assert isinstance(data.train, IdxImageSet) and data.train.path.suffix == ".gz"
    assert data.test.path.suffix == ""
    assert data.train._array is None  # nothing but labels read at construction
    assert data.train.image(0).size == (28, 28)
    state = data.train.__getstate__()
    assert state["_array"] is None  # DataLoader workers do not receive the pixels
    assert data.train.fingerprint() == load_domain("mnist", tmp_path).train.fingerprint()


# ---- missing and malformed data: exact paths ------------------------------------------------
def test_missing_pieces_name_the_exact_path(tmp_path):
    with pytest.raises(DataMissing) as e:
        load_domain("dtd", tmp_path)
    assert e.value.path == str(tmp_path / "dtd")
    make_domain(tmp_path, "dtd")
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(DataMissing) as e:
        load_domain("dtd", tmp_path)
    assert e.value.path == str(tmp_path / "dtd" / "split_zhou_DescribableTextures.json")
    assert "CoOp split file" in str(e.value) and "\n" not in str(e.value)

    make_domain(tmp_path, "food101")
    import shutil
    shutil.rmtree(tmp_path / "food-101" / "images" / "baklava")
    with pytest.raises(DataMissing) as e:
        load_domain("food101", tmp_path)
    assert e.value.path == str(tmp_path / "food-101" / "images" / "baklava")

    make_domain(tmp_path, "mnist")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataMissing) as e:
        load_domain("mnist", tmp_path)
    assert e.value.path == str(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")

    make_domain(tmp_path, "aircraft")
    (tmp_path / "fgvc_aircraft" / "images_variant_test.txt").unlink()
    with pytest.raises(DataMissing) as e:
        load_domain("aircraft", tmp_path)
    assert e.value.path == str(tmp_path / "fgvc_aircraft" / "images_variant_test.txt")


def _rewrite_split(path: Path, fn) -> None:
    split = json.loads(path.read_text())
    fn(split)
    path.write_text(json.dumps(split))


@pytest.mark.parametrize("breakage,message", [
    (lambda p: p.write_text("{not json"), "not valid JSON"),
    (lambda p: p.write_text(json.dumps([["a.jpg", 0, "x"]])), "expected an object"),
    (lambda p: _rewrite_split(p, lambda s: s.pop("test")), "no 'test' list"),
    (lambda p: _rewrite_split(p, lambda s: s["train"].append(["x.jpg", "0", "banded"])), "is not [path, label, classname]"),
    (lambda p: _rewrite_split(p, lambda s: s["train"].append(["banded/x.jpg", 0, "striped"])), "named both"),
    (lambda p: _rewrite_split(p, lambda s: s.update(test=[e for e in s["test"] if e[1] != 1],
                                                     train=[e for e in s["train"] if e[1] != 1],
                                                     val=[e for e in s["val"] if e[1] != 1])), "label 1 never occurs"),
    (lambda p: _rewrite_split(p, lambda s: s["train"].append(["../../etc/passwd", 0, "banded"])), "not relative"),
])
def test_malformed_split_files(tmp_path, breakage, message):
    make_domain(tmp_path, "dtd")
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    breakage(path)
    with pytest.raises(DataMalformed) as e:
        load_domain("dtd", tmp_path)
    assert e.value.path == str(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, StreamError)


def test_malformed_aircraft_mnist_and_cifar(tmp_path):
    make_domain(tmp_path, "aircraft")
    path = tmp_path / "fgvc_aircraft" / "images_variant_train.txt"
    path.write_text(path.read_text() + "1234567 Boeing 999\n")
    with pytest.raises(DataMalformed, match="'Boeing 999' is not in variants.txt") as e:
        load_domain("aircraft", tmp_path)
    assert e.value.path == str(path)

    make_domain(tmp_path, "mnist")
    bad = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01" + bad.read_bytes()[4:])  # wrong number of dimensions
    with pytest.raises(DataMalformed, match="IDX") as e:
        load_domain("mnist", tmp_path)
    assert e.value.path == str(bad)
    make_domain(tmp_path, "mnist")
    bad.write_bytes(bad.read_bytes()[:100])  # truncated pixels
    with pytest.raises(DataMalformed, match="truncated"):
        load_domain("mnist", tmp_path)
    make_domain(tmp_path, "mnist")
    gz = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataMalformed, match="cannot be read") as e:
        load_domain("mnist", tmp_path)
    assert e.value.path == str(gz)

    make_domain(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"garbage")
    with pytest.raises(DataMalformed, match="not a CIFAR-100 python pickle") as e:
        load_domain("cifar100", tmp_path)
    assert e.value.path == str(tmp_path / "cifar-100-python" / "test")


def test_unknown_domain_and_unset_data_dir(tmp_path):
    with pytest.raises(StreamError, match="unknown domain 'imagenet'"):
        load_domain("imagenet", tmp_path)
    with pytest.raises(StreamError, match="data_dir is not set"):
        load_domain("dtd", None)
