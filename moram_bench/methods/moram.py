"""MoRAM: Mixture of Rank-1 Associative Memory (arXiv 2506.21035, ICML 2026).

Every adapted Linear gets a ``RankOneMemory`` (moram_bench/memory.py): a growing set of
rank-1 key/value atoms that score their own relevance to each token (no router). Each
task appends ``r`` atoms; earlier atoms are frozen and keep being retrieved. Everything
that is not an atom stays frozen, logit_scale included.

Placement: the backbone's declared adapter targets (CLIP: q/k/v/out_proj and both MLP
linears of every block of both towers; for the CNN+MiniLM ``mini-clip``, the 36 MiniLM
linears and both projections; LLM: q/k/v/o_proj) unless ``method.targets`` overrides them.

Quirks of the official code, as switches (defaults in conf/method/moram.yaml):
- ``fold_scale`` (default true): fold the training scale s into the values when freezing,
  so frozen atoms keep their effect; false reproduces the official LLM halving (s=2 during
  training, stored unscaled). Irrelevant for CLIP (s=1).
- ``keep_null_atoms`` (default false): the official TRACE code appends the NEXT task's r
  atoms (kaiming keys, zero values) before it saves and evaluates the model, so every row
  of its accuracy matrix is evaluated with r "null atoms" in the memory (they take top-k
  slots and dilute the normalisation, but add nothing). True reproduces that: after every
  task r fresh atoms are appended, and they are the atoms the next task trains (after the
  last task they stay, frozen). Fidelity, point by point: docs/FIDELITY.md (MoRAM).
"""
from __future__ import annotations

from ..memory import RankOneMemory
from ..method import ContinualModule
from ..registry import register_method


@register_method("moram")
class MoRAM(ContinualModule):
    """MoRAM: a memory of rank-1 key/value atoms per layer, self-activated, r atoms added per task."""

    modalities = ("image", "text")
    ranges = {"r": ">= 1", "topk": ">= 1", "tau": "> 0", "delta": ">= 0", "dropout": "in [0, 1)"}

    def setup_adapters(self) -> None:
        h = self.hp

        def factory(name, linear):
            return RankOneMemory(linear.in_features, linear.out_features, topk=int(h.topk), tau=float(h.tau),
                                 delta=float(h.delta), dropout=float(h.dropout), scale=float(h.scale),
                                 fold_scale=bool(h.fold_scale), r=int(h.r))

        self.inject(factory, patterns=h.get("targets"))

    def begin_task(self, task: int, data, restoring: bool) -> None:
        for mem in self.adapters().values():
            if self.hp.keep_null_atoms and mem.n_current:
                continue  # the null atoms appended after the previous task are this task's atoms
            mem.grow()  # freezes the previous task's atoms, appends r new ones

    def end_task(self, task: int, data, restoring: bool) -> None:
        last = task == len(self.stream) - 1
        for mem in self.adapters().values():
            mem.freeze()
            if self.hp.keep_null_atoms:
                mem.grow()  # official TRACE: r fresh atoms (zero values) present at every evaluation
                if last:
                    mem.freeze()  # no task trains them any more

    def extra_metrics(self) -> dict:
        mems = list(self.adapters().values())
        return {"adapted_layers": len(mems), "atoms_per_layer": mems[0].n_atoms if mems else 0,
                "r": int(self.hp.r), "topk": int(self.hp.topk), "tau": float(self.hp.tau),
                "delta": float(self.hp.delta), "fold_scale": bool(self.hp.fold_scale),
                "keep_null_atoms": bool(self.hp.keep_null_atoms)}
