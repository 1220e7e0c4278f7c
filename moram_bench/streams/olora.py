"""The O-LoRA benchmarks (Wang et al. 2023): ``stream=olora stream.order=1`` ... ``6``
(``stream=olora-order1`` ... ``olora-order6`` are aliases).

Orders 1-3 are the Standard CL benchmark (4 text-classification tasks), orders 4-6 the
long sequence (15 tasks). Data: the O-LoRA ``CL_Benchmark`` folder from the user,
``data_dir=PATH`` where PATH is ``CL_Benchmark`` itself or its parent::

    CL_Benchmark/<type>/<name>/{train,dev,test}.json   # lists of {"sentence": str, "label": str}
    CL_Benchmark/<type>/<name>/labels.json             # the list of label strings

``<type>`` is any folder (TC, SC, NLI, ...); task folders are found by name,
case-insensitively. train.json and test.json are read; dev.json is not used.

Input (docs/PROTOCOLS.md): ``"{instruction}Option: {labels joined by ', '} \\n{sentence}\\nAnswer:"``,
target: the label string; scored by exact match after lower-casing and stripping
punctuation and extra spaces. The instructions are ours, one per task kind
(``OLORA_INSTRUCTIONS``), overridable per task with ``stream.instructions``; O-LoRA's own
wording is not shipped. Records whose label is not in labels.json are an error.
"""
from __future__ import annotations

from pathlib import Path

from ..check_data import register_data_check
from ..protocols.text import text_settings
from ..registry import register_stream
from .base import Stream, StreamError, Task
from .textdata import (TextPairs, capped, find_child, hf_cache_dir, malformed, missing, read_json_list,
                       read_json_records, require_data_dir, select_tasks, subset_seed)

OLORA_ORDERS: dict[int, tuple[str, ...]] = {
    1: ("dbpedia", "amazon", "yahoo", "agnews"),
    2: ("dbpedia", "amazon", "agnews", "yahoo"),
    3: ("yahoo", "amazon", "agnews", "dbpedia"),
    4: ("mnli", "cb", "wic", "copa", "qqp", "boolq", "rte", "imdb", "yelp", "amazon", "sst-2", "dbpedia",
        "agnews", "multirc", "yahoo"),
    5: ("multirc", "boolq", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia", "agnews",
        "yelp", "amazon", "yahoo"),
    6: ("yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia", "agnews", "yahoo",
        "multirc", "boolq", "wic"),
}
_TOPIC = "What is the topic of the following text? "
_SENTIMENT = "What is the sentiment of the following review? "
_NLI = "What is the logical relationship between the premise and the hypothesis? "
OLORA_INSTRUCTIONS = {
    "dbpedia": _TOPIC, "agnews": _TOPIC, "yahoo": _TOPIC,
    "amazon": _SENTIMENT, "yelp": _SENTIMENT, "imdb": _SENTIMENT, "sst-2": _SENTIMENT,
    "mnli": _NLI, "cb": _NLI, "rte": _NLI,
    "qqp": "Do the two questions ask the same thing? ",
    "boolq": "According to the passage, what is the answer to the question? ",
    "copa": "Which alternative is the more plausible cause or effect of the premise? ",
    "wic": "Is the word used with the same meaning in both sentences? ",
    "multirc": "According to the paragraph, is the answer to the question correct? ",
}
RECORD = 'a JSON list of {"sentence": str, "label": str} records'
LAYOUT = "CL_Benchmark/<type>/<task>/{train,dev,test}.json and labels.json"


def format_input(instruction: str, labels: list[str], sentence: str) -> str:
    """O-LoRA's input: instruction, the options, the sentence and the answer cue."""
    return f"{instruction}Option: {', '.join(labels)} \n{sentence}\nAnswer:"


def find_task_folder(root: Path, name: str) -> Path:
    """``<root>/<type>/<name>`` for any type folder (case-insensitive), or a DataFileError."""
    bench = find_child(root, "CL_Benchmark") or root
    kinds = sorted(p for p in bench.iterdir() if p.is_dir()) if bench.is_dir() else []
    for kind in kinds:
        hit = find_child(kind, name)
        if hit is not None:
            return hit
    raise missing(f"{bench}/<type>/{name}", "task folder", LAYOUT)


