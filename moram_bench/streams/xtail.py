"""The real CLIP continual-learning streams, read from a user's local datasets.

- ``xtail``: X-TAIL (cross-domain task-agnostic incremental learning). Ten domains in the
  official order, ``shots`` (16) training samples per class drawn from each train split by
  a generator seeded only by ``shot_seed`` (so every method, run seed and world size gets
  the same samples), full test splits, ONE label space over the classes of all domains of
  the stream (1,100 for the ten), one template per domain, no domain id at test.
- ``mtil``: MTIL order I. Eleven domains (CIFAR-100 added), every training sample
  (full-shot), each domain scored in its own label space.

Settings (``conf/stream/{xtail,mtil}.yaml``): ``domains`` (null: the official order; a list
selects and orders domains), ``shots`` (null: full-shot), ``shot_seed``,
``max_test_per_domain`` (null: full test splits; else a fixed, seeded subset for quick
runs), ``prompts`` (``official``: the official MoRAM X-TAIL code's templates and class
names; ``coop``: CoOp's zero-shot templates with cleaned names; see ``streams.classnames``)
and ``train_transform`` (``train``: training images through open_clip's training
transform, as the official code does; ``eval``: through the evaluation transform).
Everything that decides the samples and the prompts is recorded in ``Stream.settings``.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..check_data import DomainReport, check_domain, register_data_check
from ..registry import register_stream
from . import classnames as C
from .base import Stream, StreamError, Task, few_shot_indices
from .coop import DATASETS, load_domain

XTAIL_DOMAINS = ("aircraft", "caltech101", "dtd", "eurosat", "oxford_flowers", "food101", "mnist",
                 "oxford_pets", "stanford_cars", "sun397")
MTIL_DOMAINS = ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "oxford_flowers", "food101", "mnist",
                "oxford_pets", "stanford_cars", "sun397")

PROTOCOLS: dict[str, dict[str, Any]] = {
    "xtail": {"title": "X-TAIL", "domains": XTAIL_DOMAINS, "label_space": "union"},
    "mtil": {"title": "MTIL order I", "domains": MTIL_DOMAINS, "label_space": "per_task"},
}


def stream_domains(cfg, name: str) -> list[str]:
    """The domains of stream ``name`` in order: ``cfg.stream.domains`` or the official list."""
    chosen = cfg.stream.get("domains")
    if chosen is None:
        return list(PROTOCOLS[name]["domains"])
    if isinstance(chosen, str):
        chosen = [chosen]
    domains = [str(d) for d in chosen]
    if not domains:
        raise StreamError(f"stream.domains is empty; choose among {', '.join(PROTOCOLS[name]['domains'])}")
    unknown = [d for d in domains if d not in DATASETS]
    if unknown:
        raise StreamError(f"unknown domain {unknown[0]!r} in stream.domains; valid domains: {', '.join(sorted(DATASETS))}")
    dup = next((d for d in domains if domains.count(d) > 1), None)
    if dup:
        raise StreamError(f"domain {dup!r} appears twice in stream.domains")
    return domains


def _positive_or_none(scfg, key: str) -> int | None:
    value = scfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise StreamError(f"stream.{key} must be a positive integer or null, got {value!r}")
    return int(value)


def eval_subset_indices(n: int, k: int, seed: int) -> np.ndarray:
    """A fixed subset of ``k`` of ``n`` test samples (sorted), seeded only by ``seed``."""
    rng = np.random.default_rng([seed, 0x7E57])
    return np.sort(rng.choice(n, size=k, replace=False))


def _names_hash(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


def build_clip_stream(cfg, name: str) -> Stream:
    proto = PROTOCOLS[name]
    scfg = cfg.stream
    domains = stream_domains(cfg, name)
    shots = _positive_or_none(scfg, "shots")
    shot_seed = scfg.get("shot_seed", 1)
    if isinstance(shot_seed, bool) or not isinstance(shot_seed, int):  # null too: never the run seed
        raise StreamError(f"stream.shot_seed must be an integer, got {shot_seed!r}")
    max_test = _positive_or_none(scfg, "max_test_per_domain")
    prompt_set = scfg.get("prompts", "official")
    if prompt_set not in C.PROMPT_SETS:
        raise StreamError(f"stream.prompts must be one of {', '.join(C.PROMPT_SETS)}, got {prompt_set!r}")
    train_transform = scfg.get("train_transform", "train")
    if train_transform not in ("train", "eval"):
        raise StreamError(f"stream.train_transform must be train or eval, got {train_transform!r}")
    data_dir = cfg.get("data_dir")
    if data_dir is None or str(data_dir) == "":
        raise StreamError(f"stream {name} reads local datasets: set data_dir=PATH "
                          "(the folder holding them; layouts in docs/REAL_BENCHMARKS.md)")

    tasks, per_domain, templates = [], {}, {}
    for d in domains:
        data = load_domain(d, data_dir)
        train = data.train
        if shots is not None:
            train = train.subset(few_shot_indices(train.labels, shots, int(shot_seed)))
        test = data.test
        if max_test is not None and len(test) > max_test:
            test = test.subset(eval_subset_indices(len(test), max_test, int(shot_seed)))
        template, names = C.prompt_inputs(d, data.classnames, data.raw_classnames, prompt_set)
        templates[d] = template
        tasks.append(Task(name=d, train=train, test=test, classnames=names, template=template,
                          extra={"domain": d, "root": str(data.root), "classnames_source": data.source}))
        per_domain[d] = {"classes": len(names), "train": len(train), "test": len(test),
                         "classnames_sha": _names_hash(names)}

    settings = {
        "protocol": proto["title"],
        "domains": domains,
        "shots": shots if shots is not None else "all",
        "shot_seed": int(shot_seed),
        "test": "full" if max_test is None else f"seeded subset of at most {max_test} per domain",
        "max_test_per_domain": max_test,
        "label_space": proto["label_space"],
        "num_classes": sum(v["classes"] for v in per_domain.values()),
        "prompts": prompt_set,
        "templates": templates,
        "train_transform": train_transform,  # requested; the DataModule records what it used
        "per_domain": per_domain,
        "domain_id_at_test": False,
    }
    return Stream(name, "image", tasks, label_space=proto["label_space"], settings=settings)


@register_stream("xtail")
def build_xtail(cfg) -> Stream:
    """X-TAIL: 10 CoOp domains, 16 shots/class (fixed shot_seed), one label space over 1,100 classes (data_dir)."""
    return build_clip_stream(cfg, "xtail")


@register_stream("mtil")
def build_mtil(cfg) -> Stream:
    """MTIL order I: 11 domains incl. CIFAR-100, full-shot, per-domain label spaces (data_dir)."""
    return build_clip_stream(cfg, "mtil")


@register_data_check("xtail")
@register_data_check("mtil")
def check_clip_stream(cfg, verify_images: bool = False) -> list[DomainReport]:
    """Check-data for both streams: every selected domain, in stream order."""
    name = str(cfg.stream.name)
    return [check_domain(d, cfg.data_dir, verify_images=verify_images) for d in stream_domains(cfg, name)]
