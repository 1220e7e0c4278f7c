"""LoRA: y = y0 + s * B A dropout(x), A (r x d_in) kaiming_uniform(a=sqrt(5)), B zero."""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {r})")
        self.r = r
        self.scale = (alpha / r) if alpha else 1.0
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale

    def forward(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        return y0 + self.delta(x)
