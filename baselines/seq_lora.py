"""seq-lora: one LoRA per adapted layer, trained through all tasks in turn (the forgetting floor).

The same adapter (same parameters) is shared by every task: nothing is frozen or added
between tasks, so each task overwrites what earlier ones learned. Placement: the backbone's
declared adapter targets (the same Linears MoRAM adapts) unless ``method.targets`` is set.
"""
from __future__ import annotations

from moram_bench.adapters.lora import LoRA
from moram_bench.method import ContinualModule
from moram_bench.registry import register_method


@register_method("seq-lora")
class SeqLoRA(ContinualModule):
    """Sequential LoRA: one shared rank-r LoRA per layer fine-tuned task after task (lower bound)."""

    modalities = ("image", "text")
    ranges = {"r": ">= 1", "dropout": "in [0, 1)"}

    def setup_adapters(self) -> None:
        h = self.hp
        self.inject(lambda name, lin: LoRA(lin.in_features, lin.out_features, int(h.r),
                                           alpha=h.get("alpha"), dropout=float(h.dropout)),
                    patterns=h.get("targets"))

    def extra_metrics(self) -> dict:
        return {"r": int(self.hp.r), "adapted_layers": len(self.adapters())}
