"""O-LoRA: orthogonal subspace learning for language-model continual learning (Wang et al. 2023).

Every task gets its own rank-r LoRA per adapted layer; when a task ends its LoRA is frozen
and kept, and the layer applies the sum of all of them (the frozen ones folded into one
concatenated pair of matrices, so a call costs two matmuls whatever the number of tasks):

    y = y0 + sum_{s < t} scale * B_s A_s x  +  scale * B_t A_t dropout(x)

While learning task t the loss adds an orthogonality penalty between the new LoRA's
down-projection and all earlier ones, summed over the adapted layers:

    loss = task loss + lambda1 * sum_layers sum_ij |(A_prev A_t^T)_ij|
                     + lambda2 * sum_layers (||A_t||_F + ||B_t||_F)

with A_prev the earlier tasks' A matrices stacked (r*(t-1) x d_in). lambda1 = 0.5 (the
paper's setting); lambda2 (a penalty on the current LoRA, 0 in the paper's LLaMA runs)
defaults to 0. As in the official trainer the lambda2 term is the UNSQUARED Frobenius norm
of each current matrix (``lambda2_squared: true`` squares it, an L2 weight penalty; this
project's earlier behaviour). Dropout acts on the current LoRA's input only; frozen LoRAs
see ``x`` (evaluation is identical either way).

Placement and learning rate (deviations from the paper, for the stream's fairness rule):
the backbone's adapter targets (q/k/v/o on Llama-family LLMs, as every method on the
stream) unless ``method.targets`` is set; the paper adapts q and v only
(``method.targets='[self_attn\\.(q|v)_proj$]'`` reproduces that). The optimiser is the
stream's shared LLM one (Adam 5e-4 constant, as MoRAM's and seq-lora's text settings); the
paper used 1e-3 for T5 and 1e-4 for LLaMA (``method.optim.lr``). No task id at test time.
Text streams only. Fidelity, point by point: docs/FIDELITY.md (O-LoRA).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moram_bench.method import ContinualModule
from moram_bench.registry import register_method


class OLoRALayer(nn.Module):
    """Per-Linear O-LoRA adapter: frozen earlier LoRAs (summed) plus the current task's one.

    ``frozen_A`` ``(R, d_in)`` stacks the earlier tasks' down-projections (unscaled, the
    matrices the orthogonality loss compares with) and ``frozen_B`` ``(d_out, R)`` their
    up-projections times the scale. Both are persistent buffers that grow by ``r`` rows /
    columns per finished task (rebuild by replaying ``grow``/``freeze`` before loading).
    """

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float | None, dropout: float):
        super().__init__()
        self.d_in, self.d_out, self.r = d_in, d_out, int(r)
        self.scale = (float(alpha) / self.r) if alpha else 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A: nn.Parameter | None = None
        self.B: nn.Parameter | None = None
        self.register_buffer("frozen_A", torch.zeros(0, d_in))
        self.register_buffer("frozen_B", torch.zeros(d_out, 0))

    @property
    def n_tasks(self) -> int:
        """LoRAs held (frozen ones plus the current one)."""
        return self.frozen_A.shape[0] // self.r + (self.A is not None)

    @torch.no_grad()
    def grow(self) -> None:
        """Freeze the current LoRA (if any) and start a new one (A kaiming, B zero)."""
        self.freeze()
        ref = self.frozen_A
        A = torch.empty(self.r, self.d_in, device=ref.device, dtype=ref.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(self.d_out, self.r, device=ref.device, dtype=ref.dtype))

    @torch.no_grad()
    def freeze(self) -> None:
        """Move the current LoRA into the frozen stacks (its effect is unchanged)."""
        if self.A is None:
            return
        self.frozen_A = torch.cat([self.frozen_A, self.A.detach()], 0)
        self.frozen_B = torch.cat([self.frozen_B, self.B.detach() * self.scale], 1)
        self.A = None
        self.B = None

    def orthogonality(self) -> torch.Tensor | None:
        """``sum |A_prev A_t^T|`` (None when there is no earlier or no current LoRA)."""
        if self.A is None or self.frozen_A.shape[0] == 0:
            return None
        return (self.frozen_A.to(self.A.dtype) @ self.A.t()).abs().sum()

    def forward(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        out = y0
        if self.frozen_A.shape[0]:
            out = out + (x @ self.frozen_A.t().to(x.dtype)) @ self.frozen_B.t().to(x.dtype)
        if self.A is not None:
            out = out + (self.dropout(x) @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale
        return out


@register_method("olora")
class OLoRA(ContinualModule):
    """O-LoRA: a new LoRA per task, old ones frozen and summed, orthogonality loss on the A's."""

    modalities = ("text",)

    ranges = {"r": ">= 1", "lambda1": ">= 0", "lambda2": ">= 0", "dropout": "in [0, 1)"}

    def setup_adapters(self) -> None:
        h = self.hp
        self.inject(lambda name, lin: OLoRALayer(lin.in_features, lin.out_features, int(h.r),
                                                 h.get("alpha"), float(h.dropout)),
                    patterns=h.get("targets"))

    def begin_task(self, task: int, data, restoring: bool) -> None:
        for a in self.adapters().values():
            a.grow()

    def end_task(self, task: int, data, restoring: bool) -> None:
        for a in self.adapters().values():
            a.freeze()

    def extra_loss(self, batch: dict, outputs: dict) -> torch.Tensor | None:
        lam1 = float(self.hp.lambda1)
        lam2 = float(self.hp.get("lambda2", 0.0) or 0.0)
        terms = []
        if lam1 > 0:
            orth = [o for o in (a.orthogonality() for a in self.adapters().values()) if o is not None]
            if orth:
                terms.append(lam1 * torch.stack(orth).sum())
        if lam2 > 0:
            current = [m for a in self.adapters().values() if a.A is not None for m in (a.A, a.B)]
            if current:
                squared = bool(self.hp.get("lambda2_squared", False))
                terms.append(lam2 * sum(m.pow(2).sum() if squared else torch.linalg.matrix_norm(m) for m in current))
        return sum(terms) if terms else None

    def extra_metrics(self) -> dict:
        adapters = list(self.adapters().values())
        return {"r": int(self.hp.r), "lambda1": float(self.hp.lambda1),
                "lambda2": float(self.hp.get("lambda2", 0.0) or 0.0),
                "lambda2_squared": bool(self.hp.get("lambda2_squared", False)), "adapted_layers": len(adapters),
                "loras_per_layer": adapters[0].n_tasks if adapters else 0}
