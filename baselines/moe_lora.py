"""moe-lora: one rank-r LoRA expert per task per adapted layer, mixed by a top-k router.

The coarse-expert baseline MoRAM argues against (docs/METHODS.md, MoE-LoRA).
Every adapted Linear (the same placement as MoRAM: the backbone's declared adapter
targets, unless ``method.targets`` overrides them) gets a ``MoELoRA`` layer
(moram_bench/adapters/moe.py). Task t adds expert t and router row t; earlier experts are
frozen. At test time the router mixes the top-k experts of all tasks: no task id.

The router's design decides more than the experts' rank. Router rows start at ZERO (as
MoE-Adapters initialises its routers) and a row is frozen after its task by default. So:
during task 1 there is a single expert, the top-k softmax over one score is 1 whatever the
score, and its router row never receives a gradient (it stays zero); when task 2 adds a
second expert with a zero row, every input scores (0, 0) and the old expert gets half the
weight before any training; its row being frozen at zero for ever, expert 1's share is
decided by the later rows alone (inputs on which they score below 0 route MORE to it).
Each later row learns only while its own task trains and never sees the data of later
tasks. These choices, not the rank-1 versus rank-r question, can decide the order of
``moram`` and ``moe-lora`` on a stream. ``train_old_router`` and ``per_sample`` change this;
their measured effect is in docs/FIDELITY.md (MoE-LoRA).

Switches (defaults in conf/method/moe-lora.yaml, which way each default goes):
- ``train_old_router`` (default false): router rows of earlier experts are frozen; true
  lets them keep training in later tasks.
- ``per_sample`` (default false): route per token; true routes each sample once with its
  first token ([CLS] / start token), as MoE-Adapters4CL does.
- ``balance_loss`` (default false): add the importance + load balancing loss with
  ``balance_coef`` (1e-2). Off by default because MoE-Adapters4CL computes it but never
  adds it to the loss.

Relation to MoE-Adapters4CL (Yu et al., CVPR 2024): that method uses a FIXED pool of 22
bottleneck adapters parallel to each block's MLP, one router per task, freezes the top-2
most-used experts after each task and picks the router at test time with per-task
autoencoders (DDAS). moe-lora keeps its core (top-k routed adapters, old experts frozen,
optional balancing loss, per-sample routing as a switch) but adds one LoRA expert per task
at MoRAM's placement with a single growing router and no task-identification step, so it
differs from MoRAM only in the granularity of its units and in having a separate router.
See docs/BASELINES.md.
"""
from __future__ import annotations

from moram_bench.adapters.moe import MoELoRA
from moram_bench.config import ConfigError
from moram_bench.method import ContinualModule
from moram_bench.registry import register_method


@register_method("moe-lora")
class MoELoRAMethod(ContinualModule):
    """MoE-LoRA: a rank-r LoRA expert added per task per layer, top-k softmax router, old experts frozen."""

    modalities = ("image", "text")
    ranges = {"r": ">= 1", "top_k": ">= 1", "dropout": "in [0, 1)", "balance_coef": ">= 0"}

    def setup_adapters(self) -> None:
        h = self.hp
        if h.per_sample and self.stream.modality == "text":
            raise ConfigError("moe-lora: per_sample routing needs an encoder's [CLS]/first token; on a causal LM the "
                              "first token is the same for every sample (and a pad under left padding): use per_sample=false")
        scale = float(h.alpha) / int(h.r) if h.get("alpha") else 1.0
        coef = float(h.balance_coef) if h.balance_loss else 0.0

        def factory(name, linear):
            return MoELoRA(linear.in_features, linear.out_features, int(h.r), top_k=int(h.top_k), scale=scale,
                           dropout=float(h.dropout), per_sample=bool(h.per_sample),
                           train_old_router=bool(h.train_old_router), balance_coef=coef)

        self.inject(factory, patterns=h.get("targets"))

    def begin_task(self, task: int, data, restoring: bool) -> None:
        for layer in self.adapters().values():
            layer.grow()  # freezes earlier experts (and router rows unless train_old_router)

    def end_task(self, task: int, data, restoring: bool) -> None:
        for layer in self.adapters().values():
            layer.freeze()

    def extra_loss(self, batch, outputs):
        return outputs["aux_loss"]  # the layers' load-balancing terms of this step (None when off)

    def extra_metrics(self) -> dict:
        layers = list(self.adapters().values())
        h = self.hp
        return {"adapted_layers": len(layers), "experts_per_layer": layers[0].n_experts if layers else 0,
                "r": int(h.r), "top_k": int(h.top_k), "per_sample": bool(h.per_sample),
                "train_old_router": bool(h.train_old_router), "balance_loss": bool(h.balance_loss),
                "balance_coef": float(h.balance_coef)}
