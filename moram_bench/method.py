"""The contract every continual method meets, and the shared CLIP machinery.

``ContinualModule`` (a LightningModule) is what the runner drives::

    module = Method(run_cfg, stream, backbone)   # __init__ builds the protocol, then setup_adapters()
    for t in tasks:
        module.meta_begin_task(t, data)          # BEFORE the task's Trainer wraps the module
        Trainer(...).fit(module)                 # training_step returns a loss; fresh optimizer per task
        module.meta_end_task(t, data)
        Trainer(...).test(module)                # test_step returns per-sample scores (0..100) of task t

``meta_begin_task`` / ``meta_end_task`` keep the counters (``current_task``) and call the
method's hooks; ``data`` is the stream's DataModule (``None`` when ``restoring``: the
runner replays the hooks of finished tasks to rebuild the grown architecture before
loading a checkpoint, so data-dependent work is skipped then). Nothing else is set on a
method from outside.

The hooks a method may override (every one has a default here; none needs ``super()``):

- ``ranges`` (class attribute) and ``validate_config(hp)`` (classmethod): reject
  impossible settings before anything is built.
- ``modalities`` / ``trains`` (class attributes): the stream kinds it supports; False for
  a method with nothing to train (zero-shot).
- ``build_protocol()``: the object that turns a batch into a loss and predictions into
  scores (default: the stream modality's protocol, ``moram_bench/protocols``).
- ``setup_adapters()``: inject adapters into ``self.backbone`` with ``self.inject(...)``
  (called once, in ``__init__``).
- ``begin_task(task, data, restoring)``: grow / freeze before the task's training; data-
  dependent set-up iterates ``self.task_batches(data, task)``.
- ``end_task(task, data, restoring)``: after the task's training (freeze, consolidate,
  update bases...).
- ``extra_loss(batch, outputs)``: regularisers added to the protocol's task loss; auxiliary
  terms computed inside the model travel in ``outputs`` (``protocol_loss``:
  ``outputs["aux_loss"]`` is the sum of the terms the adapters emitted during the step, see
  ``adapters/aux_loss.py``; L2P's ``outputs["prompt_sim"]``).
- ``text_prefix(prompt_ids, prompt_mask)``: text streams only, embeddings prepended to the
  LM's input (L2P-style prompts) and auxiliary outputs for the step.
- ``extra_metrics()``: facts recorded in metrics.json (``method_settings``): switches that
  change fairness, sizes, and ``display_name``, the name a leaderboard row shows when the
  variant that runs is not what the registered name says (L2P on a CNN image tower:
  ``l2p (text prompts)``).

Shared helpers: ``adapters()`` (name -> injected adapter module; growing adapters share the
vocabulary ``adapter.grow()`` to append this task's unit (atoms, expert, branch, LoRA) and
``adapter.freeze()``), ``task_batches(data, task)``, ``all_reduce_sum``, ``inject``.

How a batch becomes a loss and how predictions become scores depends on the stream's
modality and lives in the *protocol* object (``self.protocol``): ``ClipProtocol``
(moram_bench/protocols/clip.py) for image-text streams, ``TextProtocol`` for LLM streams.
Prediction is task-agnostic: no task id at test time.

Optimiser and schedule come from ``cfg.method.optim`` and are rebuilt for every task
(``configure_optimizers`` is called by each new Trainer), with ``max_steps`` from the stream.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import nn

from .adapters import aux_loss
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
    #: numeric settings and their allowed ranges, checked by ``validate_config``:
    #: ``{"r": ">= 1", "tau": "> 0", "dropout": "in [0, 1)"}`` (see ``config.check_ranges``)
    ranges: dict[str, str] = {}

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
        self.current_task = -1  # kept by meta_begin_task
        self.validate_config(self.hp)
        self.protocol = self.build_protocol()
        self.setup_adapters()
        self.train()

    def train(self, mode: bool = True):
        """The frozen backbone always runs in eval mode (no dropout, frozen normalisation
        statistics); only the method's own parts (adapters, prompts...) follow ``mode``."""
        super().train(mode)
        self.backbone.eval()
        for adapter in self.adapters().values():
            adapter.train(mode)
        return self

    # ---- the lifecycle the runner drives (not for overriding) ------------------------
    def meta_begin_task(self, task: int, data=None, restoring: bool = False) -> None:
        """Set the counters for ``task``, then call the method's ``begin_task``."""
        self.current_task = int(task)
        self.begin_task(int(task), data, restoring)

    def meta_end_task(self, task: int, data=None, restoring: bool = False) -> None:
        """Call the method's ``end_task`` for ``task`` (after its training)."""
        self.end_task(int(task), data, restoring)

    # ---- hooks for methods (see the module docstring) --------------------------------
    @classmethod
    def validate_config(cls, hp: DictConfig) -> None:
        """Raise ConfigError for impossible hyper-parameters (the runner calls this
        before building anything, so a typo costs no waiting). The default checks
        ``ranges``; override (calling ``super()``) for checks that involve several keys."""
        check_ranges(hp, cls.ranges)

    def build_protocol(self):
        """The protocol object of this method (called once, before ``setup_adapters``);
        default: the stream modality's (``moram_bench.protocols.make_protocol``)."""
        from .protocols import make_protocol

        return make_protocol(self)

    def setup_adapters(self) -> None:
        """Inject adapters into ``self.backbone`` (called once, in __init__)."""

    def begin_task(self, task: int, data, restoring: bool) -> None:
        """Grow/freeze parameters for ``task`` before its training. ``data``: the stream's
        DataModule (``self.task_batches(data, task)`` iterates the task's training set);
        ``restoring``: rebuilding the architecture to load a checkpoint (``data`` is None:
        skip data-dependent work; the weights are loaded afterwards)."""

    def end_task(self, task: int, data, restoring: bool) -> None:
        """Called after the task's training (freeze, consolidate, update bases...)."""

    def extra_loss(self, batch: dict, outputs: dict) -> torch.Tensor | None:
        """Method-specific loss terms added to the protocol's task loss (None: nothing).
        ``outputs`` are the protocol's step outputs plus ``aux_loss`` (see the module doc)."""
        return None

    def text_prefix(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """Text streams: embeddings ``(B, P, d_model)`` prepended to the LM's input for these
        left-padded prompts (PROMPTS only, never answers; training and generation), or
        None; and a dict of auxiliary outputs merged into the training step's outputs."""
        return None, {}

    def extra_metrics(self) -> dict[str, Any]:
        """Method facts recorded in metrics.json (switches that change fairness, sizes; a
        ``display_name`` key names the leaderboard row when it differs from the method's)."""
        return {}

    # ---- shared helpers -----------------------------------------------------------------
    def adapters(self) -> dict[str, nn.Module]:
        """Every adapter injected into the backbone, by the qualified name of the layer it
        adapts (in module order)."""
        return {name: wrapped.adapter for name, wrapped in adapted_modules(self.backbone).items()}

    def task_batches(self, data, task: int, batch_size: int = 64) -> Iterator[dict]:
        """This rank's shard of ``task``'s training set from the DataModule ``data``,
        unshuffled, moved to the device: for data-dependent set-up in begin_task/end_task
        (e.g. input covariances). Sums computed over it must be all-reduced across ranks
        (``all_reduce_sum``)."""
        import torch.distributed as dist
        from torch.utils.data import DataLoader

        from .data import UnrepeatedSampler

        if data is None:
            raise RuntimeError(f"{self.method_name}: task {task} needs its training data, but none was passed")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        ds = data.dataset("train", task)
        loader = DataLoader(ds, batch_size=batch_size, sampler=UnrepeatedSampler(len(ds), rank, world),
                            collate_fn=data.collate_fn)
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

    def inject(self, factory, patterns=None, exclude=(), only=None):
        """Inject one adapter per selected Linear of the backbone (the one injection path).

        The Linears selected are those matching ``patterns`` (regular expressions, e.g.
        ``method.targets``; default: the backbone's declared adapter targets), minus those
        matching ``exclude``, and, if ``only`` (a regular expression) is given, only those
        whose name matches it. Returns ``{name: AdaptedLinear}``; see also ``adapters()``."""
        pats = list(patterns) if patterns else list(self.backbone.info.get("adapter_targets", []))
        if not pats:
            raise ConfigError(f"backbone {self.backbone.name!r} declares no adapter targets; set method.targets")
        try:
            return inject_adapters(self.backbone.model, pats, factory, exclude=exclude,
                                   only=[only] if only else ())
        except ValueError as e:
            extra = f" restricted to {only!r}" if only else ""
            raise ConfigError(f"{self.method_name}: no Linear of backbone {self.backbone.name!r} matches "
                              f"{pats}{extra}; set method.targets") from e

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
    def protocol_loss(self, batch: dict, task: int) -> tuple[torch.Tensor, dict]:
        """The protocol's task loss and the step's outputs, with ``aux_loss``: the sum of
        the auxiliary terms the adapters emitted during the forward pass (None if none)."""
        with aux_loss.collect() as terms:
            loss, outputs = self.protocol.loss(batch, task)
        return loss, {**outputs, "aux_loss": aux_loss.total(terms)}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, outputs = self.protocol_loss(batch, self.current_task)
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
