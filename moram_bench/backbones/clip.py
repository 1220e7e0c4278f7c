"""The CLIP backbone wrapper every image-text method works with.

``ClipBackbone`` holds an open_clip model plus its tokenizer and image preprocessing and
splits the image tower into a *trunk* and a *head*:

    encode_image(pixels) = image_head(image_trunk(pixels))

When no adapter sits inside the trunk (e.g. a CNN trunk whose pooled features feed an
adapted projection), the trunk's outputs are a pure function of the pixels and the
DataModule may compute them once and cache them (``trunk_cacheable``). For a ViT with
adapters in every block the trunk is empty and the head is the whole visual tower.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..adapters.inject import AdaptedBlock, AdaptedLinear


class ClipBackbone(nn.Module):
    kind = "clip"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        preprocess: Callable,
        trunk: nn.Module | None,
        head: nn.Module,
        name: str,
        info: dict[str, Any] | None = None,
        pad_id: int | None = None,
        train_preprocess: Callable | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess  # evaluation transform
        self.train_preprocess = train_preprocess  # open_clip's training transform (None: none)
        # trunk/head are references into self.model, not separate copies; keep them out
        # of the module tree so state_dict keys stay those of the open_clip model
        object.__setattr__(self, "_trunk", trunk)
        object.__setattr__(self, "_head", head)
        self.name = name
        self.info = dict(info or {})
        self.pad_id = pad_id  # set when padding can be trimmed exactly (masked pooling)

    # ---- image side -----------------------------------------------------------------
    @property
    def trunk_cacheable(self) -> bool:
        if self._trunk is None:
            return False
        return not any(isinstance(m, (AdaptedLinear, AdaptedBlock)) for m in self._trunk.modules())

    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels if self._trunk is None else self._trunk(pixels)

    def image_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self._head(feats)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_trunk(pixels))

    # ---- text side ------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts)
        if self.pad_id is not None:
            # exact under masked pooling: drop columns that are padding in every row
            keep = (tokens != self.pad_id).any(0)
            last = int(keep.nonzero().max()) + 1 if keep.any() else 1
            tokens = tokens[:, :last]
        return tokens

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - convenience
        return self.encode_image(pixels)
