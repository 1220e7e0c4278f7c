"""Per-domain definitions committed with the streams: prompt templates, class-name fixes
and the class counts of the full datasets.

Where class names come from (see docs/REAL_BENCHMARKS.md):

- committed here: MNIST (the ten digits) and CoOp's renamings for EuroSAT and Caltech101
  (applied when a split file still carries the raw folder names);
- read from the user's data at load time, in label order:
  the CoOp split files (``split_zhou_*.json``; Caltech101, DTD, EuroSAT, Food-101,
  Oxford Flowers, Oxford Pets, Stanford Cars, SUN397), ``variants.txt`` (FGVC-Aircraft)
  and ``cifar-100-python/meta`` (CIFAR-100).

The loaders return cleaned names (underscores become spaces, as CoOp's zero-shot CLIP
does). What the text encoder finally reads is decided per stream by a *prompt set*
(``stream.prompts``, see :func:`prompt_inputs`):

- ``official`` (default of ``xtail`` and ``mtil``): the official MoRAM X-TAIL code's inputs:
  its one template per dataset (:data:`TEMPLATES`), class names of the CoOp split files
  verbatim (underscores kept, e.g. ``apple_pie``), EuroSAT names followed by
  ``" satellite location"``, MNIST names as torchvision spells them prefixed with
  ``number: "..."`` (e.g. ``number: "0 - zero"``);
- ``coop``: CoOp's hand-written zero-shot templates (:data:`COOP_TEMPLATES`, ``CUSTOM_TEMPLATES``
  in its zero-shot trainer) with the cleaned names (this project's earlier inputs).
"""
from __future__ import annotations

# the official MoRAM X-TAIL code's template per dataset (its scenario_datasets modules)
TEMPLATES: dict[str, str] = {
    "aircraft": "a photo of a {}, a type of aircraft.",
    "caltech101": "a photo of a {}.",
    "cifar100": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of the {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of a {}, a type of food.",
    "mnist": 'a photo of the number: "{}".',
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "sun397": "a photo of a {}.",
}

# CoOp's hand-written zero-shot prompts (differ from the above for EuroSAT and Food-101)
COOP_TEMPLATES: dict[str, str] = dict(TEMPLATES, eurosat="a centered satellite photo of {}.",
                                      food101="a photo of {}, a type of food.")

PROMPT_SETS = ("official", "coop")

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

# torchvision's MNIST class names (``datasets.MNIST.classes``), which the official code
# wraps as ``number: "<name>"`` before filling its template
MNIST_TORCHVISION_NAMES: list[str] = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five",
                                      "6 - six", "7 - seven", "8 - eight", "9 - nine"]

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


def prompt_inputs(domain: str, names: list[str], raw_names: list[str] | None,
                  prompt_set: str = "official") -> tuple[str, list[str]]:
    """(template, class names) the text encoder reads for ``domain`` under ``prompt_set``.

    ``names``: the loader's cleaned names; ``raw_names``: the names as the dataset's own
    files spell them (None where the loader has no such list: the official code cleans
    those too, CIFAR-100, or writes them itself, MNIST)."""
    if prompt_set == "coop":
        return COOP_TEMPLATES[domain], list(names)
    if prompt_set != "official":
        raise ValueError(f"unknown prompt set {prompt_set!r}; choose among {', '.join(PROMPT_SETS)}")
    out = list(raw_names) if raw_names is not None else list(names)
    if domain == "eurosat":
        out = [n + " satellite location" for n in out]
    elif domain == "mnist" and out == MNIST_CLASSNAMES:
        out = [f'number: "{n}"' for n in MNIST_TORCHVISION_NAMES]
    return TEMPLATES[domain], out
