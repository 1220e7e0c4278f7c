"""``python -m moram_bench rehearse stream=xtail|mtil|trace [--steps N] [--test-items N] [key=value ...]``

A full-size dress rehearsal of a real stream without its data. It

1. writes a synthetic data folder in the stream's real layout (the CoOp split files,
   FGVC-Aircraft's variant files, MNIST's IDX files, CIFAR-100's pickles; TRACE's task
   folders of ``{"prompt", "answer"}`` JSON lists) with each dataset's real number of
   classes and real split sizes (``SPLIT_SIZES``, ``TRACE_SIZES``), tiny random images and
   random-word texts of realistic lengths (``TRACE_LENGTHS``). Class names are the real ones
   where the suite ships them (MNIST's digits, EuroSAT's) and ``<domain> class <i>``
   otherwise (the real lists come with the datasets). Only the files the run reads are
   materialised (the few-shot training draw and the capped test items, hard links to a few
   random images); the split files list every sample, so the loaders, the few-shot draw and
   the test subsets run on their real sizes;
2. runs the stream's real configuration through the normal runner (``runner.run``) on the
   real architectures: CLIP ViT-B/16 with random weights (``backbone.pretrained=null
   backbone.allow_random=true``) for X-TAIL and MTIL; for TRACE the default text backbone
   when it can be built offline, else (or with ``--random-llm``) a Llama-shaped random model
   whose size is set with ``backbone.hidden_size=... backbone.num_layers=...`` (giving
   any of these keys selects it)
   (``LLAMA_SHAPE``: SmolLM2-135M's shape by default; its tokenizer is byte-level, so
   texts are about 4x more tokens than with a BPE tokenizer, a pessimistic projection);
   with ``--steps`` training steps per task and one evaluation pass after each task over
   ``--test-items`` test items per domain. The label space stays whole: all 1,100 X-TAIL
   classes are encoded and scored in every pass;
3. reports per task: the training step time (the first step apart: it includes warm-up),
   the evaluation pass time, the peak memory (process RSS high-water mark, and the CUDA peak
   on a GPU), the label-space size and the trainable / added parameters, then the projected
   wall time of the full run: the full run's steps per task (``runner.steps_per_task`` on
   the real config) times the measured step time, plus ``T + 1`` evaluation passes over
   the full test splits at the measured per-item cost (each pass's fixed cost, e.g.
   encoding the label space, counted once per pass).

``--tasks N`` stops after N tasks (the projection uses the mean of the measured tasks for
the others); Ctrl-C stops the rehearsal the same way and reports the tasks measured. The report is printed and written to ``OUT/rehearsal.json`` (``--out``,
default ``results/rehearsal/<stream>``). Any ``fit`` override passes through
(``method=seq-lora``, ``trainer.precision=bf16-mixed``, ``stream.batch_size=8``...).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

USAGE_ERROR = 2
STREAMS = ("xtail", "mtil", "trace")

#: (train, val, test) sizes of the CoOp splits / FGVC-Aircraft's variant files / the
#: torchvision releases (MNIST and CIFAR-100 have no val split).
SPLIT_SIZES = {
    "aircraft": (3334, 3333, 3333),
    "caltech101": (4128, 1649, 2465),
    "cifar100": (50000, 0, 10000),
    "dtd": (2820, 1128, 1692),
    "eurosat": (13500, 5400, 8100),
    "oxford_flowers": (4093, 1633, 2463),
    "food101": (50500, 20200, 30300),
    "mnist": (60000, 0, 10000),
    "oxford_pets": (2944, 736, 3669),
    "stanford_cars": (6509, 1635, 8041),
    "sun397": (15880, 3970, 19850),
}
#: TRACE (LLM-CL-Benchmark_5000): 5,000 training and 2,000 test records per task.
TRACE_SIZES = (5000, 200, 2000)
#: (prompt words, answer words) per TRACE task, roughly the real ones: long meeting
#: transcripts, news articles and code files, short classification answers.
TRACE_LENGTHS = {"C-STANCE": (90, 1), "FOMC": (60, 1), "MeetingBank": (1500, 120), "Py150": (500, 12),
                 "ScienceQA": (120, 1), "NumGLUE-cm": (60, 2), "NumGLUE-ds": (60, 2), "20Minuten": (450, 70)}
#: Llama-shaped random model used for TRACE when the default backbone is not available
#: (SmolLM2-135M's shape); override any key with backbone.<key>=...
LLAMA_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
               "max_positions": 2048}
WORDS = ("the of and to in is for on that with as by at from this are be or an was which it not have has "
         "data model rate policy market bank meeting city council code function value return number total "
         "science energy water plant animal cell year people school river road house table light sound").split()


# ---- the synthetic data folder ---------------------------------------------------------------
def class_names(domain: str) -> list[str]:
    from .streams import classnames as C

    n = C.NUM_CLASSES[domain]
    if domain == "mnist":
        return list(C.MNIST_CLASSNAMES)
    if domain == "eurosat":
        return list(C.EUROSAT_RENAME.values())[:n]
    return [f"{domain} class {i}" for i in range(n)]


def _labels(n: int, k: int) -> list[int]:
    """``n`` labels over ``k`` classes, as balanced as possible, in class order."""
    return [int(i * k // n) for i in range(n)]


# per CoOp domain: (folder under data_dir, image folder, split file, relative path of item j of class c)
COOP_LAYOUT = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "c{c}/image_{j:05d}.jpg"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", "c{c}_{j}.jpg"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", "cars_{part}/{j:05d}.jpg"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "image_{j:05d}.jpg"),
    "food101": ("food-101", "images", "split_zhou_Food101.json", "c{c}/{j}.jpg"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", "c/c{c}/sun_{j:06d}.jpg"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", "c{c}/c{c}_{j:04d}.jpg"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json", "c{c}/c{c}_{j}.jpg"),
}


def write_image_domain(data_dir: Path, domain: str, rng: np.random.Generator) -> None:
    """The split/label files of ``domain`` with its real classes and split sizes (no images)."""
    names = class_names(domain)
    k = len(names)
    n_train, n_val, n_test = SPLIT_SIZES[domain]
    if domain in COOP_LAYOUT:
        folder, images, split_file, pattern = COOP_LAYOUT[domain]
        root = data_dir / folder
        image_dir = root / images if images else root
        split, j = {}, 0
        for part, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            items = []
            for c in _labels(n, k):
                j += 1
                rel = pattern.format(c=c, j=j, part="test" if part == "test" else "train")
                items.append([rel, c, names[c]])
            split[part] = items
        root.mkdir(parents=True, exist_ok=True)
        for d in {os.path.dirname(it[0]) for items in split.values() for it in items}:
            (image_dir / d).mkdir(parents=True, exist_ok=True)
        (root / split_file).write_text(json.dumps(split))
    elif domain == "aircraft":
        root = data_dir / "fgvc_aircraft"
        (root / "images").mkdir(parents=True, exist_ok=True)
        variants = [f"variant-{i}" for i in range(k)]
        (root / "variants.txt").write_text("\n".join(variants) + "\n")
        j = 1000000
        for part, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            lines = []
            for c in _labels(n, k):
                j += 1
                lines.append(f"{j} {variants[c]}")
            (root / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    elif domain == "mnist":
        import struct

        raw = data_dir / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for prefix, n in (("train", n_train), ("t10k", n_test)):
            labels = np.asarray(_labels(n, 10), dtype=np.uint8)
            images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
                head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
                (raw / stem).write_bytes(head + arr.tobytes())
    elif domain == "cifar100":
        import pickle

        root = data_dir / "cifar-100-python"
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "meta", "wb") as f:
            pickle.dump({b"fine_label_names": [f"cifar class {i}".encode() for i in range(k)],
                         b"coarse_label_names": [f"super {i}".encode() for i in range(20)]}, f)
        for part, n in (("train", n_train), ("test", n_test)):
            labels = _labels(n, k)
            with open(root / part, "wb") as f:
                pickle.dump({b"filenames": [b"x.png"] * n, b"fine_labels": labels, b"coarse_labels": labels,
                             b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}, f)
    else:  # pragma: no cover - every real domain is listed above
        raise KeyError(domain)


def materialise_images(stream, rng: np.random.Generator, size: int = 32, distinct: int = 8) -> int:
    """Create the image files the stream's tasks read (train draw and test subset): hard
    links to ``distinct`` random JPEGs (copies where links are impossible). Returns the count."""
    from PIL import Image

    from .streams.base import FileImageSet, ImageSubset

    def files(ds):
        if isinstance(ds, ImageSubset):
            base = ds.base
            return [base.paths[int(i)] for i in ds.indices] if isinstance(base, FileImageSet) else []
        return list(ds.paths) if isinstance(ds, FileImageSet) else []

    paths = sorted({p for t in stream.tasks for ds in (t.train, t.test) for p in files(ds)})
    if not paths:
        return 0
    sources = []
    base = Path(os.path.commonpath(paths))
    base = base if base.is_dir() else base.parent
    for i in range(distinct):
        p = base / f".rehearsal-source-{i}.jpg"
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(p, quality=90)
        sources.append(p)
    for n, p in enumerate(paths):
        if os.path.exists(p):
            continue
        src = sources[n % distinct]
        try:
            os.link(src, p)
        except OSError:
            shutil.copyfile(src, p)
    return len(paths)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))


def write_trace(data_dir: Path, tasks, seed: int = 0) -> None:
    """TRACE's 8 task folders with the real split sizes and random texts of realistic length."""
    from .streams.trace import TRACE_SCORERS

    rng = random.Random(seed)
    n_train, n_eval, n_test = TRACE_SIZES
    for name in tasks:
        p_words, a_words = TRACE_LENGTHS[name]
        folder = data_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("eval", n_eval), ("test", n_test)):
            recs = []
            for i in range(n):
                prompt = _text(rng, int(p_words * rng.uniform(0.6, 1.4))) + "\nAnswer:"
                if TRACE_SCORERS[name] in ("option_letter", "first_char"):
                    answer = rng.choice("ABCD")
                elif TRACE_SCORERS[name] == "numeric":
                    answer = str(rng.randint(0, 999))
                else:
                    answer = _text(rng, int(a_words * rng.uniform(0.6, 1.4)))
                recs.append({"prompt": prompt, "answer": answer})
            (folder / f"{split}.json").write_text(json.dumps(recs))


