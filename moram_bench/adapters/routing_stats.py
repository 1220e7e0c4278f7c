"""The routing statistics an adapter keeps for the routing report (moram_bench/routing.py).

An adapter that routes (MoRAM's memory, MoE-LoRA, MoE-Adapters) calls ``add_routing_stats``
once in ``__init__`` and ``reset_routing_stats`` from its ``reset_routing``; while
``record_routing`` is on it adds to the three buffers: ``routing_mass`` (float64, one entry
per unit: atoms, experts or routers), ``routing_tokens`` (tokens or samples recorded) and
``routing_fallback`` (those sent to no unit). They are non-persistent: never checkpointed.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["add_routing_stats", "reset_routing_stats"]


def add_routing_stats(module: nn.Module) -> None:
    """Register the (empty) routing statistics on ``module``; recording starts off."""
    module.record_routing = False
    module.register_buffer("routing_mass", torch.zeros(0, dtype=torch.float64), persistent=False)
    module.register_buffer("routing_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
    module.register_buffer("routing_fallback", torch.zeros((), dtype=torch.int64), persistent=False)


def reset_routing_stats(module: nn.Module) -> None:
    """Zero the routing statistics (their sizes stay)."""
    module.routing_mass.zero_()
    module.routing_tokens.zero_()
    module.routing_fallback.zero_()
