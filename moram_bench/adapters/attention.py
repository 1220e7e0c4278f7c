"""Unfusing ``nn.MultiheadAttention`` so that q, k, v and the output projection are Linears.

``nn.MultiheadAttention`` keeps the query/key/value projections in one fused parameter
(``in_proj_weight``) and applies them, and even ``out_proj``, through
``F.multi_head_attention_forward`` without calling any submodule. Adapters injected by
module name (``moram_bench.adapters.inject``) can therefore not reach them.
``unfuse_attention(model)`` swaps every ``nn.MultiheadAttention`` for an
``UnfusedMultiheadAttention`` holding four plain ``nn.Linear`` modules (``q_proj``,
``k_proj``, ``v_proj`` split from the fused weights with the same values, and the original
``out_proj``), called as modules, so e.g. ``visual.transformer.resblocks.0.attn.q_proj``
becomes a target like any other Linear.

The replacement accepts the same call signature as ``nn.MultiheadAttention.forward``
(query/key/value, ``key_padding_mask``, ``need_weights``, ``attn_mask`` as bool or additive
float mask, ``average_attn_weights``, ``is_causal``), honours ``batch_first`` and
unbatched inputs, applies attention dropout only in training mode, and returns the same
``(output, weights or None)`` tuple, numerically equal to the fused module up to float
rounding. It computes attention with ``F.scaled_dot_product_attention`` unless the weights
are requested.

Not supported (a ``ValueError`` says so): ``add_bias_kv`` and ``add_zero_attn``, which no
CLIP model uses. Attention blocks that are not ``nn.MultiheadAttention`` (open_clip's own
``Attention`` class used by its "custom" blocks, timm's fused ``qkv`` Linear) are left as
they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UnfusedMultiheadAttention", "unfuse_attention"]


def _split_linear(weight: torch.Tensor, bias: torch.Tensor | None,
                  weight_grad: bool, bias_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight``/``bias`` (same dtype and device) whose
    parameters get the given ``requires_grad`` flags.

    Built with ``skip_init`` so no random initialisation runs (and the global RNG is left
    untouched).
    """
    out_features, in_features = weight.shape
    lin = nn.utils.skip_init(
        nn.Linear, in_features, out_features, bias=bias is not None,
        device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.weight.requires_grad_(weight_grad)
    if bias is not None:
        lin.bias.requires_grad_(bias_grad)
    return lin


def _additive(mask: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A boolean mask (True = may not attend) or a float mask (added to the scores) as an
    additive float mask of ``dtype``."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


class UnfusedMultiheadAttention(nn.Module):
    """Multi-head attention with separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears.

    A drop-in replacement for ``nn.MultiheadAttention`` (same forward signature and return
    value); build it from an existing module with :meth:`from_fused`.
    """

    def __init__(
        self,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        out_proj: nn.Linear,
        num_heads: int,
        dropout: float = 0.0,
        batch_first: bool = False,
    ):
        super().__init__()
        embed_dim = q_proj.out_features
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if k_proj.out_features != embed_dim or v_proj.out_features != embed_dim:
            raise ValueError("q_proj, k_proj and v_proj must all project to embed_dim")
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.embed_dim = embed_dim
        self.kdim = k_proj.in_features
        self.vdim = v_proj.in_features
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first

    @classmethod
    def from_fused(cls, mha: nn.MultiheadAttention) -> "UnfusedMultiheadAttention":
        """Split ``mha``'s projections into Linears holding the same values.

        The new parameters are copies with the original ``requires_grad`` flags; ``out_proj``
        is reused as is.
        """
        if mha.bias_k is not None or mha.bias_v is not None:
            raise ValueError("cannot unfuse nn.MultiheadAttention built with add_bias_kv=True")
        if mha.add_zero_attn:
            raise ValueError("cannot unfuse nn.MultiheadAttention built with add_zero_attn=True")
        e = mha.embed_dim
        b = mha.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
            flags = [w.requires_grad] * 3
        else:  # kdim/vdim differ from embed_dim: three separate weights already
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            flags = [wq.requires_grad, wk.requires_grad, wv.requires_grad]
        bias_grad = b is not None and b.requires_grad
        projs = [
            _split_linear(wi.detach(), None if bi is None else bi.detach(), flag, bias_grad)
            for wi, bi, flag in zip((wq, wk, wv), (bq, bk, bv), flags)
        ]
        mod = cls(*projs, mha.out_proj, num_heads=mha.num_heads, dropout=mha.dropout,
                  batch_first=mha.batch_first)
        mod.train(mha.training)
        return mod

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # accept state dicts of the fused module (in_proj_weight/in_proj_bias or the
        # separate q/k/v_proj_weight of nn.MultiheadAttention) by splitting them here
        e = self.embed_dim
        fused = {"in_proj_weight": "weight", "in_proj_bias": "bias"}
        for key, attr in fused.items():
            t = state_dict.pop(prefix + key, None)
            if t is not None:
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    state_dict[f"{prefix}{name}.{attr}"] = t[i * e:(i + 1) * e]
        for name in ("q_proj", "k_proj", "v_proj"):
            t = state_dict.pop(f"{prefix}{name}_weight", None)
            if t is not None:
                state_dict[f"{prefix}{name}.weight"] = t
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same arguments and return value as ``nn.MultiheadAttention.forward``.

        Shapes: (N, L, E) if ``batch_first`` else (L, N, E), or unbatched (L, E).
        ``attn_mask``: (L, S) or (N * num_heads, L, S); ``key_padding_mask``: (N, S) or (S).
        Boolean masks mark positions that may NOT be attended; float masks are added to the
        attention scores. Returns ``(output, weights)``, weights being None unless
        ``need_weights`` (then averaged over heads unless ``average_attn_weights=False``).
        """
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt_len, _ = query.shape
        src_len = key.shape[1]
        h, d = self.num_heads, self.head_dim

        q = self.q_proj(query).reshape(n, tgt_len, h, d).transpose(1, 2)  # (N, H, L, D)
        k = self.k_proj(key).reshape(n, src_len, h, d).transpose(1, 2)    # (N, H, S, D)
        v = self.v_proj(value).reshape(n, src_len, h, d).transpose(1, 2)

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as in nn.MultiheadAttention)")
        # like nn.MultiheadAttention: the is_causal hint replaces attn_mask only when no
        # padding mask has to be merged in and no weights are returned
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        mask = None if causal else self._merged_mask(attn_mask, key_padding_mask, n, tgt_len, src_len, q.dtype)
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            scores = (q * d ** -0.5) @ k.transpose(-2, -1)  # (N, H, L, S)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 is_causal=causal)

        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt_len, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _merged_mask(self, attn_mask, key_padding_mask, n, tgt_len, src_len, dtype):
        """``attn_mask`` and ``key_padding_mask`` as one additive mask broadcastable to
        (N, H, L, S), or None."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype, "attn_mask")
            if mask.dim() == 2:
                if mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {tuple(mask.shape)}, but should be {(tgt_len, src_len)}.")
                mask = mask.view(1, 1, tgt_len, src_len)
            elif mask.dim() == 3:
                if mask.shape != (n * self.num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {tuple(mask.shape)}, but should be "
                        f"{(n * self.num_heads, tgt_len, src_len)}.")
                mask = mask.view(n, self.num_heads, tgt_len, src_len)
            else:
                raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (n, src_len):
                raise RuntimeError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected {(n, src_len)}")
            kpm = _additive(key_padding_mask, dtype, "key_padding_mask").view(n, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        return mask


def unfuse_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` inside ``model`` by an
    ``UnfusedMultiheadAttention`` with the same weights; returns how many were replaced.

    Call it before injecting adapters and after loading fused checkpoints (the unfused
    module also accepts fused state-dict keys when loading). ``model`` itself must not be
    an ``nn.MultiheadAttention`` (use ``UnfusedMultiheadAttention.from_fused`` for that).
    """
    if isinstance(model, nn.MultiheadAttention):
        raise ValueError("model is itself an nn.MultiheadAttention: use UnfusedMultiheadAttention.from_fused")
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    for name, mha in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, UnfusedMultiheadAttention.from_fused(mha))
    return len(targets)