# ---- measuring -----------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """The process's resident-memory high-water mark (Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


class StopRehearsal(Exception):
    """Raised by the probe to end the run after ``--tasks`` tasks."""


def make_probe(max_tasks: Optional[int] = None):
    """A Lightning callback recording per-task step times, per-pass evaluation times (per
    test domain) and peak memory; one instance is shared by every Trainer of the run."""
    import lightning.pytorch as pl
    import torch

    class Probe(pl.Callback):
        def __init__(self):
            self.tasks: list[dict] = []  # one per training task
            self.passes: list[dict] = []  # one per evaluation pass (row 0, then after each task)
            self._t = 0.0

        def _cuda_peak(self):
            return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None

        def on_train_start(self, trainer, module):
            if max_tasks is not None and len(self.tasks) >= max_tasks:
                raise StopRehearsal()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.tasks.append({"task": int(module.current_task), "step_seconds": [],
                               "trainable": int(module.count_trainable())})

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.tasks[-1]["step_seconds"].append(time.perf_counter() - self._t)

        def on_train_end(self, trainer, module):
            self.tasks[-1]["train_cuda_peak_mib"] = self._cuda_peak()

        def on_test_start(self, trainer, module):
            self.passes.append({"start": time.perf_counter(), "domains": {}})

        def on_test_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            d = self.passes[-1]["domains"].setdefault(int(dataloader_idx), {"seconds": 0.0, "items": 0})
            d["seconds"] += time.perf_counter() - self._t
            d["items"] += int(module.protocol.batch_size(batch))

        def on_test_end(self, trainer, module):
            p = self.passes[-1]
            p["seconds"] = time.perf_counter() - p.pop("start")
            p["peak_rss_mib"] = peak_rss_mib()
            p["cuda_peak_mib"] = self._cuda_peak()
            p["params_added"] = int(sum(v.numel() for v in module.grown_state().values()))

    return Probe()


