"""The task-stream DataModule shared by every method and track.

- ``set_task(t)`` selects the task whose training data ``train_dataloader`` serves;
  ``test_dataloader`` returns one loader per task of the stream (dataloader index = task).
- Training is step-based: for task t the global batches are drawn from a generator seeded
  only by (seed, t), and each rank takes its slice of every global batch. The data a step
  sees therefore does not depend on the number of processes or on anything run before.
- Evaluation uses ``UnrepeatedSampler``: each test sample is seen by exactly one rank
  (no padding duplicates, unlike DistributedSampler); scores are summed across ranks.
- Image items are ``{"x", "label", "task"}`` with the stream's label (offset into the union
  label space). When the backbone's image trunk is frozen and un-adapted, ``cache_features``
  replaces pixels by trunk features computed once (and cached on disk): ``is_feature``.
- Training images go through ``train_transform`` (open_clip's training augmentation) when
  the stream asks for it (``settings["train_transform"] == "train"``: the real X-TAIL and
  MTIL streams, as in the official code) and the backbone has one; otherwise, and whenever
  features are cached, through the evaluation ``transform``. The transform actually used
  is written back to the stream's settings (``train_transform``: ``train`` or ``eval``),
  which metrics.json records.
- The augmentation's randomness belongs to the draw, not to the process: the sampler hands
  each training item a key made of the batch seed, the step and the item's position in the
  global batch, and the transform runs on torch's generator seeded with that key. A sample
  drawn at a given step therefore gets the same crop with 1 or N processes and with any
  number of DataLoader workers (transforms drawing from Python's ``random`` are not covered).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .streams.base import Stream


class StepBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches; global batches come from epochs of seeded permutations,
    each rank takes ``global_batch[rank::world]``."""

    def __init__(self, n: int, global_batch: int, steps: int, seed: int, rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if global_batch < world:
            raise ValueError(f"batch size {global_batch} is smaller than the number of processes {world}")
        self.n, self.global_batch, self.steps = n, global_batch, steps
        self.seed, self.rank, self.world = seed, rank, world

    def global_batches(self):
        g = torch.Generator().manual_seed(self.seed)
        perm, pos = torch.randperm(self.n, generator=g), 0
        for _ in range(self.steps):
            idx = []
            while len(idx) < min(self.global_batch, max(self.n, self.world)):
                if pos >= self.n:
                    perm, pos = torch.randperm(self.n, generator=g), 0
                take = min(self.global_batch - len(idx), self.n - pos)
                idx.extend(perm[pos:pos + take].tolist())
                pos += take
            yield idx

    def __iter__(self):
        for idx in self.global_batches():
            yield idx[self.rank::self.world]

    def __len__(self) -> int:
        return self.steps


class KeyedStepBatchSampler(StepBatchSampler):
    """:class:`StepBatchSampler` whose items are ``(index, key)``: ``key`` identifies the draw
    (batch seed, step, position in the global batch), the same on every rank that takes it."""

    def __iter__(self):
        for step, idx in enumerate(self.global_batches()):
            keyed = [(i, draw_key(self.seed, step, pos)) for pos, i in enumerate(idx)]
            yield keyed[self.rank::self.world]


def draw_key(seed: int, step: int, position: int) -> int:
    """A 63-bit seed for one training draw (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class UnrepeatedSampler(Sampler[int]):
    """Contiguous, non-overlapping shards; ranks may get one sample more or less."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        per = math.ceil(n / world) if world else n
        self.indices = list(range(rank * per, min(n, (rank + 1) * per)))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _ImageTaskDataset(Dataset):
    def __init__(self, base: Dataset, task: int, offset: int, transform: Callable | None):
        self.base, self.task, self.offset, self.transform = base, task, offset, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        key = None
        if isinstance(i, tuple):  # (index, draw key) from KeyedStepBatchSampler
            i, key = i
        item = self.base[i]
        x = item["image"]
        if self.transform is not None:
            if key is None:
                x = self.transform(x)
            else:  # the draw's own random stream; the process's generator is left as it was
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(key)
                    x = self.transform(x)
        return {"x": x, "label": item["label"] + self.offset, "task": self.task}


class _FeatureDataset(Dataset):
    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, task: int):
        self.feats, self.labels, self.task = feats, labels, task

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"x": self.feats[i], "label": int(self.labels[i]), "task": self.task, "is_feature": True}


def collate(items: list[dict]) -> dict:
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], bool):
            out[k] = vals[0]
        elif isinstance(vals[0], (int, np.integer)):
            out[k] = torch.tensor(vals, dtype=torch.long)
        else:
            out[k] = vals
    return out


