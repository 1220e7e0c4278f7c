"""MoE-LoRA: a growing mixture of rank-r LoRA experts with a linear top-k router.

The per-Linear adapter of the ``moe-lora`` baseline (baselines/moe_lora.py), kept in the
package so that benchmarks (moram_bench/bench.py) can time it beside MoRAM's memory.
For one token ``x`` of a frozen layer with output ``y0`` and ``E`` experts so far
(docs/METHODS.md, section MoE-LoRA)::

    g   = W_g · route(x)                        # E router scores (no bias)
    k   = min(top_k, E)
    w   = softmax over the k largest g_e; w_e = 0 outside the top-k
    y   = y0 + sum_e w_e * s * B_e A_e dropout(x)

``route(x)`` is ``x`` itself (per-token routing, default) or, with ``per_sample=True``, the
FIRST token of the sample's sequence (MoE-Adapters4CL routes with the [CLS]/first token of
the residual stream), so every token of a sample shares one routing decision. Inputs are
batch-first (``(batch, seq, d_in)``); 2-D inputs ``(batch, d_in)`` (e.g. a projection of
pooled features) have one token per sample and both modes coincide. Note: on a CAUSAL text
tower (open_clip's native text transformer) the first token is the start token, which sees
nothing else, so per-sample routing is then the same for every prompt.

Growth. ``grow()`` freezes every existing expert and appends one (``A`` (r x d_in)
``kaiming_uniform_(a=sqrt(5))``, ``B`` (d_out x r) zero, so the layer is unchanged) and one
router row (ZERO, as MoE-Adapters initialises its routers: a new expert starts with score 0).
Old router rows are frozen too unless ``train_old_router=True`` (the rows then keep
training in later tasks). ``freeze()`` freezes everything (end of a task).

Computation. All experts are applied densely: ``h = x @ [A_1; ...; A_E]^T`` (``E*r``
columns), scaled by each expert's routing weight, then ``h @ [B_1 ... B_E]^T``. With a few
tens of experts of rank <= 16 this is two small matmuls, and every trainable parameter is
part of the autograd graph at every step (an unselected expert gets a zero gradient), so
DDP never sees an unused parameter. Gradients reach only trainable experts/rows.

Load balancing (optional, ``balance_coef > 0``, training only): Shazeer et al.'s
importance and load terms, ``coef * (cv^2(sum_tokens w) + cv^2(#tokens with w_e > 0))``
(the load term is a count, so only the importance term has a gradient; this is the
noise-free variant MoE-Adapters computes). Each training call inside a training step
emits its term (``moram_bench/adapters/aux_loss.py``): the step's outputs carry the sum as
``outputs["aux_loss"]`` for the method's ``extra_loss``; nothing is kept on the layer.

Routing statistics: the same interface as ``RankOneMemory`` (moram_bench/memory.py), so a
routing report treats both alike: with ``record_routing = True`` every call adds, per
expert, the routing weight mass (sum over tokens of ``w_e``) to ``routing_mass`` and counts
tokens in ``routing_tokens``; ``routing_fallback`` stays 0 (there is no gate). Non-persistent
buffers, zeroed by ``reset_routing()``; ``atom_task_ids`` maps each expert to the
``grow`` call (task) that added it and ``routing_mass_by_task()`` sums per call.

State dict: ``A.<e>``, ``B.<e>``, ``router.<e>`` per expert. To restore, call
``grow()`` as many times as before, then ``load_state_dict``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import aux_loss
from .routing_stats import add_routing_stats, reset_routing_stats

__all__ = ["MoELoRA", "top_k_softmax", "cv_squared", "expert_parameters"]


def top_k_softmax(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense weights ``(..., E)``: softmax over the ``k`` largest scores of each row, zero
    elsewhere; also returns the selected indices ``(..., k)``."""
    k = min(k, scores.shape[-1])
    vals, idx = scores.topk(k, dim=-1)
    w = torch.zeros_like(scores).scatter(-1, idx, torch.softmax(vals, dim=-1))
    return w, idx