def _install_probe(probe):
    """Add ``probe`` to every Trainer the runner makes during the rehearsal; returns an undo."""
    from . import runner

    original = runner.make_trainer

    def make_trainer(cfg, out, callbacks, *args, **kwargs):
        return original(cfg, out, [*callbacks, probe], *args, **kwargs)

    runner.make_trainer = make_trainer
    return lambda: setattr(runner, "make_trainer", original)


# ---- the rehearsal --------------------------------------------------------------------------------
def _fmt(s: float) -> str:
    s = float(s)
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def text_backbone_available(cfg) -> Optional[str]:
    """None when the stream's default text backbone builds offline, else why not."""
    from . import registry

    try:
        registry.BACKBONES[cfg.backbone.name](cfg)
        return None
    except Exception as e:  # missing package/weights: any failure means "not available here"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def _data_ready(data_dir: Path, marker: str) -> bool:
    """The synthetic folder was written completely for these domains (reused across runs)."""
    try:
        return (data_dir / ".complete").read_text() == marker
    except OSError:
        return False


def rehearse(stream: str, overrides: list[str], out: Path, steps: int = 2, test_items: int = 8,
             max_tasks: Optional[int] = None, random_llm: bool = False, echo=print) -> dict:
    """Write the data, run, measure; returns the report (also written to OUT/rehearsal.json)."""
    import torch

    from . import registry
    from .config import resolve_config
    from .runner import steps_per_task

    registry.discover()

    def build_stream(c):
        return registry.STREAMS[c.stream.name](c)

    out = Path(out)
    data_dir = out / "data"
    t0 = time.time()
    rng = np.random.default_rng(0)
    base = [f"stream={stream}", f"data_dir={data_dir}"]
    notes = []
    if stream in ("xtail", "mtil"):
        from .streams.xtail import stream_domains

        probe_cfg = resolve_config(base + list(overrides))
        domains = stream_domains(probe_cfg, stream)
        marker = ",".join(domains)
        if not _data_ready(data_dir, marker):
            shutil.rmtree(data_dir, ignore_errors=True)
            for d in domains:
                write_image_domain(data_dir, d, rng)
        arch = ["backbone.pretrained=null", "backbone.allow_random=true"] if probe_cfg.backbone.name == "clip-vit-b16" else []
        notes.append("CLIP weights: random (backbone.pretrained=null); images: tiny random JPEGs (decode cost "
                     "below real photos); class names: placeholders where the datasets carry them")
        run_over = base + arch + list(overrides) + [f"stream.iterations={steps}",
                                                    f"stream.max_test_per_domain={test_items}"]
        full_over = base + arch + list(overrides)
    else:
        from .streams.trace import TRACE_TASKS

        marker = ",".join(TRACE_TASKS)
        if not _data_ready(data_dir, marker):
            shutil.rmtree(data_dir, ignore_errors=True)
            write_trace(data_dir, TRACE_TASKS)
        full_over = base + list(overrides)
        user_backbone = any(o.startswith("backbone=") for o in overrides)
        # backbone.<shape key>=... asks for the Llama-shaped random model
        shaped = any(o.split("=", 1)[0][len("backbone."):] in LLAMA_SHAPE for o in overrides
                     if o.startswith("backbone."))
        random_llm = random_llm or (shaped and not user_backbone)
        why = None if (user_backbone or random_llm) else text_backbone_available(resolve_config(full_over))
        if random_llm or why:
            shape = [f"backbone.{k}={v}" for k, v in LLAMA_SHAPE.items()
                     if not any(o.startswith(f"backbone.{k}=") for o in overrides)]
            full_over = base + ["backbone=tiny-llama"] + shape + [o for o in overrides if not o.startswith("backbone=")]
            notes.append("text backbone: a Llama-shaped random model (byte-level tokenizer: about 4x the tokens of a "
                         "BPE tokenizer, so the projection is pessimistic)"
                         + (f"; the default backbone is not available here ({why})" if why else ""))
        notes.append("texts: random words of realistic lengths; 5,000 train / 2,000 test records per task")
        run_over = full_over + ["stream.task_epochs=null", "stream.epochs=null", f"stream.iterations={steps}",
                                f"stream.max_test={test_items}"]
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / ".complete").write_text(marker)
    run_over += [f"output_dir={out / 'run'}", "overwrite=true", "trainer.enable_progress_bar=false"]
    cfg = resolve_config(run_over)
    full_cfg = resolve_config(full_over)
    full_stream = build_stream(full_cfg)  # the real loader on the real split sizes
    full_steps = steps_per_task(full_cfg, full_stream)
    full_test = [len(t.test) for t in full_stream.tasks]
    if stream in ("xtail", "mtil"):
        n_files = materialise_images(build_stream(cfg), rng)
        notes.append(f"{n_files} image files materialised (the few-shot draw and the capped test items)")
    data_seconds = time.time() - t0
    echo(f"rehearse {stream}: data written to {data_dir} ({_fmt(data_seconds)}); running {len(full_stream)} tasks "
         f"x {steps} steps, {test_items} test items per domain, method {cfg.method.name}, backbone {cfg.backbone.name}")

    from .errors import RunInterrupted
    from .runner import run

    probe = make_probe(max_tasks)
    undo = _install_probe(probe)
    stopped = False
    t_run = time.time()
    try:
        run(cfg)
    except StopRehearsal:
        stopped = True
    except (KeyboardInterrupt, RunInterrupted):  # Ctrl-C: report what was measured so far
        stopped = True
        echo("rehearsal interrupted: reporting the tasks measured so far")
    finally:
        undo()
    run_seconds = time.time() - t_run
    return _report(stream, cfg, full_stream, full_steps, full_test, probe, notes, out, run_seconds, data_seconds,
                   stopped, echo)


