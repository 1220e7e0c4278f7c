"""Prompt pools and prompt prepending (shared mechanics of prompt-based methods, e.g. L2P).

``PromptPool``: ``M`` prompts of ``L_p`` tokens (width ``d``) and ``M`` keys (width of the
query), both initialised U(-1, 1) as in L2P. ``select(query, n)`` scores every key by the
cosine with the query and returns, PER SAMPLE, the ``n`` best keys (a ``Selection``: the
indices, sorted by pool index, and the cosines of the selected keys, differentiable in the
keys). ``select(..., batch_voting=True)`` gives every sample of the batch the ``n`` prompts
selected most often across the batch (the official L2P code's behaviour, which leaks task
identity when a batch holds one task; ties go to the lower pool index).

Order of the prompt tokens: a sample's ``n`` prompts are concatenated in POOL-INDEX order,
not in order of similarity, so a prompted input depends only on the SET selected and
samples selecting the same set can share one forward pass (``unique_selections``). The
official code concatenates in similarity order; the set is what L2P's selection decides.

Prepending:

- ``VisionPromptHook(visual, cls_position=True)``: for an open_clip ``VisionTransformer``.
  A forward pre-hook on ``ln_pre`` (whose input is the token sequence with its position
  embeddings added) inserts the prompt tokens right after [CLS]: ``[CLS, prompts,
  patches]``, so they pass ``ln_pre`` and the blocks like every token. With
  ``cls_position`` each prompt token gets the position embedding of [CLS] added, as in the
  official L2P code (which extends the position table with copies of [CLS]'s entry); the
  patches keep theirs. [CLS] pooling is unaffected by the longer sequence. Inactive unless
  inside ``with hook.prompts(tokens)``, so the same tower still computes un-prompted
  features (the L2P query).
- ``encode_hf_text_with_prompts(text_tower, tokens, prompts)``: for a Hugging Face text
  tower inside open_clip (``HFTextEncoder``: BERT-like encoder, pooler, projection). The
  prompt tokens are inserted after the first token ([CLS]) in input-embedding space, as
  soft words (prompt tuning / CoOp style), and the embedding layer adds position/type
  embeddings and LayerNorm as for any token. With ``cls_position`` (L2P's rule) the prompts
  take [CLS]'s position (0) and the words keep their own positions; without it they take
  positions 1..P and the words shift by P. Every token attends to them; the pooler pools
  over the ORIGINAL tokens only (the prompts act through attention, as prompts act on
  [CLS] in a ViT).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PromptPool", "Selection", "VisionPromptHook", "encode_hf_text_with_prompts",
           "unique_selections", "is_vision_transformer", "is_hf_text_tower"]


@dataclass
class Selection:
    idx: torch.Tensor   # (B, n) long, selected prompts per sample, ascending pool index
    sim: torch.Tensor   # (B, n) cosine(query, key) of the selected keys (grad to the keys)


class PromptPool(nn.Module):
    """``size`` prompts of ``length`` tokens of width ``dim``, with keys of width ``key_dim``."""

    def __init__(self, size: int, length: int, dim: int, key_dim: int):
        super().__init__()
        if size < 1 or length < 1:
            raise ValueError(f"pool size and prompt length must be >= 1 (got {size}, {length})")
        self.size, self.length, self.dim, self.key_dim = int(size), int(length), int(dim), int(key_dim)
        self.prompts = nn.Parameter(torch.empty(size, length, dim).uniform_(-1.0, 1.0))
        self.keys = nn.Parameter(torch.empty(size, key_dim).uniform_(-1.0, 1.0))

    def extra_repr(self) -> str:
        return f"size={self.size}, length={self.length}, dim={self.dim}, key_dim={self.key_dim}"

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """``(B, size)`` cosine similarity between each query and every key."""
        return F.normalize(query.to(self.keys.dtype), dim=-1) @ F.normalize(self.keys, dim=-1).t()

    def select(self, query: torch.Tensor, n: int, batch_voting: bool = False) -> Selection:
        if not 1 <= n <= self.size:
            raise ValueError(f"cannot select {n} of {self.size} prompts")
        sim = self.similarity(query)
        with torch.no_grad():
            idx = sim.topk(n, dim=-1).indices
            if batch_voting:
                counts = torch.bincount(idx.reshape(-1), minlength=self.size)
                # most frequent first; among equal counts the lower index
                order = counts * (self.size + 1) - torch.arange(self.size, device=counts.device)
                idx = order.topk(n).indices.expand(len(query), n)
            idx = idx.sort(dim=-1).values
        return Selection(idx=idx, sim=sim.gather(1, idx))

    def tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B, n * length, dim)``: the selected prompts' tokens, concatenated in ``idx`` order."""
        return self.prompts[idx].flatten(1, 2)


