"""Auxiliary loss terms that adapters compute inside the model's forward pass.

An adapter deep inside the backbone (e.g. a MoE layer's load-balancing term) cannot return
an extra output through the backbone's own forward. It calls ``emit(term)``;
``ContinualModule.training_step`` runs the protocol's loss inside ``collect()`` and puts
the sum of the emitted terms into the step's outputs (``outputs["aux_loss"]``, None when
nothing was emitted), where the method's ``extra_loss`` picks it up. Outside ``collect()``
(evaluation, covariance passes) ``collecting()`` is False and adapters skip the term.
Nothing is stored on the adapters between steps.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

__all__ = ["collect", "collecting", "emit", "total"]

_ACTIVE: contextvars.ContextVar[list | None] = contextvars.ContextVar("moram_bench_aux_losses", default=None)


@contextlib.contextmanager
def collect():
    """Collect the terms emitted in the block into the yielded list."""
    terms: list[torch.Tensor] = []
    token = _ACTIVE.set(terms)
    try:
        yield terms
    finally:
        _ACTIVE.reset(token)


def collecting() -> bool:
    """Whether a ``collect()`` block is active (adapters compute their terms only then)."""
    return _ACTIVE.get() is not None


def emit(term: torch.Tensor) -> None:
    """Add ``term`` (a scalar tensor) to the active collection (dropped when none is active)."""
    terms = _ACTIVE.get()
    if terms is not None:
        terms.append(term)


def total(terms: list[torch.Tensor]) -> torch.Tensor | None:
    """The sum of the collected terms, None when there are none."""
    return torch.stack(terms).sum() if terms else None