def _report(stream, cfg, full_stream, full_steps, full_test, probe, notes, out, run_seconds, data_seconds,
            stopped, echo) -> dict:
    import torch

    T = len(full_stream)
    union = full_stream.label_space == "union"
    label_space = [sum(t.num_classes for t in full_stream.tasks) if union else t.num_classes
                   for t in full_stream.tasks] if full_stream.modality == "image" else [None] * T
    passes = probe.passes
    rows = []
    for i, task in enumerate(probe.tasks):
        st = task["step_seconds"]
        rest = st[1:] or st
        p = passes[i + 1] if i + 1 < len(passes) else {}
        rows.append({
            "task": full_stream.task_names[task["task"]], "steps_measured": len(st),
            "first_step_s": st[0] if st else None, "step_s": float(np.mean(rest)) if rest else None,
            "eval_pass_s": p.get("seconds"), "peak_rss_mib": p.get("peak_rss_mib"),
            "cuda_peak_mib": max(x for x in (task.get("train_cuda_peak_mib"), p.get("cuda_peak_mib")) if x is not None)
            if torch.cuda.is_available() else None,
            "trainable_params": task["trainable"], "params_added": p.get("params_added"),
            "label_space": label_space[task["task"]], "full_steps": full_steps[task["task"]]})
    # projection: measured step time per task (mean of measured tasks for the others)
    step_times = [r["step_s"] for r in rows if r["step_s"] is not None]
    mean_step = float(np.mean(step_times)) if step_times else 0.0
    train_proj = sum(full_steps[t] * (rows[t]["step_s"] if t < len(rows) and rows[t]["step_s"] else mean_step)
                     for t in range(T))
    # evaluation: per-item cost per domain and a fixed per-pass cost, from the measured passes
    per_item = np.zeros(T)
    counts = np.zeros(T)
    fixed = []
    for p in passes:  # an interrupted pass still gives the per-item cost of the domains it scored
        batch_total = 0.0
        for d, v in p["domains"].items():
            per_item[d] += v["seconds"]
            counts[d] += v["items"]
            batch_total += v["seconds"]
        if "seconds" in p:
            fixed.append(max(0.0, p["seconds"] - batch_total))
    per_item = np.where(counts > 0, per_item / np.maximum(counts, 1), np.nan)
    per_item = np.where(np.isnan(per_item), np.nanmean(per_item) if np.isfinite(per_item).any() else 0.0, per_item)
    pass_proj = float(np.mean(fixed) if fixed else 0.0) + float(np.dot(per_item, full_test))
    eval_proj = (T + 1) * pass_proj
    report = {
        "stream": stream, "method": str(cfg.method.name), "backbone": str(cfg.backbone.name),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(), "batch_size": int(cfg.stream.batch_size),
        "precision": str(cfg.trainer.precision), "tasks": rows, "tasks_measured": len(rows), "num_tasks": T,
        "stopped_early": stopped, "full_test_items": full_test, "full_steps": full_steps,
        "eval_per_item_s": per_item.tolist(), "eval_fixed_per_pass_s": float(np.mean(fixed) if fixed else 0),
        "projected_train_s": train_proj, "projected_eval_s": eval_proj, "projected_total_s": train_proj + eval_proj,
        "rehearsal_run_s": run_seconds, "data_write_s": data_seconds, "notes": notes,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "rehearsal.json").write_text(json.dumps(report, indent=2))
    for line in format_report(report):
        echo(line)
    echo(f"report: {out / 'rehearsal.json'}")
    return report