class TaskStreamDataModule(pl.LightningDataModule):
    def __init__(self, stream: Stream, batch_size: int, steps_per_task: list[int], seed: int,
                 eval_batch_size: int = 256, num_workers: int = 0, transform: Callable | None = None,
                 collate_fn: Callable = collate, train_transform: Callable | None = None):
        super().__init__()
        self.stream = stream
        self.batch_size = batch_size
        self.steps_per_task = steps_per_task
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.transform = transform
        wanted = stream.settings.get("train_transform", "eval") == "train"
        self.train_transform = train_transform if wanted else None
        self._record_train_transform()
        self.collate_fn = collate_fn
        self.task = 0
        self._features: dict[tuple[str, int], Dataset] | None = None

    def _record_train_transform(self) -> None:
        if self.stream.modality == "image":
            self.stream.settings["train_transform"] = "train" if self.train_transform is not None else "eval"

    # ---- datasets ---------------------------------------------------------------------------
    def set_task(self, task: int) -> None:
        self.task = task

    def dataset(self, split: str, task: int, augment: bool = True) -> Dataset:
        """Task ``task``'s ``train`` or ``test`` split; training images through the training
        transform unless ``augment`` is False."""
        if self._features is not None:
            return self._features[(split, task)]
        t = self.stream.tasks[task]
        base = t.train if split == "train" else t.test
        if self.stream.modality == "image":
            tf = self.train_transform if split == "train" and augment and self.train_transform is not None \
                else self.transform
            return _ImageTaskDataset(base, task, t.label_offset, tf)
        return base

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # ---- loaders -----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        ds = self.dataset("train", self.task)
        augmented = isinstance(ds, _ImageTaskDataset) and ds.transform is self.train_transform is not None
        sampler = (KeyedStepBatchSampler if augmented else StepBatchSampler)(
            len(ds), self.batch_size, self.steps_per_task[self.task],
            seed=self.seed * 1_000_003 + self.task, rank=rank, world=world)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=self.collate_fn)

    def test_dataloader(self) -> list[DataLoader]:
        rank, world = self._rank_world()
        loaders = []
        for t in range(len(self.stream)):
            ds = self.dataset("test", t)
            loaders.append(DataLoader(ds, batch_size=self.eval_batch_size, sampler=UnrepeatedSampler(len(ds), rank, world),
                                      num_workers=self.num_workers, collate_fn=self.collate_fn))
        return loaders

    # ---- frozen-trunk feature cache ---------------------------------------------------------
    def cache_key(self, backbone_id: str) -> str:
        """Hash of the backbone identity and the exact samples of every task."""
        def fp(ds):
            return ds.fingerprint() if hasattr(ds, "fingerprint") else f"{type(ds).__name__}:{len(ds)}"

        desc = {"backbone": backbone_id, "stream": self.stream.name,
                "tasks": [[t.name, t.label_offset, fp(t.train), fp(t.test)] for t in self.stream.tasks]}
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]

    @torch.no_grad()
    def cache_features(self, trunk: Callable[[torch.Tensor], torch.Tensor], backbone_id: str,
                       cache_dir: Path | None, device: torch.device | str = "cpu", log: Callable = print) -> None:
        """Replace every image dataset by the trunk's features (computed once, cached).
        Cached features come from the evaluation transform, so training then uses it too."""
        self.train_transform = None
        self._record_train_transform()
        path = Path(cache_dir) / "features" / f"{self.cache_key(backbone_id)}.pt" if cache_dir else None
        if path is not None and path.exists():
            try:
                stored = torch.load(path, weights_only=True)
                want = {f"{s}:{i}": len(getattr(t, s)) for i, t in enumerate(self.stream.tasks) for s in ("train", "test")}
                if not isinstance(stored, dict) or set(stored) != set(want) or any(
                        len(stored[k][0]) != n or len(stored[k][1]) != n for k, n in want.items()):
                    raise ValueError("it does not hold the features of every task's train and test split")
                self._features = {(s, t): _FeatureDataset(f, l, t) for (s, t), (f, l) in
                                  ((tuple(k.split(":")), v) for k, v in stored.items()) for t in [int(t)]}
                log(f"loaded cached image features from {path}")
                return
            except Exception as e:  # a corrupt cache is rebuilt, never trusted
                log(f"ignoring unreadable feature cache {path}: {e}")
        import time

        start, stored, feats = time.time(), {}, {}
        n_total = sum(len(t.train) + len(t.test) for t in self.stream.tasks)
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_total, desc="caching image features", unit="img", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
        for t in range(len(self.stream)):
            for split in ("train", "test"):
                ds = self.dataset(split, t, augment=False)
                loader = DataLoader(ds, batch_size=128, shuffle=False, num_workers=self.num_workers, collate_fn=collate)
                fs, ls = [], []
                for b in loader:
                    fs.append(trunk(b["x"].to(device)).float().cpu())
                    ls.append(b["label"])
                    if bar:
                        bar.update(len(b["label"]))
                f, l = torch.cat(fs), torch.cat(ls)
                stored[f"{split}:{t}"] = (f, l)
                feats[(split, t)] = _FeatureDataset(f, l, t)
        if bar:
            bar.close()
        self._features = feats
        log(f"cached image features of {n_total} images in {time.time() - start:.1f}s")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{torch.randint(1 << 30, ()).item()}")
            torch.save(stored, tmp)
            tmp.replace(path)
