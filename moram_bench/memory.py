"""MoRAM's rank-1 associative memory: the per-Linear adapter of MoRAM.

A memory holds N rank-1 "atoms"; atom i has a key ``a_i`` (``d_in``) and a value ``b_i``
(``d_out``). For one token ``x`` of a frozen linear layer with output ``y0``
(docs/METHODS.md, section MoRAM)::

    p = A · dropout(x)             # N raw key projections
    z = p / max(||p||_2, eps)      # L2-normalised across the atom axis, per token
    k = min(max(topk, 2), N)
    w = softmax over the k largest z_i of (z_i / tau); 0 outside the top-k
    eval only (not training), if delta > 0:  w_i <- w_i * [z_i >= delta]   (no renormalising)
    y = y0 + sum_i w_i * p_i * s_i * b_i          # values weighted by the RAW p_i

If no atom passes ``delta`` at evaluation the layer is exactly the frozen layer (zero-shot
fallback); with no atom at all it returns ``y0`` itself.

Growth. ``grow(r)`` (``r`` defaults to the layer's own ``r``) freezes the current atoms
(if any) and appends ``r`` trainable atoms (keys ``kaiming_uniform_(a=sqrt(5))`` on an
``(r, d_in)`` tensor, values zero, ``(d_out, r)``). ``freeze()`` freezes the current
atoms without adding new ones (end of a task / of the stream). Current atoms are applied with ``s = scale``, frozen ones with
``s = 1``: when ``fold_scale`` (default) the values are multiplied by ``scale`` as they
are frozen, so freezing does not change the layer; ``fold_scale=False`` stores them
unscaled, reproducing the official LLM code, which halves the effect of the old atoms when
``scale = 2``.

Storage and speed. The straightforward formula (``reference_forward``) concatenates the whole
memory on every call and does a dense ``N``-wide value product. Here all keys (``N x d_in``)
and all values (``N x d_out``, row ``i`` is ``s_i b_i``) live in two contiguous stores with
spare capacity (doubling, so growth copies the frozen atoms about once per task, never per
call). Frozen atoms are written there once, at freezing; the current (trainable) atoms are
mirrored into the tail rows at each call (``r`` rows, independent of the number of tasks).
A call then does:

1. one matmul ``P = x @ K[:N]^T`` (the key projection, unavoidable);
2. the norm and the top-k of each row of ``P`` (top-k of ``z`` equals top-k of ``p``, the
   norm being a positive per-token scalar), the softmax and the gate on the k selected only;
3. ``y0`` plus the value product on the selected atoms only:
   ``F.embedding_bag(idx, V, coefficients)`` computes ``sum_j c_j V[idx_j]`` without
   materialising ``(tokens, k, d_out)``. When ``N <= dense_max_ratio * k`` (a memory of a
   few tasks) one ``addmm`` over all ``N`` atoms is faster and is used instead.

Training uses a custom autograd function with the same forward and a hand-derived backward
that never forms a dense ``N``-wide gradient product (beyond ``N <= dense_max_ratio * k``):
the gradient of ``p`` is the sparse top-k part plus a multiple of ``p`` itself (from the
norm), so ``dL/dx = sum_j dp_j a_{idx_j} + c * A^T p``. ``A^T p`` is ``(c p) @ A`` with the
saved ``p`` when ``n_frozen <= d_in``, and ``x @ (A_f^T A_f) + p_cur @ A_cur`` otherwise,
with the frozen keys' Gram matrix (``d_in x d_in``, rebuilt from scratch at most once per
task, when first needed), which also spares saving the ``(tokens, N)`` projections.
Gradients reach only the current atoms (and ``x``, ``y0``).

Precision. The memory computes in the dtype of its stores (float32 unless the module is
cast), with autocast disabled: with ``tau = 0.01`` the routing logits ``z / tau`` would
lose about one unit to bfloat16 rounding. Inputs are cast to the store dtype and the
adapted output is returned in ``y0``'s dtype.

State dict. ``keys``/``values`` (current atoms, present only while there are some),
``frozen_keys`` ``(n_frozen, d_in)`` and ``frozen_values`` ``(d_out, n_frozen)`` (the
layout of the method's ``B``), exactly the atoms and no spare capacity, plain tensors
(loadable with ``torch.load(weights_only=True)``). To restore, rebuild the architecture by
repeating the same ``grow``/``freeze`` calls, then ``load_state_dict(..., strict=True)``.

Routing statistics. With ``record_routing = True`` every call adds, per atom, the routing
weight mass (sum over tokens of ``w_i``, after the gate) to ``routing_mass`` and counts the
tokens in ``routing_tokens`` and the tokens for which no atom passed the gate in
``routing_fallback``. These are non-persistent buffers (not in the state dict, zeroed by
``reset_routing()``); ``atom_task_ids`` attributes every atom to the ``grow`` call that
added it and ``routing_mass_by_task()`` sums the mass per grow call. Under DDP each rank
counts its own tokens: sum the buffers across ranks before reporting.

DDP note: the stores are (non-persistent) buffers, identical on every rank by construction;
``DistributedDataParallel(broadcast_buffers=True)`` (its default) would re-broadcast them at
every training step, so use ``broadcast_buffers=False`` with this layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .adapters.routing_stats import add_routing_stats, reset_routing_stats

__all__ = ["RankOneMemory", "gather_dot"]


# ----------------------------------------------------------------------------- helpers


def gather_dot(g: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[t, j] = g[t] · table[idx[t, j]]`` for ``g (T, d)``, ``table (M, d)``, ``idx (T, k)``.

    This is the gradient of ``F.embedding_bag(idx, table, per_sample_weights=c)`` with respect
    to ``c``; on CPU and CUDA the native kernel for exactly that is used (no ``(T, k, d)``
    tensor is formed). Other backends fall back to a gather in chunks of tokens.
    """
    t, k = idx.shape
    if g.device.type in ("cpu", "cuda") and hasattr(torch.ops.aten,
                                                     "_embedding_bag_per_sample_weights_backward"):
        flat = idx.reshape(-1)
        offsets = torch.arange(0, t * k, k, device=idx.device)
        bag_of_sample = torch.arange(t, device=idx.device).repeat_interleave(k)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g.contiguous(), table, flat, offsets, bag_of_sample, 0, -1)  # mode 0 = "sum"
        return out.view(t, k)
    return _gather_dot_chunked(g, table, idx)


