"""Per-domain definitions committed with the streams: prompt templates, class-name fixes
and the class counts of the full datasets.

Where class names come from (see docs/REAL_BENCHMARKS.md):

- committed here: MNIST (the ten digits) and CoOp's renamings for EuroSAT and Caltech101
  (applied when a split file still carries the raw folder names);
- read from the user's data at load time, in label order:
  the CoOp split files (``split_zhou_*.json``; Caltech101, DTD, EuroSAT, Food-101,
  Oxford Flowers, Oxford Pets, Stanford Cars, SUN397), ``variants.txt`` (FGVC-Aircraft)
  and ``cifar-100-python/meta`` (CIFAR-100).

Every class name is shown to the text encoder with underscores replaced by spaces, as
CoOp's zero-shot CLIP does.

The templates are CoOp's single hand-written prompt per dataset (``CUSTOM_TEMPLATES`` in
its zero-shot trainer), the ones X-TAIL and MTIL evaluate with.
"""
from __future__ import annotations

TEMPLATES: dict[str, str] = {
    "aircraft": "a photo of a {}, a type of aircraft.",
    "caltech101": "a photo of a {}.",
    "cifar100": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "mnist": 'a photo of the number: "{}".',
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "sun397": "a photo of a {}.",
}

# number of classes of each full dataset (X-TAIL's ten domains sum to 1,100)
NUM_CLASSES: dict[str, int] = {
    "aircraft": 100,
    "caltech101": 100,
    "cifar100": 100,
    "dtd": 47,
    "eurosat": 10,
    "oxford_flowers": 102,
    "food101": 101,
    "mnist": 10,
    "oxford_pets": 37,
    "stanford_cars": 196,
    "sun397": 397,
}

MNIST_CLASSNAMES: list[str] = [str(d) for d in range(10)]

# CoOp renames EuroSAT's folder names into words CLIP reads better
EUROSAT_RENAME: dict[str, str] = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

# CoOp's renaming of Caltech101 folders (BACKGROUND_Google and Faces_easy are not classes)
CALTECH101_RENAME: dict[str, str] = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}


def prompt_name(name: str) -> str:
    """The class name as the text encoder sees it."""
    return " ".join(name.replace("_", " ").split())
