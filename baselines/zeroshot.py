"""zeroshot: the frozen backbone, no training (every row equals row 0 of the matrix)."""
from __future__ import annotations

from moram_bench.method import ContinualModule
from moram_bench.registry import register_method


@register_method("zeroshot")
class ZeroShot(ContinualModule):
    """Zero-shot: the frozen pre-trained backbone, never trained (reference point)."""

    modalities = ("image", "text")
    trains = False