def _gather_dot_chunked(g: torch.Tensor, table: torch.Tensor, idx: torch.Tensor,
                        chunk: int = 256) -> torch.Tensor:
    """Portable ``gather_dot``: gathers ``chunk`` tokens' rows at a time and uses ``bmm``."""
    t, k = idx.shape
    out = torch.empty(t, k, dtype=g.dtype, device=g.device)
    for s in range(0, t, chunk):
        rows = table.index_select(0, idx[s:s + chunk].reshape(-1)).view(-1, k, table.shape[1])
        out[s:s + chunk] = torch.bmm(rows, g[s:s + chunk, :, None]).squeeze(-1)
    return out


def _bag(idx: torch.Tensor, coef: torch.Tensor, table: torch.Tensor, dense: bool,
         acc: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = acc[t] + sum_j coef[t, j] * table[idx[t, j]]`` (``acc`` optional; ``idx``
    has distinct entries per row). Returns a new tensor.

    Sparse: ``F.embedding_bag`` (no ``(T, k, d)`` tensor). Dense: scatter the coefficients
    into a ``(T, M)`` matrix and use one matmul (``addmm`` when accumulating), faster when
    ``M`` is only a few times ``k``.
    """
    if dense:
        full = coef.new_zeros(idx.shape[0], table.shape[0]).scatter_(1, idx, coef)
        return torch.mm(full, table) if acc is None else torch.addmm(acc, full, table)
    out = F.embedding_bag(idx, table, per_sample_weights=coef, mode="sum")
    return out if acc is None else out.add_(acc)


def _dot(g: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, dense: bool) -> torch.Tensor:
    """``out[t, j] = g[t] · table[idx[t, j]]``: dense (one matmul, then gather) or ``gather_dot``."""
    if dense:
        return torch.mm(g, table.t()).gather(1, idx)
    return gather_dot(g, table, idx)


def _route(p: torch.Tensor, k: int, tau: float, gate_delta: float | None, eps: float):
    """Top-k self-activation routing on raw key projections ``p (T, N)``.

    Returns ``idx`` (selected atoms, ``(T, k)``), ``pv`` (their raw projections), ``n``
    (the clamped norm, ``(T,)``), ``norm`` (unclamped norm), ``zs`` (their normalised
    scores), ``u`` (softmax of ``zs / tau``), ``gate`` (bool ``(T, k)`` or ``None``) and
    ``w`` (``u`` after the gate).
    """
    norm = torch.linalg.vector_norm(p, dim=1)
    n = norm.clamp_min(eps)
    if k == p.shape[1]:
        # every atom is selected (a memory of one or two tasks): no top-k needed
        pv, idx = p, torch.arange(k, device=p.device).expand(p.shape[0], k)
    else:
        # top-k of z = p / n equals top-k of p: n is a positive scalar per token.
        pv, idx = p.topk(k, dim=1, sorted=False)
    zs = pv / n[:, None]
    u = torch.softmax(zs / tau, dim=1)
    gate = None
    w = u
    if gate_delta is not None:
        gate = zs >= gate_delta
        w = u * gate
    return idx, pv, n, norm, zs, u, gate, w


class _MemoryRead(torch.autograd.Function):
    """Differentiable memory read ``y = y0 + sum_j w_j p_j V[idx_j]`` (see module docstring).

    Inputs: ``x (T, d_in)`` (already dropped-out) and ``y0 (T, d_out)``, both in the store
    dtype, the current atoms' ``keys`` ``(r, d_in)`` and ``values`` ``(d_out, r)``
    parameters (or ``None``), ``mem``, the owning ``RankOneMemory`` (read-only here: stores,
    sizes, hyper-parameters; the current atoms must already be mirrored into the store
    tails) and the gate threshold (``None``: no gate). Returns ``y (T, d_out)``.
    """

    @staticmethod
    def forward(ctx, x, y0, keys, values, mem: "RankOneMemory", gate_delta):
        n_atoms, n_frozen = mem.n_atoms, mem.n_frozen
        key_store = mem._key_store[:n_atoms]
        val_store = mem._val_store[:n_atoms]
        k = mem._k()
        dense = mem._dense(k)
        p = torch.mm(x, key_store.t())
        idx, pv, n, norm, zs, u, gate, w = _route(p, k, mem.tau, gate_delta, mem.eps)
        coef = w * pv
        y = _bag(idx, coef, val_store, dense, acc=y0)
        mem._record(idx, w, gate)

        # The input gradient needs A^T p: from the saved p while n_frozen <= d_in, from the
        # frozen keys' Gram matrix (d_in x d_in, cheaper) beyond; the current atoms'
        # gradients need only p's current columns.
        need_x = ctx.needs_input_grad[0]
        use_gram = need_x and n_frozen > mem.d_in
        keep_all = need_x and not use_gram
        p_keep = p if keep_all else p[:, n_frozen:].contiguous()
        ctx.save_for_backward(x, keys, values, idx, pv, n, norm, zs, u, w, coef, p_keep,
                              gate if gate is not None else torch.empty(0, dtype=torch.bool))
        # Stores are not inputs: kept on ctx (their tails are rewritten with the same
        # values by later calls, which must not trip the saved-tensor version check).
        ctx.key_store, ctx.val_store = key_store, val_store
        ctx.gram = mem._frozen_gram() if use_gram else None
        ctx.keep_all, ctx.dense, ctx.n_frozen = keep_all, dense, n_frozen
        ctx.tau, ctx.scale, ctx.eps, ctx.has_gate = mem.tau, mem.scale, mem.eps, gate is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        # The backward may run inside an autocast region (backward() called under it).
        with torch.autocast(device_type=g.device.type, enabled=False):
            return _MemoryRead._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        x, keys, values, idx, pv, n, norm, zs, u, w, coef, p_keep, gate = ctx.saved_tensors
        key_store, val_store, n_frozen = ctx.key_store, ctx.val_store, ctx.n_frozen
        dense, tau = ctx.dense, ctx.tau
        need_x, need_y0, need_keys, need_values = ctx.needs_input_grad[:4]
        g = g.contiguous()
        grad_x = grad_keys = grad_values = None

        # y = y0 + sum_j coef_j V[idx_j],  coef = w * pv
        dcoef = _dot(g, val_store, idx, dense)
        dpv = dcoef * w
        du = dcoef * pv
        if ctx.has_gate:
            du = du * gate
        # w = u * gate,  u = softmax(zs / tau)
        dzs = u * (du - (u * du).sum(1, keepdim=True)) / tau
        # zs = pv / n:  d pv += dzs / n,  d n = -sum(dzs * pv) / n^2 = -sum(dzs * zs) / n
        dpv = dpv + dzs / n[:, None]
        dn = -(dzs * zs).sum(1) / n
        # n = max(||p||, eps):  d p += (dn / n) * p where the norm is not clamped.
        c = torch.where(norm >= ctx.eps, dn / n, torch.zeros_like(dn))
        # In all:  dL/dp = scatter(idx, dpv) + c * p   (sparse + a multiple of p).

        p_cur = p_keep[:, n_frozen:] if ctx.keep_all else p_keep
        if need_x:
            # dL/dx = A^T dL/dp = sum_j dpv_j a_{idx_j} + c * A^T p
            if ctx.gram is not None:
                grad_x = _bag(idx, dpv, key_store, dense)
                a_t_p = torch.mm(x, ctx.gram)          # A_f^T A_f x
                if p_cur.shape[1]:
                    a_t_p.addmm_(p_cur, key_store[n_frozen:])
                grad_x.addcmul_(a_t_p, c[:, None])
            elif dense:
                dp = (p_keep * c[:, None]).scatter_add_(1, idx, dpv)
                grad_x = torch.mm(dp, key_store)
            else:
                grad_x = _bag(idx, dpv, key_store, dense)
                grad_x.addmm_(p_keep * c[:, None], key_store)
        if need_keys or need_values:
            is_cur = idx >= n_frozen
            idx_cur = (idx - n_frozen).clamp_min(0)
        if need_keys:
            dp_cur = p_cur * c[:, None]
            dp_cur.scatter_add_(1, idx_cur, torch.where(is_cur, dpv, torch.zeros_like(dpv)))
            grad_keys = torch.mm(dp_cur.t(), x)
        if need_values:
            # value rows in the store are scale * values^T
            m_cur = torch.zeros_like(p_cur)
            m_cur.scatter_add_(1, idx_cur, torch.where(is_cur, coef, torch.zeros_like(coef)))
            grad_values = torch.mm(g.t(), m_cur).mul_(ctx.scale)
        return grad_x, (g if need_y0 else None), grad_keys, grad_values, None, None


# ------------------------------------------------------------------------------ module


class RankOneMemory(nn.Module):
    """MoRAM's rank-1 associative memory for one frozen ``nn.Linear(d_in, d_out)``.

    Called as ``adapter(x, y0)`` (``moram_bench.adapters.inject``) with ``x (..., d_in)`` the
    frozen layer's input and ``y0 (..., d_out)`` its output; returns the adapted output.

    Args:
        d_in, d_out: the adapted layer's input and output sizes.
        topk: atoms selected per token (``k = min(max(topk, 2), N)``).
        tau: softmax temperature over the selected normalised scores.
        delta: evaluation gate on ``z`` (``<= 0`` disables it).
        dropout: dropout on ``x`` before the key projection (training only).
        scale: LoRA scale ``s`` of the current atoms (frozen atoms use 1).
        fold_scale: fold ``scale`` into the values when freezing (default, effect preserved);
            ``False`` reproduces the official LLM code's unscaled storage.
        eps: floor of the norm in the normalisation.
        r: atoms appended by ``grow()`` without an argument (one task's unit).
    """

    #: Value products are dense (one matmul over all N atoms) when N <= this times k, and
    #: gather only the k selected rows otherwise (see ``_bag``). Tuned on CPU; a speed knob,
    #: results are the same either way.
    dense_max_ratio: float = 3.0

    def __init__(self, d_in: int, d_out: int, topk: int = 16, tau: float = 0.01,
                 delta: float = 0.2, dropout: float = 0.0, scale: float = 1.0,
                 fold_scale: bool = True, eps: float = 1e-12, r: int | None = None):
        super().__init__()
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        if d_out < 1:
            raise ValueError(f"d_out must be >= 1, got {d_out}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.topk, self.tau, self.delta = int(topk), float(tau), float(delta)
        self.scale, self.fold_scale, self.eps = float(scale), bool(fold_scale), float(eps)
        self.r = None if r is None else int(r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self._n_frozen = 0
        self._grow_sizes: list[int] = []   # atoms added by each grow call, in order
        self.keys: nn.Parameter | None = None     # current atoms' keys (r, d_in)
        self.values: nn.Parameter | None = None   # current atoms' values (d_out, r)
        # Rows [0, n_frozen) frozen atoms, [n_frozen, N) mirror of the current atoms,
        # [N, capacity) spare. Value rows hold s_i * b_i.
        self.register_buffer("_key_store", torch.empty(0, d_in), persistent=False)
        self.register_buffer("_val_store", torch.empty(0, d_out), persistent=False)
        # A_f^T A_f of the frozen keys: built on first use by a training backward with
        # n_frozen > d_in (see _frozen_gram), None until then.
        self.register_buffer("_gram", None, persistent=False)
        self._gram_stale = True
        add_routing_stats(self)

    # ---------------------------------------------------------------- sizes / bookkeeping

    @property
    def n_frozen(self) -> int:
        return self._n_frozen

    @property
    def n_current(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    @property
    def n_atoms(self) -> int:
        return self._n_frozen + self.n_current

    @property
    def capacity(self) -> int:
        """Rows allocated in the stores (>= ``n_atoms``)."""
        return self._key_store.shape[0]

    @property
    def n_grows(self) -> int:
        """Number of ``grow`` calls so far (= tasks, with one grow per task)."""
        return len(self._grow_sizes)

    @property
    def atom_task_ids(self) -> torch.Tensor:
        """``(n_atoms,)`` int64 (CPU): index of the ``grow`` call that added each atom."""
        sizes = torch.tensor(self._grow_sizes, dtype=torch.int64)
        return torch.repeat_interleave(torch.arange(len(sizes)), sizes)

    def _k(self) -> int:
        return min(max(self.topk, 2), self.n_atoms)

    def _dense(self, k: int) -> bool:
        """Use dense (matmul) value products: when ``N <= dense_max_ratio * k`` a BLAS
        product over all ``N`` atoms is cheaper than gathering ``k`` rows per token."""
        return self.n_atoms <= self.dense_max_ratio * k

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, n_frozen={self.n_frozen}, "
                f"n_current={self.n_current}, topk={self.topk}, tau={self.tau}, "
                f"delta={self.delta}, scale={self.scale}, fold_scale={self.fold_scale}")

    # ------------------------------------------------------------------ growth / freezing

    def _reserve(self, rows: int) -> None:
        """Make the stores hold at least ``rows`` rows (capacity doubling, copies atoms once)."""
        cap = self.capacity
        if rows <= cap:
            return
        new_cap = max(rows, 2 * cap)
        ks, vs = self._key_store, self._val_store
        new_k = ks.new_zeros(new_cap, self.d_in)
        new_v = vs.new_zeros(new_cap, self.d_out)
        n = self.n_atoms
        new_k[:n] = ks[:n]
        new_v[:n] = vs[:n]
        self._key_store, self._val_store = new_k, new_v

    @torch.no_grad()
    def _sync_current(self) -> None:
        """Mirror the current atoms into the store tails (``r`` rows; cheap, every call)."""
        if self.keys is None:
            return
        lo, hi = self._n_frozen, self.n_atoms
        self._key_store[lo:hi].copy_(self.keys)
        torch.mul(self.values.t(), self.scale, out=self._val_store[lo:hi])

    @torch.no_grad()
    def freeze(self) -> None:
        """Freeze the current atoms (if any): they stay in the memory, never train again.

        Values are stored times ``scale`` if ``fold_scale`` (layer unchanged), else unscaled.
        """
        if self.keys is None:
            return
        lo, hi = self._n_frozen, self.n_atoms
        self._key_store[lo:hi].copy_(self.keys)
        self._val_store[lo:hi].copy_(self.values.t())
        if self.fold_scale:
            self._val_store[lo:hi].mul_(self.scale)
        self.keys = None
        self.values = None
        self._n_frozen = hi
        self._gram_stale = True

    @torch.no_grad()
    def grow(self, r: int | None = None) -> None:
        """Freeze the current atoms and append ``r`` (default: the layer's ``r``) new
        trainable atoms.

        Keys: ``kaiming_uniform_(a=sqrt(5))`` on an ``(r, d_in)`` tensor; values: zeros
        ``(d_out, r)``. The new parameters live on the stores' device and dtype.
        """
        if r is None:
            r = self.r
        if r is None or int(r) != r or r < 1:
            raise ValueError(f"r must be an integer >= 1, got {r}")
        r = int(r)
        self.freeze()
        self._reserve(self._n_frozen + r)
        ref = self._key_store
        keys = torch.empty(r, self.d_in, device=ref.device, dtype=ref.dtype)
        nn.init.kaiming_uniform_(keys, a=math.sqrt(5))
        self.keys = nn.Parameter(keys)
        self.values = nn.Parameter(torch.zeros(self.d_out, r, device=ref.device,
                                               dtype=ref.dtype))
        self._grow_sizes.append(r)
        self.routing_mass = torch.cat([self.routing_mass,
                                       self.routing_mass.new_zeros(r)])
        self._sync_current()

    @torch.no_grad()
    def _frozen_gram(self) -> torch.Tensor:
        """``A_f^T A_f`` of the frozen keys (``d_in x d_in``), for the training backward when
        ``n_frozen > d_in``. Computed on first use after the frozen atoms change (at most once
        per task), always from scratch, so it does not depend on the growth history."""
        if self._gram is None or self._gram_stale:
            kf = self._key_store[:self._n_frozen]
            self._gram = kf.t() @ kf
            self._gram_stale = False
        return self._gram

    # ---------------------------------------------------------------------- routing stats

    def reset_routing(self) -> None:
        """Zero the routing statistics (``routing_mass``, ``routing_tokens``, ``routing_fallback``)."""
        reset_routing_stats(self)

    def routing_mass_by_task(self) -> torch.Tensor:
        """``(n_grows,)`` routing weight mass summed over the atoms of each grow call."""
        ids = self.atom_task_ids.to(self.routing_mass.device)
        out = self.routing_mass.new_zeros(self.n_grows)
        return out.index_add_(0, ids, self.routing_mass)

    @torch.no_grad()
    def _record(self, idx: torch.Tensor, w: torch.Tensor, gate: torch.Tensor | None) -> None:
        if not self.record_routing:
            return
        self.routing_mass.index_add_(0, idx.reshape(-1), w.reshape(-1).to(self.routing_mass.dtype))
        self.routing_tokens += idx.shape[0]
        if gate is not None:
            self.routing_fallback += (~gate.any(dim=1)).sum()

    # --------------------------------------------------------------------------- forward

    def _gate_delta(self) -> float | None:
        return self.delta if (not self.training and self.delta > 0) else None

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self.dropout(x).reshape(-1, self.d_in)
        return x2.to(self._key_store.dtype)

    def _frozen_output(self, y0: torch.Tensor) -> torch.Tensor:
        return y0.reshape(-1, self.d_out).to(self._key_store.dtype)

    @staticmethod
    def _output(y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        """The 2-D result ``y`` in ``y0``'s shape and dtype."""
        return y.to(y0.dtype).view(y0.shape)

    def forward(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        """Adapted output ``y0 + sum_i w_i p_i s_i b_i`` (see module docstring)."""
        if self.n_atoms == 0 or x.numel() == 0:
            return y0
        self._sync_current()
        gate_delta = self._gate_delta()
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2, y02 = self._inputs(x), self._frozen_output(y0)
            needs_grad = torch.is_grad_enabled() and (
                x2.requires_grad or y02.requires_grad or (
                    self.keys is not None and
                    (self.keys.requires_grad or self.values.requires_grad)))
            if needs_grad:
                y = _MemoryRead.apply(x2, y02, self.keys, self.values, self, gate_delta)
            else:
                y = self._read_no_grad(x2, y02, gate_delta)
        return self._output(y, y0)

    @torch.no_grad()
    def _read_no_grad(self, x2: torch.Tensor, y02: torch.Tensor,
                      gate_delta: float | None) -> torch.Tensor:
        """Memory read without autograd bookkeeping (evaluation, ``no_grad``)."""
        n = self.n_atoms
        p = torch.mm(x2, self._key_store[:n].t())
        k = self._k()
        idx, pv, _, _, _, _, gate, w = _route(p, k, self.tau, gate_delta, self.eps)
        self._record(idx, w, gate)
        coef = pv.mul_(w)
        return _bag(idx, coef, self._val_store[:n], self._dense(k), acc=y02)

    def reference_forward(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        """The straightforward formula, for tests and benchmarks: concatenates the whole
        memory, dense ``N``-wide routing weights and value product, plain autograd.

        Same dtype policy as ``forward``; does not record routing statistics.
        """
        if self.n_atoms == 0:
            return y0
        nf = self._n_frozen
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = self._inputs(x)
            keys = [self._key_store[:nf]]
            vals = [self._val_store[:nf].t()]
            if self.keys is not None:
                keys.append(self.keys)
                vals.append(self.values * self.scale)
            a = torch.cat(keys, 0)                     # (N, d_in)
            b = torch.cat(vals, 1)                     # (d_out, N)
            p = x2 @ a.t()
            z = p / torch.linalg.vector_norm(p, dim=-1, keepdim=True).clamp_min(self.eps)
            zv, idx = z.topk(self._k(), dim=-1)
            w = torch.zeros_like(z).scatter(-1, idx, torch.softmax(zv / self.tau, dim=-1))
            gate_delta = self._gate_delta()
            if gate_delta is not None:
                w = w * (z >= gate_delta)
            y = self._frozen_output(y0) + (w * p) @ b.t()
        return self._output(y, y0)

    # ------------------------------------------------------------------------ state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        nf = self._n_frozen
        fk = self._key_store[:nf]
        fv = self._val_store[:nf].t()
        if not keep_vars:
            fk, fv = fk.detach(), fv.detach()
        # Compact copies: a view would make torch.save write the spare capacity too.
        destination[prefix + "frozen_keys"] = fk.clone(memory_format=torch.contiguous_format)
        destination[prefix + "frozen_values"] = fv.clone(memory_format=torch.contiguous_format)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        nf = self._n_frozen
        expected = {"frozen_keys": (nf, self.d_in), "frozen_values": (self.d_out, nf)}
        loaded = {}
        for name, shape in expected.items():
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            t = state_dict[key]
            if tuple(t.shape) != shape:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(t.shape)}, "
                    f"the memory expects {shape} (repeat the same grow/freeze calls first)")
                continue
            loaded[name] = t
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        for name in expected:
            if prefix + name in unexpected_keys:
                unexpected_keys.remove(prefix + name)
        with torch.no_grad():
            if "frozen_keys" in loaded:
                self._key_store[:nf].copy_(loaded["frozen_keys"])
            if "frozen_values" in loaded:
                self._val_store[:nf].copy_(loaded["frozen_values"].t())
            self._gram_stale = True
            self._sync_current()
