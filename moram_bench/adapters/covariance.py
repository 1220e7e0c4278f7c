"""Input covariances of adapted layers and the GPM memory-basis update (shared mechanics).

Used by InfLoRA (baselines/inflora.py) and by any method that designs adapters from the
data's input statistics (GPM, DualGPM, InfLoRA, O-LoRA-style projections).

``InputCovariance(modules)`` registers forward pre-hooks on the given modules (typically
``AdaptedLinear``s) while used as a context manager; every call adds ``sum_tokens x x^T``
(``d_in x d_in``) and the number of tokens, per module. ``all_reduce(fn)`` sums those
statistics across DDP ranks (pass ``ContinualModule.all_reduce_sum``); ``covariances()``
returns the uncentred covariances ``C = sum x x^T / n``. Run the data through the model
under ``torch.no_grad`` inside the ``with`` block.

Every token the forward pass sees is counted, padding positions of text inputs included.

``gpm_update(basis, cov, threshold)`` is GPM's energy criterion (Saha et al., 2021) on a
covariance: with ``C = U S V^T`` (total energy ``sum S^2``) and the memory basis ``M``
(orthonormal columns), the residual ``(I - M M^T) C = U' S' V'^T`` adds its leading
directions ``U'[:, :k]`` for the fewest ``k`` such that the captured energy
``(sum S^2 - sum S'^2 + sum_{i<k} S'_i^2) / sum S^2`` reaches ``threshold`` (none when it
is reached already). On an EMPTY basis (the first task) ``strict_first=True`` applies the
official InfLoRA/GPM first-task rule instead: keep the ``k`` directions whose cumulative
energy ratio is STRICTLY BELOW the threshold (at least one), i.e. one direction fewer than
the fewest that reach it (whenever the threshold is not hit exactly). DualGPM's "retain"
mode stores the complement of ``M`` instead, once ``M`` is more than half full; it
describes the same subspaces (a memory saving, not a different method), so only ``M`` is
kept here.

``project_out(basis, cov)`` is ``(I - M M^T) C`` and ``free_directions(basis, cov, r)`` the
top-``r`` left singular vectors of it, re-projected onto the complement of ``M`` (a no-op
in exact arithmetic for directions with non-zero singular value; it keeps them orthogonal
to ``M`` to rounding error, and makes zero-energy directions zero rather than arbitrary).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

__all__ = ["InputCovariance", "gpm_update", "project_out", "free_directions"]


class InputCovariance:
    """Accumulate ``sum x x^T`` and token counts of the inputs of ``modules`` via hooks.

    Args:
        modules: ``{name: module}``; each module's first positional input ``(..., d_in)``
            is counted (``d_in`` = its last dimension): ``AdaptedLinear``s or the adapters
            themselves (``ContinualModule.adapters()``; an adapter's first input is the
            layer's input ``x``).
        dtype: accumulation dtype (float32 by default; float64 for small layers if needed).
    """

    def __init__(self, modules: Mapping[str, nn.Module], dtype: torch.dtype = torch.float32):
        self.modules = dict(modules)
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(self.dtype)
            if name not in self.sums:
                self.sums[name] = x.new_zeros(x.shape[1], x.shape[1])
                self.counts[name] = torch.zeros((), dtype=torch.float64, device=x.device)
            self.sums[name].addmm_(x.t(), x)
            self.counts[name] += x.shape[0]
        return hook

    def __enter__(self) -> "InputCovariance":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the statistics over DDP ranks. Every rank must call this with the same module
        names seen (a rank whose shard is empty still joins: missing sums are zeros)."""
        for name, mod in self.modules.items():
            if name not in self.sums:
                d = _in_features(mod)
                ref = next(iter(mod.parameters()), None)
                ref = next(iter(mod.buffers()), None) if ref is None else ref
                device = ref.device if ref is not None else "cpu"
                self.sums[name] = torch.zeros(d, d, dtype=self.dtype, device=device)
                self.counts[name] = torch.zeros((), dtype=torch.float64, device=device)
            reduce_sum(self.sums[name])
            reduce_sum(self.counts[name])

    def covariances(self) -> dict[str, torch.Tensor]:
        """``{name: sum x x^T / n}`` (uncentred); raises if a module saw no token."""
        out = {}
        for name in self.modules:
            n = float(self.counts.get(name, torch.zeros(())))
            if n <= 0:
                raise RuntimeError(f"no input reached {name} while collecting covariances")
            out[name] = self.sums[name] / n
        return out


def _in_features(mod: nn.Module) -> int:
    d = getattr(mod, "in_features", None)
    d = getattr(mod, "d_in", None) if d is None else d  # adapters name it d_in
    if d is None:
        raise ValueError(f"cannot tell the input size of {type(mod).__name__}")
    return int(d)


def project_out(basis: torch.Tensor | None, cov: torch.Tensor) -> torch.Tensor:
    """``(I - M M^T) C`` (``C`` itself when the basis is empty or None)."""
    if basis is None or basis.shape[1] == 0:
        return cov
    m = basis.to(cov.dtype)
    return cov - m @ (m.t() @ cov)


def free_directions(basis: torch.Tensor | None, cov: torch.Tensor, r: int) -> torch.Tensor:
    """``(d, r)``: the top-``r`` left singular vectors of ``(I - M M^T) C``, re-projected
    onto the complement of ``M`` (see the module docstring)."""
    u, _, _ = torch.linalg.svd(project_out(basis, cov.double()), full_matrices=False)
    u = u[:, :r]
    if basis is not None and basis.shape[1]:
        m = basis.double()
        u = u - m @ (m.t() @ u)
    return u.to(cov.dtype)


def gpm_update(basis: torch.Tensor | None, cov: torch.Tensor, threshold: float,
               strict_first: bool = False) -> torch.Tensor:
    """The memory basis after adding the directions of ``cov`` that GPM's energy criterion
    asks for (see the module docstring). Returns ``(d, k_old + k_new)``, orthonormal
    columns, old columns unchanged; the input basis may be None or ``(d, 0)``.
    ``strict_first``: on an empty basis, the official first-task count (module docstring)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] (got {threshold})")
    c = cov.double()
    d = c.shape[0]
    m = basis.double() if basis is not None else c.new_zeros(d, 0)
    s_total = torch.linalg.svdvals(c).pow(2).sum()
    if s_total <= 0:
        return m.to(cov.dtype)
    u_hat, s_hat, _ = torch.linalg.svd(project_out(m, c), full_matrices=False)
    energy_hat = s_hat.pow(2)
    if strict_first and m.shape[1] == 0:
        ratio = torch.cumsum(energy_hat, 0) / energy_hat.sum()
        k = max(1, int((ratio < threshold).sum()))
        new, _ = torch.linalg.qr(u_hat[:, :k])
        return new.to(cov.dtype)
    captured = float((s_total - energy_hat.sum()) / s_total)
    k = 0
    free = d - m.shape[1]
    # directions without energy (rounding noise) are never added, even when rounding keeps
    # the captured energy a hair below a threshold of 1
    while k < min(free, len(energy_hat)) and captured < threshold and energy_hat[k] > 1e-12 * s_total:
        captured += float(energy_hat[k] / s_total)
        k += 1
    if k == 0:
        return m.to(cov.dtype)
    new = u_hat[:, :k]
    new = new - m @ (m.t() @ new)  # keep exact orthogonality to the stored basis
    new, _ = torch.linalg.qr(new)
    return torch.cat([m, new], dim=1).to(cov.dtype)
