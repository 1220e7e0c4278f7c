"""inflora: interference-free LoRA (Liang & Li, CVPR 2024).

Per adapted layer, task t adds a branch ``U_t D_t x`` (docs/METHODS.md, InfLoRA):

- ``D_t`` (r x d_in), DESIGNED and frozen: before the task, the task's training data runs
  through the model (no grad, eval mode) and forward hooks accumulate the uncentred input
  covariance ``C`` of every adapted layer (moram_bench/adapters/covariance.py, all-reduced
  under DDP); ``D_t`` = the top-r left singular vectors of ``(I - M M^T) C``, transposed,
  divided by sqrt(3), where ``M`` is the layer's memory basis of earlier tasks. So ``D_t``
  reads only directions orthogonal to what earlier tasks' inputs span.
- ``U_t`` (d_out x r), zero-initialised, the ONLY trained parameter of task t; earlier
  ``U``'s are frozen. Prediction sums every branch: no task id.
- After the task, ``C`` is recomputed (with the trained branch) and ``M`` grows GPM-style
  with the energy threshold ``eps_t = lb + (le - lb) * t / T`` (t 0-based, T tasks). After
  the FIRST task the official code keeps the directions whose cumulative energy ratio is
  strictly below ``eps_0`` (at least one): one fewer than the fewest that reach it
  (``first_task_rule: below``, default); ``reach`` keeps the fewest that reach it, the rule
  of every later task. Fidelity, point by point: docs/FIDELITY.md (InfLoRA).

Placement (``kv_filter``): the paper adapts the key and value projections of every
attention block. Among the backbone's declared adapter targets (MoRAM's placement) the
Linears whose name matches ``kv_filter`` are kept: ``k_proj``/``v_proj`` of both towers of
an open_clip ViT CLIP (tiny-clip: 8 layers), MiniLM's ``attention.self.key``/``value`` on
mini-clip (12 layers, text tower only: its image tower is a CNN without attention, so the
image side stays frozen), ``k_proj``/``v_proj`` of an LLM. ``method.targets`` (a regex list)
replaces the whole selection.

Defaults and quirks (conf/method/inflora.yaml): r=10, lb=0.95, le=1.0; the optimiser is
the shared one (AdamW 5e-4, cosine, as every method here: fairness; the paper used Adam
5e-4 for 20 epochs). The covariance counts every token the training loss forwards (for
text inputs padding positions too). DualGPM's "retain" storage is equivalent to the basis
kept here (see covariance.py); the variant that designs ``D_t`` from ``M M^T C`` with ``M``
the free space is the same projection.

Checkpoints: ``down`` (all D's stacked), ``up.<t>`` and ``basis`` per layer; the basis'
width is data-dependent, so the layer resizes it when loading.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moram_bench.adapters.covariance import InputCovariance, free_directions, gpm_update
from moram_bench.config import ConfigError
from moram_bench.method import ContinualModule
from moram_bench.registry import register_method


class InfLoRALayer(nn.Module):
    """Branches ``sum_t U_t D_t x`` on a frozen Linear, plus the layer's GPM basis ``M``."""

    def __init__(self, d_in: int, d_out: int, r: int):
        super().__init__()
        self.d_in, self.d_out, self.r = int(d_in), int(d_out), int(r)
        self.up = nn.ParameterList()
        self.register_buffer("down", torch.zeros(0, d_in))   # (branches * r, d_in), frozen
        self.register_buffer("basis", torch.zeros(d_in, 0))  # (d_in, k), orthonormal columns

    @property
    def n_branches(self) -> int:
        return len(self.up)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, branches={self.n_branches}, basis={self.basis.shape[1]}"

    @torch.no_grad()
    def grow(self, down: torch.Tensor | None = None) -> None:
        """Freeze earlier up-projections and add a branch with down-projection ``down``
        (r x d_in; zeros when restoring, the checkpoint fills it) and a zero up-projection."""
        for p in self.up:
            p.requires_grad_(False)
        ref = self.down
        d = ref.new_zeros(self.r, self.d_in) if down is None else down.to(ref)
        if d.shape != (self.r, self.d_in):
            raise ValueError(f"down-projection must be {(self.r, self.d_in)}, got {tuple(d.shape)}")
        self.down = torch.cat([self.down, d])
        self.up.append(nn.Parameter(ref.new_zeros(self.d_out, self.r)))

    def freeze(self) -> None:
        for p in self.up:
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        if not self.n_branches:
            return y0
        up = torch.cat(list(self.up), dim=1).to(x.dtype)  # (d_out, branches * r)
        return y0 + F.linear(F.linear(x, self.down.to(x.dtype)), up).to(y0.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the basis width depends on the data: take the checkpoint's
        key = prefix + "basis"
        if key in state_dict and state_dict[key].dim() == 2 and state_dict[key].shape[0] == self.d_in:
            self.basis = self.basis.new_zeros(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_method("inflora")
class InfLoRA(ContinualModule):
    """InfLoRA: per-task LoRA branches with designed, frozen down-projections orthogonal to earlier tasks' input space."""

    modalities = ("image", "text")

    ranges = {"r": ">= 1"}

    @classmethod
    def validate_config(cls, h) -> None:
        super().validate_config(h)
        lb, le = float(h.lb), float(h.le)
        if not 0.0 <= lb <= le <= 1.0:
            raise ConfigError(f"method.lb and method.le must satisfy 0 <= lb <= le <= 1 (got {lb}, {le})")
        if int(h.cov_batch_size) < 1:
            raise ConfigError(f"method.cov_batch_size must be >= 1 (got {h.cov_batch_size})")
        if str(h.first_task_rule) not in ("below", "reach"):
            raise ConfigError(f"method.first_task_rule must be below or reach (got {h.first_task_rule!r})")

    def setup_adapters(self) -> None:
        h = self.hp
        r = int(h.r)
        # method.targets replaces the whole selection; else the declared targets' k/v Linears
        self.inject(lambda name, lin: InfLoRALayer(lin.in_features, lin.out_features, r),
                    patterns=h.get("targets"), only=None if h.get("targets") else str(h.kv_filter))

    def threshold(self, task: int) -> float:
        """``eps_t = lb + (le - lb) * t / T`` (t 0-based)."""
        return float(self.hp.lb) + (float(self.hp.le) - float(self.hp.lb)) * task / len(self.stream)

    @torch.no_grad()
    def input_covariances(self, data, task: int) -> dict[str, torch.Tensor]:
        """Uncentred input covariance of every adapted layer over ``task``'s training data
        (this rank's shard, all-reduced), with the model as it is now, in eval mode."""
        collector = InputCovariance(self.adapters())
        was_training = self.training
        self.eval()
        try:
            with collector:
                for batch in self.task_batches(data, task, batch_size=int(self.hp.cov_batch_size)):
                    self.protocol.loss(batch, task)  # the training forward pass, no grad
        finally:
            self.train(was_training)
        collector.all_reduce(self.all_reduce_sum)
        return collector.covariances()

    def begin_task(self, task: int, data, restoring: bool) -> None:
        layers = self.adapters()
        if restoring:  # shapes only; the checkpoint holds the designed projections
            for layer in layers.values():
                layer.grow(None)
            return
        covs = self.input_covariances(data, task)
        scale = 1.0 / math.sqrt(3.0)
        for name, layer in layers.items():
            d = free_directions(layer.basis, covs[name], layer.r).t() * scale
            layer.grow(d)

    def end_task(self, task: int, data, restoring: bool) -> None:
        layers = self.adapters()
        for layer in layers.values():
            layer.freeze()
        if restoring:  # the basis is loaded from the checkpoint
            return
        covs = self.input_covariances(data, task)
        eps = self.threshold(task)
        strict = str(self.hp.first_task_rule) == "below"
        for name, layer in layers.items():
            layer.basis = gpm_update(layer.basis, covs[name], eps, strict_first=strict).to(layer.basis)

    def extra_metrics(self) -> dict:
        layers = list(self.adapters().values())
        dims = [layer.basis.shape[1] for layer in layers]
        return {"adapted_layers": len(layers), "r": int(self.hp.r), "lb": float(self.hp.lb), "le": float(self.hp.le),
                "first_task_rule": str(self.hp.first_task_rule),
                "kv_filter": str(self.hp.kv_filter) if not self.hp.get("targets") else None,
                "basis_dims": dims, "basis_fraction_mean": (sum(d / layer.d_in for d, layer in zip(dims, layers))
                                                            / max(1, len(layers)))}
