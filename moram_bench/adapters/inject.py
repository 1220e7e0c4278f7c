"""Adapter injection by module-name patterns (one path for open_clip and transformers).

``inject_adapters(model, patterns, factory)`` replaces every ``nn.Linear`` whose qualified
name matches one of ``patterns`` (Python regular expressions, ``re.search`` semantics) by
``AdaptedLinear(base, factory(name, base))``. The base layer stays frozen and is called
as-is; the adapter receives the layer input ``x`` and the frozen output ``y0`` and returns
the adapted output. Fused attention (``nn.MultiheadAttention``) must be unfused first
(``moram_bench.adapters.attention.unfuse_attention``) so q/k/v are separate Linears.

Block-level, residual-parallel adapters (MoE-Adapters4CL) use the same mechanism one level
up: ``inject_block_adapters(model, specs, factory)`` replaces every transformer block whose
name matches a spec's ``pattern`` by ``AdaptedBlock(base, factory(name, base, width), read,
write)``. A backbone declares its blocks in ``info["adapter_blocks"]`` as it declares its
Linear targets: a list of ``{"pattern": regex, "read": submodule, "write": submodule}``,
``read`` being the block's submodule whose INPUT is the residual stream that enters the MLP
branch, ``write`` the one whose OUTPUT is the MLP branch's contribution. The block runs
unchanged; the adapter reads ``u`` (the input of ``read``) and its output is added to the
output of ``write``:

- open_clip ``ResidualAttentionBlock`` (read ``ln_2``, write ``ls_2``)::

      u = x + ls_1(attn(ln_1(x)));   out = u + ls_2(mlp(ln_2(u))) + adapter(u)

  (``ls_2`` is the identity in CLIP, so this is exactly MoE-Adapters4CL's
  ``x = x + mlp(ln_2(x)) + adapter(x)``: the adapter reads the un-normalised residual
  stream after attention, i.e. the MLP branch's input before ``ln_2``);
- Hugging Face BERT layers (read ``intermediate``, write ``output.dense``), post-LN::

      u = attention(x);   out = LayerNorm(dense(intermediate(u)) + adapter(u) + u)

  (the parallel-adapter position of a post-LN block: beside the MLP, inside the residual
  sum that the final LayerNorm normalises).
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
    only: Iterable[str] = (),
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


class AdaptedBlock(nn.Module):
    """A frozen transformer block plus a residual-parallel adapter (see the module doc).

    ``forward`` calls the block as-is (any signature); two hooks on the block's own
    submodules do the rest: the input of ``read`` (the residual stream ``u``, batch-first
    ``(batch, seq, width)``) is kept, and ``adapter(u)`` is added to the output of ``write``.
    """

    def __init__(self, base: nn.Module, adapter: nn.Module, read: str, write: str):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.read, self.write = str(read), str(write)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self._u: torch.Tensor | None = None
        base.get_submodule(self.read).register_forward_pre_hook(self._keep_input)
        base.get_submodule(self.write).register_forward_hook(self._add_adapter)

    def _keep_input(self, module, args):
        self._u = args[0]

    def _add_adapter(self, module, args, output):
        u, self._u = self._u, None
        if u is None:
            raise RuntimeError(f"AdaptedBlock: {self.write!r} ran before {self.read!r} (wrong block declaration)")
        return output + self.adapter(u).to(output.dtype)

    def __getattr__(self, name: str):
        # model code calls helpers on its blocks (open_clip: ``get_weight_dtype``): the
        # wrapper answers for the block it wraps
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "adapter"):
                raise
            return getattr(self.base, name)

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)


def block_width(block: nn.Module, read: str) -> int:
    """The residual-stream width of a block: the size its ``read`` submodule takes."""
    mod = block.get_submodule(read)
    if isinstance(mod, nn.LayerNorm):
        return int(mod.normalized_shape[-1])
    if isinstance(mod, nn.Linear):
        return int(mod.in_features)
    for sub in mod.modules():
        if isinstance(sub, nn.Linear):
            return int(sub.in_features)
    raise ValueError(f"cannot tell the residual width of block submodule {read!r} ({type(mod).__name__})")


def match_block_names(model: nn.Module, specs: Iterable[dict]) -> dict[str, dict]:
    """``{block name: its spec}`` for every module matching a spec's ``pattern`` (first
    matching spec wins; already adapted blocks are skipped)."""
    compiled = [(re.compile(str(s["pattern"])), s) for s in specs]
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptedBlock) or name.endswith(".base"):
            continue
        for reg, spec in compiled:
            if reg.search(name):
                out[name] = spec
                break
    return out


def inject_block_adapters(
    model: nn.Module,
    specs: Iterable[dict],
    factory: Callable[[str, nn.Module, int], nn.Module],
) -> dict[str, AdaptedBlock]:
    """Wrap matching blocks; ``factory(name, block, width)`` builds each adapter. Returns
    {qualified name: AdaptedBlock}. Raises if no block matches."""
    specs = list(specs)
    found = match_block_names(model, specs)
    if not found:
        raise ValueError(f"no module matched the adapter block patterns {[s['pattern'] for s in specs]}")
    out = {}
    for name, spec in found.items():
        block = model.get_submodule(name)
        width = block_width(block, str(spec["read"]))
        wrapped = AdaptedBlock(block, factory(name, block, width), spec["read"], spec["write"])
        _set_submodule(model, name, wrapped)
        out[name] = wrapped
    return out


def adapted_modules(model: nn.Module) -> dict[str, AdaptedLinear | AdaptedBlock]:
    """Every injected wrapper (per-Linear and per-block), by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (AdaptedLinear, AdaptedBlock))}
