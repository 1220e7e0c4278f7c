"""The contract every continual method meets, and the shared CLIP machinery.

``ContinualModule`` (a LightningModule) is what the runner drives:

    module = Method(run_cfg, stream, backbone)
    for t in tasks:
        module.begin_task(t)        # grow / freeze: BEFORE the task's Trainer wraps the module
        Trainer(...).fit(module)    # training_step returns a loss; configure_optimizers is fresh
        module.end_task(t)
        Trainer(...).test(module)   # test_step returns per-sample scores (0..100) of task t

A method file subclasses ``ContinualModule`` and implements ``setup_adapters`` /
``begin_task`` / ``end_task`` (and ``extra_loss`` for regularisers) as needed. How a batch
becomes a loss and how predictions become scores depends on the stream's modality and lives
in a *protocol* object (``self.protocol``): ``ClipProtocol`` (moram_bench/protocols/clip.py)
for image-text streams, ``TextProtocol`` for LLM streams. Prediction is task-agnostic: no
task id at test time.

Optimiser and schedule come from ``cfg.method.optim`` and are rebuilt for every task
(``configure_optimizers`` is called by each new Trainer), with ``max_steps`` from the stream.
"""
from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import nn

from .adapters.inject import adapted_modules, inject_adapters
from .config import ConfigError, check_ranges
from .streams.base import Stream


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the task and the step."""


class ContinualModule(pl.LightningModule):
    """Base class of every method. Subclasses set ``method_name`` via @register_method."""

    method_name: str = "?"
    modalities: tuple[str, ...] = ("image",)  # stream modalities the method supports
    trains: bool = True  # False for methods with nothing to train (zero-shot)
    default_config: dict = {}

    def __init__(self, cfg: DictConfig, stream: Stream, backbone: nn.Module):
        super().__init__()
        if stream.modality not in self.modalities:
            raise ConfigError(
                f"method {self.method_name!r} cannot run on {stream.modality} streams like {stream.name!r}"
                f" (it supports: {', '.join(self.modalities)})")
        self.run_cfg = cfg
        self.hp = cfg.method  # this method's own settings
        self.stream = stream
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.current_task = -1
        self.stream_data = None  # attached by the runner (data-dependent set-up, e.g. InfLoRA)
        self.task_steps = 0  # set by the runner: max_steps of the current task's Trainer
        self.validate_config(self.hp)
        from .protocols import make_protocol

        self.protocol = make_protocol(self)
        self.setup_adapters()
        self.train()

    def train(self, mode: bool = True):
        """The frozen backbone always runs in eval mode (no dropout, frozen normalisation
        statistics); only the method's own parts (adapters, prompts...) follow ``mode``."""
        super().train(mode)
        self.backbone.eval()
        for wrapped in adapted_modules(self.backbone).values():
            wrapped.adapter.train(mode)
        return self

    # ---- hooks for methods -----------------------------------------------------------
    #: numeric settings and their allowed ranges, checked by ``validate_config``:
    #: ``{"r": ">= 1", "tau": "> 0", "dropout": "in [0, 1)"}`` (see ``config.check_ranges``)
    ranges: dict[str, str] = {}

    @classmethod
    def validate_config(cls, hp: DictConfig) -> None:
        """Raise ConfigError for impossible hyper-parameters (the runner calls this
        before building anything, so a typo costs no waiting). The default checks
        ``ranges``; override (calling ``super()``) for checks that involve several keys."""
        check_ranges(hp, cls.ranges)

    def setup_adapters(self) -> None:
        """Inject adapters into ``self.backbone`` (called once, in __init__)."""

    def begin_task(self, task: int, restoring: bool = False) -> None:
        """Grow/freeze parameters for ``task``. ``restoring``: rebuilding the architecture
        to load a checkpoint (skip data-dependent work; the weights are loaded afterwards)."""
        self.current_task = task

    def end_task(self, task: int, restoring: bool = False) -> None:
        """Called after the task's training (freeze, consolidate, update bases...)."""

    def extra_loss(self, batch: dict, outputs: dict) -> torch.Tensor | None:
        """Method-specific loss terms added to the protocol's task loss (None: nothing)."""
        return None

    def extra_metrics(self) -> dict[str, Any]:
        """Method facts recorded in metrics.json (switches that change fairness, sizes)."""
        return {}

    # ---- shared helpers -----------------------------------------------------------------
    def task_batches(self, task: int, batch_size: int = 64):
        """This rank's shard of ``task``'s training set, unshuffled, moved to the device:
        for data-dependent set-up in begin_task/end_task (e.g. input covariances). Sums
        computed over it must be all-reduced across ranks (``all_reduce_sum``)."""
        import torch.distributed as dist
        from torch.utils.data import DataLoader

        from .data import UnrepeatedSampler

        dm = self.stream_data
        if dm is None:
            raise RuntimeError("the runner attaches the DataModule before begin_task; none is attached")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        ds = dm.dataset("train", task)
        loader = DataLoader(ds, batch_size=batch_size, sampler=UnrepeatedSampler(len(ds), rank, world),
                            collate_fn=dm.collate_fn)
        for batch in loader:
            yield {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @staticmethod
    def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over DDP ranks in place (no-op in a single process)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def count_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def grown_state(self) -> dict[str, torch.Tensor]:
        """Everything the method added (atoms, experts, prompts, bases): the state of the
        adapters injected into the backbone plus any parameter/buffer the method holds
        outside the backbone. The frozen backbone itself is never checkpointed."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if not k.startswith("backbone.") or ".adapter." in k}

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.grown_state()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the grown model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.load_state_dict(state, strict=False)

    def inject(self, factory, patterns=None, exclude=()):
        """Inject one adapter per matching Linear of the backbone (the one injection path)."""
        pats = list(patterns) if patterns else list(self.backbone.info.get("adapter_targets", []))
        if not pats:
            raise ConfigError(f"backbone {self.backbone.name!r} declares no adapter targets; set method.targets")
        return inject_adapters(self.backbone.model, pats, factory, exclude=exclude)

    # ---- optimisation (fresh per task) --------------------------------------------------
    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError(f"{self.method_name}: no trainable parameters in task {self.current_task}")
        o = self.hp.optim
        name = str(o.get("name", "adamw")).lower()
        kw = dict(lr=float(o.lr), weight_decay=float(o.get("weight_decay", 0.0)))
        if name in ("adamw", "adam"):
            kw["betas"] = tuple(o.get("betas", (0.9, 0.999)))
            kw["eps"] = float(o.get("eps", 1e-8))
            opt = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(params, **kw)
        elif name == "sgd":
            opt = torch.optim.SGD(params, momentum=float(o.get("momentum", 0.0)), **kw)
        else:
            raise ConfigError(f"unknown optimizer {name!r}; valid choices: adamw, adam, sgd")
        total = max(1, int(self.trainer.max_steps) if self.trainer.max_steps > 0 else 1)
        warm = int(o.get("warmup_steps", 0) or 0)
        schedule = str(o.get("schedule", "cosine")).lower()

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            task = self.stream.tasks[self.current_task].name
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) in task {self.current_task + 1} ({task}) at step "
                f"{self.trainer.global_step + 1}; finished tasks are kept in the run directory")

    def log_train(self, name: str, value: torch.Tensor, **kw) -> None:
        """Log with the task in the key so curves of successive tasks never overwrite."""
        kw.setdefault("sync_dist", True)  # the logged value is the global-batch value under DDP
        self.log(f"train/task{self.current_task + 1}/{name}", value, **kw)

    # ---- training and evaluation: delegated to the modality's protocol --------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, outputs = self.protocol.loss(batch, self.current_task)
        extra = self.extra_loss(batch, outputs)
        if extra is not None:
            self.log_train("extra_loss", extra.detach(), batch_size=self.protocol.batch_size(batch))
            loss = loss + extra
        self.log_train("loss", loss.detach(), prog_bar=True, batch_size=self.protocol.batch_size(batch))
        return loss

    def on_test_epoch_start(self) -> None:
        self.protocol.on_eval_start()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Per-sample scores (0..100) of test task ``dataloader_idx``; the task id only
        selects the scorer and label columns, never the model's behaviour."""
        return self.protocol.scores(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self.protocol.on_eval_end()
