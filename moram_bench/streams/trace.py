"""TRACE (Wang et al. 2023): 8 LLM tasks read from a user's folder, ``stream=trace data_dir=PATH``.

Layout (the official release, e.g. ``LLM-CL-Benchmark_5000``)::

    PATH/C-STANCE/{train,eval,test}.json   ...   PATH/20Minuten/{train,eval,test}.json

each a JSON list of ``{"prompt": str, "answer": str}``. Task folders are matched
case-insensitively; train.json and test.json are read (eval.json is the official
validation split, not used by the protocol). Nothing here may be committed (licences).

Order and scoring (docs/PROTOCOLS.md): C-STANCE and FOMC: first option letter; MeetingBank:
ROUGE-L F; Py150: edit similarity after restoring literal placeholders; ScienceQA: first
character; NumGLUE-cm and NumGLUE-ds: numeric answer; 20Minuten: SARI with the prompt as
source. Epochs per task 2,1,3,2,1,2,2,3 (the official MoRAM TRACE runner), unless
``stream.epochs`` (all tasks) is set. Decoding and loss follow the official runner by
default: up to 512 new tokens for every task (``stream.max_new_tokens``: null, one
value, or a per-task mapping), prompt and answer truncated jointly
(``truncation_scope: joint``), the start of MeetingBank's transcripts kept
(``task_truncation``), the loss averaged per sample (``loss_average: sample``); see
``moram_bench.protocols.text``. ``stream.max_train`` / ``stream.max_test`` cap the splits
with a fixed-seed subset (``stream.subset_seed``), identical for every method;
``stream.tasks`` selects or reorders tasks.
"""
from __future__ import annotations

from pathlib import Path

from ..check_data import DomainReport, register_data_check
from ..protocols.text import text_settings
from ..registry import register_stream
from .base import Stream, StreamError, Task
from .textdata import (DataFileError, TextPairs, capped, find_child, hf_cache_dir, malformed, missing, read_json_records,
                       require_data_dir, select_tasks, subset_seed)

TRACE_TASKS = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")
TRACE_SCORERS = {"C-STANCE": "option_letter", "FOMC": "option_letter", "MeetingBank": "rouge_l",
                 "Py150": "code_edit_sim", "ScienceQA": "first_char", "NumGLUE-cm": "numeric",
                 "NumGLUE-ds": "numeric", "20Minuten": "sari"}
TRACE_EPOCHS = {"C-STANCE": 2, "FOMC": 1, "MeetingBank": 3, "Py150": 2, "ScienceQA": 1, "NumGLUE-cm": 2,
                "NumGLUE-ds": 2, "20Minuten": 3}
PAIR = 'a JSON list of {"prompt": str, "answer": str} records'


def read_pairs(path, cache_dir=None) -> TextPairs:
    """A TRACE-format file (list of {"prompt", "answer"}) as ``TextPairs``."""
    cols = read_json_records(path, ("prompt", "answer"), PAIR, cache_dir)
    return TextPairs(cols["prompt"], cols["answer"])


def load_task_folder(folder, name: str, cache_dir=None, splits=("train", "test")) -> dict[str, TextPairs]:
    """The splits of one task folder; StreamError if the folder or a file is missing/malformed."""
    out = {}
    for split in splits:
        ds = read_pairs(folder / f"{split}.json", cache_dir)
        if len(ds) == 0:
            raise malformed(folder / f"{split}.json", "no records", PAIR)
        out[split] = ds
    return out


def find_task_folder(root, name: str):
    """``root/name`` (case-insensitive) or a DataFileError."""
    folder = find_child(root, name)
    if folder is None:
        raise missing(root / name, "task folder", f"train.json, eval.json and test.json with {PAIR}")
    return folder


def per_task(value, name: str, order, default):
    """A per-task setting given as a mapping (task -> value, case-insensitive), a list in
    the stream's official ``order``, or one value for every task; ``default`` if unset."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return default
    if isinstance(value, dict):
        for k, v in value.items():
            if str(k).lower() == name.lower():
                return default if v is None else v
        return default
    if isinstance(value, (list, tuple)):
        i = list(order).index(name)
        if i >= len(value):
            raise StreamError(f"per-task setting {value} has no entry for task {i + 1} ({name})")
        return value[i]
    return value


@register_stream("trace")
def build_trace(cfg) -> Stream:
    """TRACE: 8 LLM tasks (C-STANCE ... 20Minuten) from data_dir, official order and scorers."""
    s = cfg.stream
    root = require_data_dir(cfg, "trace", "a folder holding the 8 TRACE task folders " + ", ".join(TRACE_TASKS)
                            + ", each with train.json, eval.json and test.json")
    names = select_tasks(TRACE_TASKS, s.get("tasks"), "trace")
    cache = hf_cache_dir(cfg)
    seed = int(s.get("subset_seed", 0) or 0)
    tasks = []
    for name in names:
        folder = find_task_folder(root, name)
        splits = load_task_folder(folder, name, cache)
        # per-task epochs unless `epochs` (one value) is set or `task_epochs` is null (iterations)
        epochs = None
        if s.get("epochs") is None and s.get("task_epochs") is not None:
            epochs = per_task(s.get("task_epochs"), name, TRACE_TASKS, TRACE_EPOCHS[name])
        tasks.append(Task(name=name, train=capped(splits["train"], s.get("max_train"), subset_seed(seed, name, "train")),
                          test=capped(splits["test"], s.get("max_test"), subset_seed(seed, name, "test")),
                          scorer=TRACE_SCORERS[name],
                          max_new_tokens=int(per_task(s.get("max_new_tokens"), name, TRACE_TASKS, 512)),
                          epochs=float(epochs) if epochs is not None else None,
                          extra={"folder": str(folder)}))
    settings = text_settings(s)
    settings.update(data_dir=str(root), max_train=s.get("max_train"), max_test=s.get("max_test"), subset_seed=seed)
    return Stream(name="trace", modality="text", tasks=tasks, settings=settings)


def report_task(name: str, load) -> DomainReport:
    """A check-data line for one text task; ``load()`` returns (folder, {split: dataset})."""
    try:
        folder, splits = load()
    except DataFileError as e:
        return DomainReport(name, e.kind, e.path, e.detail)
    return DomainReport(name, "found", str(folder), counts={k: len(v) for k, v in splits.items()})


@register_data_check("trace")
def check_trace(cfg, verify_images: bool = False) -> list[DomainReport]:
    """check-data for TRACE: every selected task folder and its train/test files."""
    root = Path(str(cfg.data_dir)).expanduser()
    cache = hf_cache_dir(cfg)

    def loader(name):
        def load():
            folder = find_task_folder(root, name)
            return folder, load_task_folder(folder, name, cache)
        return load

    return [report_task(n, loader(n)) for n in select_tasks(TRACE_TASKS, cfg.stream.get("tasks"), "trace")]