def unique_selections(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of ``idx`` (B, n) and, per sample, the row it maps to."""
    return torch.unique(idx, dim=0, return_inverse=True)


# ---------------------------------------------------------------------------- vision tower
def is_vision_transformer(visual: nn.Module) -> bool:
    """An open_clip ``VisionTransformer`` whose pooled output is the [CLS] token."""
    return (hasattr(visual, "ln_pre") and hasattr(visual, "class_embedding")
            and getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", "tok") == "tok")


class VisionPromptHook:
    """Insert prompt tokens after [CLS] at the transformer input of an open_clip ViT
    (``ln_pre``'s input), with [CLS]'s position embedding if ``cls_position``."""

    def __init__(self, visual: nn.Module, cls_position: bool = True):
        if not is_vision_transformer(visual):
            raise ValueError(f"{type(visual).__name__} is not an open_clip VisionTransformer with [CLS] pooling")
        self.visual = visual
        self.width = int(visual.class_embedding.shape[-1])
        self.cls_position = bool(cls_position)
        self._tokens: torch.Tensor | None = None
        self._handle = visual.ln_pre.register_forward_pre_hook(self._insert)

    def _insert(self, module, args):
        if self._tokens is None:
            return None
        x = args[0]
        p = self._tokens.to(x.dtype)
        if p.shape[0] != x.shape[0]:
            raise ValueError(f"{p.shape[0]} prompt sets for a batch of {x.shape[0]} images")
        if self.cls_position:
            p = p + self.visual.positional_embedding[0].to(x.dtype)
        return (torch.cat([x[:, :1], p, x[:, 1:]], dim=1), *args[1:])

    @contextlib.contextmanager
    def prompts(self, tokens: torch.Tensor):
        """Within the block, every forward of the tower gets ``tokens`` (B, P, width)."""
        self._tokens = tokens
        try:
            yield
        finally:
            self._tokens = None

    def remove(self) -> None:
        self._handle.remove()


# ---------------------------------------------------------------------------- text tower
def is_hf_text_tower(text: nn.Module | None) -> bool:
    """open_clip's ``HFTextEncoder``: a transformers encoder, a pooler and a projection."""
    tr = getattr(text, "transformer", None)
    return (tr is not None and hasattr(tr, "get_input_embeddings") and hasattr(text, "pooler")
            and hasattr(text, "proj") and hasattr(text, "config"))


def encode_hf_text_with_prompts(text: nn.Module, tokens: torch.Tensor, prompts: torch.Tensor,
                                cls_position: bool = False) -> torch.Tensor:
    """Projected text features ``(n, embed)`` of ``tokens`` (n, L) with ``prompts``
    (n, P, hidden) inserted after the first token; with ``cls_position`` the prompts take
    [CLS]'s position and the words keep theirs (see the module docstring)."""
    pad = text.config.pad_token_id
    mask = (tokens != pad).long()
    words = text.transformer.get_input_embeddings()(tokens)
    p = prompts.to(words.dtype)
    embeds = torch.cat([words[:, :1], p, words[:, 1:]], dim=1)
    ones = mask.new_ones(p.shape[:2])
    attn = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
    kw = {}
    if cls_position:
        n, length = tokens.shape
        pos = torch.cat([tokens.new_zeros(1 + p.shape[1]), torch.arange(1, length, device=tokens.device)])
        kw["position_ids"] = pos.unsqueeze(0).expand(n, -1)
    out = text.transformer(inputs_embeds=embeds, attention_mask=attn, **kw)
    pool_mask = torch.cat([mask[:, :1], torch.zeros_like(ones), mask[:, 1:]], dim=1)
    return text.proj(text.pooler(out, pool_mask))