def format_report(r: dict) -> list[str]:
    def num(x, f="{:.2f}"):
        return "-" if x is None else f.format(x)

    lines = [f"\nrehearsal of {r['stream']}: {r['method']} on {r['backbone']} ({r['device']}, {r['torch_threads']} "
             f"threads, batch {r['batch_size']}, precision {r['precision']})",
             f"{'task':<16}{'step s':>9}{'1st step':>10}{'eval s':>9}{'RSS MiB':>10}{'CUDA MiB':>10}"
             f"{'labels':>8}{'trainable':>12}{'added':>12}{'full steps':>11}"]
    for t in r["tasks"]:
        lines.append(f"{t['task']:<16}{num(t['step_s']):>9}{num(t['first_step_s']):>10}{num(t['eval_pass_s']):>9}"
                     f"{num(t['peak_rss_mib'], '{:.0f}'):>10}{num(t['cuda_peak_mib'], '{:.0f}'):>10}"
                     f"{num(t['label_space'], '{:d}'):>8}{t['trainable_params']:>12,}{num(t['params_added'], '{:,}'):>12}"
                     f"{t['full_steps']:>11}")
    lines.append(f"evaluation: {num(r['eval_fixed_per_pass_s'])}s fixed per pass + per item "
                 + ", ".join(f"{x * 1000:.1f}ms" for x in r["eval_per_item_s"])
                 + f" over {sum(r['full_test_items']):,} test items per full pass")
    lines.append(f"projected full run ({r['num_tasks']} tasks, {sum(r['full_steps']):,} steps, {r['num_tasks'] + 1} "
                 f"evaluation passes): training {_fmt(r['projected_train_s'])} + evaluation "
                 f"{_fmt(r['projected_eval_s'])} = {_fmt(r['projected_total_s'])}"
                 + (f" (from {r['tasks_measured']} measured tasks)" if r["stopped_early"] else ""))
    lines += [f"note: {n}" for n in r["notes"]]
    return lines


