"""Adapter injection by module-name patterns (one path for open_clip and transformers).

``inject_adapters(model, patterns, factory)`` replaces every ``nn.Linear`` whose qualified
name matches one of ``patterns`` (Python regular expressions, ``re.search`` semantics) by
``AdaptedLinear(base, factory(name, base))``. The base layer stays frozen and is called
as-is; the adapter receives the layer input ``x`` and the frozen output ``y0`` and returns
the adapted output. Fused attention (``nn.MultiheadAttention``) must be unfused first
(``moram_bench.adapters.attention.unfuse_attention``) so q/k/v are separate Linears.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus an adapter: ``y = adapter(x, base(x))``."""

    def __init__(self, base: nn.Linear, adapter: nn.Module):
        super().__init__()
        self.base = base
        self.adapter = adapter
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight (dtype/device probes)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x, self.base(x))


def match_linear_names(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    regs = [re.compile(p) for p in patterns]
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not isinstance(mod, AdaptedLinear):
            if any(r.search(name) for r in regs):
                names.append(name)
    return names


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_adapters(
    model: nn.Module,
    patterns: Iterable[str],
    factory: Callable[[str, nn.Linear], nn.Module],
    exclude: Iterable[str] = (),
) -> dict[str, AdaptedLinear]:
    """Wrap matching Linears; returns {qualified name: AdaptedLinear}. Raises if none match.
    Names matching an ``exclude`` pattern are skipped; with ``only``, a name must also match
    one of those patterns (e.g. InfLoRA's key/value filter over the declared targets)."""
    patterns = list(patterns)
    excl = [re.compile(p) for p in exclude]
    keep = [re.compile(p) for p in only]
    names = [n for n in match_linear_names(model, patterns)
             if not any(r.search(n) for r in excl) and (not keep or any(r.search(n) for r in keep))]
    if not names:
        raise ValueError(f"no nn.Linear matched the adapter target patterns {patterns}")
    out = {}
    for name in names:
        base = model.get_submodule(name)
        wrapped = AdaptedLinear(base, factory(name, base))
        _set_submodule(model, name, wrapped)
        out[name] = wrapped
    return out


def adapted_modules(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    only: Iterable[str] = (),