def cv_squared(v: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` (0 for a single entry)."""
    v = v.float()
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var() / (v.mean() ** 2 + eps)


class MoELoRA(nn.Module):
    """A mixture of rank-r LoRA experts (one per task) with a linear top-k router.

    Args:
        d_in, d_out: the adapted layer's sizes.
        r: rank of each expert.
        top_k: experts mixed per routing decision (``min(top_k, E)``).
        scale: LoRA scale ``s`` (alpha / r; 1 in the CLIP setting).
        dropout: dropout on the experts' input (not on the router's).
        per_sample: route once per sample with its first token (MoE-Adapters) instead of
            per token (default).
        train_old_router: keep training the router rows of earlier experts (default: frozen).
        balance_coef: load-balancing loss coefficient (0: off, the default).
    """

    def __init__(self, d_in: int, d_out: int, r: int, top_k: int = 2, scale: float = 1.0,
                 dropout: float = 0.0, per_sample: bool = False, train_old_router: bool = False,
                 balance_coef: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"expert rank r must be >= 1 (got {r})")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (got {top_k})")
        self.d_in, self.d_out, self.r, self.top_k = int(d_in), int(d_out), int(r), int(top_k)
        self.scale, self.per_sample = float(scale), bool(per_sample)
        self.train_old_router, self.balance_coef = bool(train_old_router), float(balance_coef)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.router = nn.ParameterList()
        add_routing_stats(self)

    # ---------------------------------------------------------------- sizes / growth
    @property
    def n_experts(self) -> int:
        return len(self.A)

    @property
    def n_grows(self) -> int:
        """Number of ``grow`` calls (= tasks)."""
        return self.n_experts

    @property
    def n_atoms(self) -> int:  # the routing-report interface counts routable units
        return self.n_experts

    @property
    def atom_task_ids(self) -> torch.Tensor:
        """``(n_experts,)`` int64: the task (grow call) of each expert."""
        return torch.arange(self.n_experts, dtype=torch.int64)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, experts={self.n_experts}, "
                f"top_k={self.top_k}, scale={self.scale}, per_sample={self.per_sample}, "
                f"train_old_router={self.train_old_router}, balance_coef={self.balance_coef}")

    def _ref(self) -> torch.Tensor:
        """A tensor on the layer's device/dtype (a parameter once one exists)."""
        return self.A[0] if self.n_experts else self.routing_mass.float()

    @torch.no_grad()
    def grow(self) -> None:
        """Freeze existing experts (and, unless ``train_old_router``, their router rows) and
        append a new trainable expert (A kaiming, B zero) with a zero router row."""
        ref = self._ref()
        for p in list(self.A) + list(self.B):
            p.requires_grad_(False)
        for p in self.router:
            p.requires_grad_(self.train_old_router)
        a = torch.empty(self.r, self.d_in, device=ref.device, dtype=ref.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A.append(nn.Parameter(a))
        self.B.append(nn.Parameter(torch.zeros(self.d_out, self.r, device=ref.device, dtype=ref.dtype)))
        self.router.append(nn.Parameter(torch.zeros(self.d_in, device=ref.device, dtype=ref.dtype)))
        self.routing_mass = torch.cat([self.routing_mass, self.routing_mass.new_zeros(1)])

    def freeze(self) -> None:
        """Freeze every expert and router row (end of a task)."""
        for p in self.parameters():
            p.requires_grad_(False)

    # ---------------------------------------------------------------- routing
    def router_weight(self) -> torch.Tensor:
        """``(E, d_in)``: the router rows stacked."""
        return torch.stack(list(self.router))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights ``(..., E)`` broadcastable to ``x``'s tokens, and the indices of
        the selected experts. Per-sample routing uses ``x[:, 0]`` of 3-D inputs."""
        rx = x[:, :1] if (self.per_sample and x.dim() == 3) else x
        scores = F.linear(rx, self.router_weight().to(x.dtype))
        return top_k_softmax(scores, self.top_k)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        if self.n_experts == 0 or x.numel() == 0:
            return y0
        w, _ = self.route(x)                              # (..., E), (..., 1 or L, E)
        w = w.expand(*x.shape[:-1], self.n_experts)
        a = torch.cat(list(self.A)).to(x.dtype)           # (E*r, d_in)
        b = torch.cat(list(self.B), dim=1).to(x.dtype)    # (d_out, E*r)
        h = F.linear(self.dropout(x), a)                  # (..., E*r)
        h = h * w.repeat_interleave(self.r, dim=-1)
        delta = F.linear(h, b) * self.scale
        if self.training and self.balance_coef > 0 and torch.is_grad_enabled() and aux_loss.collecting():
            aux_loss.emit(self.balance_loss(w.reshape(-1, self.n_experts)))
        self._record(w)
        return y0 + delta.to(y0.dtype)

    def balance_loss(self, w: torch.Tensor) -> torch.Tensor:
        """``coef * (cv^2(importance) + cv^2(load))`` over the tokens' weights ``(T, E)``."""
        importance = w.sum(0)
        load = (w > 0).sum(0)
        return self.balance_coef * (cv_squared(importance) + cv_squared(load))

    # ---------------------------------------------------------------- routing statistics
    def reset_routing(self) -> None:
        reset_routing_stats(self)

    def routing_mass_by_task(self) -> torch.Tensor:
        """``(n_grows,)``: one expert per task, so this is ``routing_mass`` itself."""
        return self.routing_mass.clone()

    @torch.no_grad()
    def _record(self, w: torch.Tensor) -> None:
        if not self.record_routing:
            return
        flat = w.reshape(-1, self.n_experts)
        self.routing_mass += flat.sum(0).to(self.routing_mass.dtype)
        self.routing_tokens += flat.shape[0]


def expert_parameters(layer: MoELoRA, expert: int) -> list[nn.Parameter]:
    """The parameters of one expert (its A, B and router row), for tests and reports."""
    return [layer.A[expert], layer.B[expert], layer.router[expert]]
