"""The ``tokens`` image side of ``mini-clip``: EfficientNet-Lite0's last stage as tokens.

A ViT's adapted linears read LayerNorm'd tokens, signed and centred. EfficientNet's pooled
features (after ReLU6) are all non-negative, so an adapter reading them sees one dominant
mean direction for every image. Here the image tower is cut where its features are still
signed: after the last inverted-residual block, whose output is a *linear bottleneck*
(BatchNorm without activation). The trunk returns that feature map as tokens; the head
applies EfficientNet's 1 x 1 ``conv_head`` token-wise, as the ``nn.Linear`` it is, so that
adapters attach to it through the one injection path, then the rest of the tower
(frozen BatchNorm + ReLU6, the average pool) and the projection, which reads the pooled
features standardised with fixed statistics of the alignment set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STANDARDISE_FILE = "image_standardise.safetensors"  # mean/std of the pooled features, saved with the weights


# ---------------------------------------------------------------------------------------
# the tokens design of the image side
# ---------------------------------------------------------------------------------------
class TokenTrunk(nn.Module):
    """EfficientNet-Lite0 up to the end of its last stage: pixels (B, 3, H, W) -> tokens
    (B, h * w, 320), the output of the last inverted-residual block's linear bottleneck
    (BatchNorm, no activation: signed, roughly centred per channel). Frozen, cacheable."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(x)))
        return x.flatten(2).transpose(1, 2)


class TokenHead(nn.Module):
    """The rest of the image tower over tokens: ``conv_head`` (EfficientNet's 1x1 conv
    320 -> 1280, here the token-wise ``nn.Linear`` it is), its BatchNorm (frozen: a
    per-channel affine map) and ReLU6, the mean over tokens (EfficientNet's average pool),
    standardisation of the pooled features (fixed mean/std of the alignment set), dropout
    and the projection ``proj``. Without standardisation (mean 0, std 1) it computes what
    the pooled design's head computes on the whole trunk's output."""

    def __init__(self, conv_head: nn.Conv2d, bn: nn.Module, proj: nn.Linear, drop: nn.Module | None = None,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        w = conv_head.weight.detach()
        self.conv_head = nn.Linear(w.shape[1], w.shape[0], bias=conv_head.bias is not None)
        with torch.no_grad():
            self.conv_head.weight.copy_(w[:, :, 0, 0])
            if conv_head.bias is not None:
                self.conv_head.bias.copy_(conv_head.bias)
        self.conv_head.requires_grad_(False)
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        self.register_buffer("bn_scale", scale.clone())
        self.register_buffer("bn_shift", (bn.bias - bn.running_mean * scale).detach().clone())
        n = w.shape[0]
        self.register_buffer("feat_mean", torch.zeros(n) if mean is None else mean.detach().clone().float())
        self.register_buffer("feat_std", torch.ones(n) if std is None else std.detach().clone().float())
        self.drop = drop if drop is not None else nn.Identity()
        self.proj = proj

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, 320) tokens -> (B, 1280) pooled features, before standardisation."""
        h = F.relu6(self.conv_head(tokens) * self.bn_scale + self.bn_shift)
        return h.mean(1)

    def standardise(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.feat_mean) / self.feat_std

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(self.standardise(self.pooled(tokens))))


def token_image_side(visual: nn.Module, mean: torch.Tensor | None = None,
                     std: torch.Tensor | None = None) -> tuple[TokenTrunk, TokenHead]:
    """(trunk, head) of the tokens design over an open_clip ``TimmModel`` image tower whose
    trunk is ``tf_efficientnet_lite0``; the modules are shared with ``visual`` (conv_head
    is copied into a Linear)."""
    net = visual.trunk
    return TokenTrunk(net), TokenHead(net.conv_head, net.bn2, visual.head.proj, getattr(visual.head, "drop", None),
                                      mean, std)


def standardisation(feats: torch.Tensor, floor: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of pooled features; a std below ``floor`` times the median
    std (channels that hardly ever fire) is raised to it, so that no channel is amplified
    by orders of magnitude on inputs unlike the alignment set."""
    mean, std = feats.mean(0), feats.std(0)
    return mean, std.clamp_min(floor * float(std.median()))