def estimate_report(device: str = "cpu") -> list[str]:
    """For ``doctor``: a short X-TAIL rehearsal (2 steps of the first task, 4 test items per
    domain, whole label space) and its projection, as report lines."""
    import tempfile

    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="moram-doctor-rehearse-") as tmp:
        r = rehearse("xtail", ["trainer.accelerator=" + ("gpu" if device.startswith("cuda") else "cpu")],
                     Path(tmp), steps=2, test_items=4, max_tasks=1, echo=lambda s: None)
    lines += format_report(r)[1:]
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m moram_bench rehearse",
                                     description="run a real stream at full size on synthetic data for a few steps "
                                                 "and project the full run's wall time")
    parser.add_argument("overrides", nargs="*", help="stream=xtail|mtil|trace plus any fit override")
    parser.add_argument("--steps", type=int, default=2, help="training steps per task (default 2)")
    parser.add_argument("--test-items", type=int, default=8, help="test items per domain in each evaluation (default 8)")
    parser.add_argument("--tasks", type=int, default=None, help="stop after this many tasks (default: all)")
    parser.add_argument("--out", default=None, help="folder for the data, the run and rehearsal.json "
                                                    "(default results/rehearsal/<stream>)")
    parser.add_argument("--random-llm", action="store_true", help="TRACE: use the Llama-shaped random model even "
                                                                  "when the default backbone is available")
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    stream = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("stream=")), None)
    if stream not in STREAMS:
        print(f"error: rehearse needs stream=xtail, stream=mtil or stream=trace (got {stream})", file=sys.stderr)
        return USAGE_ERROR
    for name, v in (("--steps", args.steps), ("--test-items", args.test_items), ("--tasks", args.tasks or 1)):
        if v < 1:
            print(f"error: {name} must be >= 1", file=sys.stderr)
            return USAGE_ERROR
    if any(o.startswith(("data_dir=", "output_dir=")) for o in args.overrides):
        print("error: rehearse writes its own data_dir and output_dir; use --out DIR", file=sys.stderr)
        return USAGE_ERROR
    overrides = [o for o in args.overrides if not o.startswith("stream=")]
    out = Path(args.out or Path("results") / "rehearsal" / stream)
    from .config import ConfigError
    from .streams.base import StreamError

    try:
        rehearse(stream, overrides, out, steps=args.steps, test_items=args.test_items, max_tasks=args.tasks,
                 random_llm=args.random_llm, echo=lambda s: print(s, flush=True))
    except (ConfigError, StreamError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