def load_olora_task(folder: Path, name: str, instruction: str, cache_dir=None) -> tuple[dict[str, TextPairs], list[str]]:
    """Train/test prompt-answer pairs of one O-LoRA task folder, and its labels."""
    labels = [str(x) for x in read_json_list(folder / "labels.json", "a JSON list of label strings")]
    out = {}
    for split in ("train", "test"):
        path = folder / f"{split}.json"
        cols = read_json_records(path, ("sentence", "label"), RECORD, cache_dir)
        if not cols["sentence"]:
            raise malformed(path, "no records", RECORD)
        unknown = sorted({str(l) for l in cols["label"]} - set(labels))
        if unknown:
            raise malformed(path, f"label {unknown[0]!r} is not in {folder / 'labels.json'}",
                            "labels listed in labels.json")
        prompts = [format_input(instruction, labels, str(s)) for s in cols["sentence"]]
        out[split] = TextPairs(prompts, [str(l) for l in cols["label"]])
    return out, labels


def build_olora(cfg, order: int) -> Stream:
    s = cfg.stream
    name = f"olora-order{order}"
    root = require_data_dir(cfg, name, f"the O-LoRA CL_Benchmark folder or its parent: {LAYOUT}")
    names = select_tasks(OLORA_ORDERS[order], s.get("tasks"), name)
    custom = dict(s.get("instructions") or {})
    cache = hf_cache_dir(cfg)
    seed = int(s.get("subset_seed", 0) or 0)
    tasks = []
    for task in names:
        folder = find_task_folder(root, task)
        instruction = str(custom.get(task, OLORA_INSTRUCTIONS[task]))
        splits, labels = load_olora_task(folder, task, instruction, cache)
        tasks.append(Task(name=task, train=capped(splits["train"], s.get("max_train"), subset_seed(seed, task, "train")),
                          test=capped(splits["test"], s.get("max_test"), subset_seed(seed, task, "test")),
                          scorer="exact_match", max_new_tokens=int(s.get("max_new_tokens", 16) or 16),
                          extra={"folder": str(folder), "labels": labels, "instruction": instruction}))
    settings = text_settings(s)
    settings.update(data_dir=str(root), order=order, max_train=s.get("max_train"), max_test=s.get("max_test"),
                    subset_seed=seed)
    return Stream(name=name, modality="text", tasks=tasks, settings=settings)


def check_olora(cfg, order: int) -> list:
    """check-data for an O-LoRA order: every task folder, labels.json, train/test files."""
    from .trace import report_task

    root = Path(str(cfg.data_dir)).expanduser()
    cache = hf_cache_dir(cfg)
    custom = dict(cfg.stream.get("instructions") or {})

    def loader(task):
        def load():
            folder = find_task_folder(root, task)
            return folder, load_olora_task(folder, task, str(custom.get(task, OLORA_INSTRUCTIONS[task])), cache)[0]
        return load

    return [report_task(t, loader(t)) for t in select_tasks(OLORA_ORDERS[order], cfg.stream.get("tasks"),
                                                            f"olora-order{order}")]


@register_stream("olora")
def build(cfg) -> Stream:
    """O-LoRA benchmark, order stream.order (1-3: Standard CL, 4 tasks; 4-6: long sequence, 15 tasks) from data_dir"""
    return build_olora(cfg, stream_order(cfg))


@register_data_check("olora")
def check(cfg, verify_images: bool = False) -> list:
    return check_olora(cfg, stream_order(cfg))


def stream_order(cfg) -> int:
    order = cfg.stream.get("order")
    if order not in OLORA_ORDERS:
        raise StreamError(f"stream.order must be one of {', '.join(map(str, OLORA_ORDERS))} (got {order!r})")
    return int(order)


def _register_alias(order: int) -> None:
    """``stream=olora-orderN``: the old names, aliases of ``stream=olora stream.order=N``."""
    def alias(cfg) -> Stream:
        return build(cfg)

    alias.__doc__ = (f"alias of stream=olora stream.order={order} ({len(OLORA_ORDERS[order])} tasks: "
                     f"{', '.join(OLORA_ORDERS[order][:4])}{', ...' if len(OLORA_ORDERS[order]) > 4 else ''})")
    register_stream(f"olora-order{order}")(alias)
    register_data_check(f"olora-order{order}")(check)


for _order in OLORA_ORDERS:
    _register_alias(_order)
