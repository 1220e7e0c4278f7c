"""The CLIP protocol: class-prompt text embeddings, the CLIP loss, task-agnostic scoring.

Training (task t): image->text cross-entropy over the current task's class prompts plus the
text-side cross-entropy (the official MoRAM X-TAIL code sums both; see ``ClipProtocol.loss``
for the exact normalisation and its switch). Evaluation: every test image is scored against
the text embeddings of the stream's whole label space (``union``: all classes of all tasks,
X-TAIL; ``per_task``: the task's own classes, MTIL), computed once per evaluation. Images
arrive as pixels or as cached trunk features (``is_feature``).

Stream settings read here (``stream.<key>``, same for every method on a stream):
``clip_text_loss``: ``classes`` (default, the official normalisation: divided by the number
of classes seen so far) or ``batch`` (divided by the global batch size); the value used is
written to the stream's settings (``clip_text_loss``), which metrics.json records.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TEXT_LOSS_NORMS = ("classes", "batch")


def text_loss_norm(cfg) -> str:
    """The stream's ``clip_text_loss`` setting (default ``classes``, the official one);
    a ``ConfigError`` (one-line ``error:``) for anything else."""
    from ..config import ConfigError

    stream = getattr(cfg, "stream", None) if cfg is not None else None
    value = stream.get("clip_text_loss", "classes") if stream is not None else "classes"
    if value is None:
        value = "classes"
    if value not in TEXT_LOSS_NORMS:
        raise ConfigError(f"stream.clip_text_loss must be one of {', '.join(TEXT_LOSS_NORMS)}, got {value!r}")
    return str(value)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """All-gather rows from every DDP rank, keeping the autograd path to each rank's own
    rows (ranks may hold different numbers of rows). Returns (all rows, this rank's first
    row index, world size); a no-op outside DDP."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0, 1
    import torch.distributed.nn.functional as dist_nn

    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    parts = dist_nn.all_gather(padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)]), sum(sizes[:rank]), world


class ClipProtocol:
    def __init__(self, module):
        # a plain reference (not a submodule): the protocol owns no parameters
        self.m = module
        self._eval_text: torch.Tensor | None = None
        self.text_norm = text_loss_norm(getattr(module, "run_cfg", None))
        # recorded with the run (metrics.json stream_settings), like the training transform
        module.stream.settings["clip_text_loss"] = self.text_norm

    @property
    def backbone(self):
        return self.m.backbone

    @property
    def stream(self):
        return self.m.stream

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["label"])

    # ---- embeddings -----------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.backbone.tokenize(prompts).to(self.m.device)
        return F.normalize(self.backbone.encode_text(tokens), dim=-1)

    def image_query(self, batch: dict) -> torch.Tensor:
        """The frozen, un-adapted trunk output (what cached features hold)."""
        x = batch["x"]
        return x if batch.get("is_feature", False) else self.backbone.image_trunk(x)

    def encode_images(self, batch: dict) -> torch.Tensor:
        return F.normalize(self.backbone.image_head(self.image_query(batch)), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.backbone.logit_scale.exp()

    # ---- training ---------------------------------------------------------------------
    def seen_classes(self, task: int) -> int:
        """C: the number of classes of tasks 0..task (all seen so far, current included),
        whatever the evaluation label space."""
        return sum(t.num_classes for t in self.stream.tasks[:task + 1])

    def loss(self, batch: dict, task: int) -> tuple[torch.Tensor, dict]:
        """Image->text CE averaged over the GLOBAL batch, plus the text-side CE.

        Image side: the official loss builds logits over all seen classes with earlier
        classes masked to -inf: exactly the softmax over the current task's classes used
        here; averaged over the B images of the global batch.

        Text side (official X-TAIL step): the transposed logits ``scale * text @ imgᵀ`` over
        ALL C classes seen so far (earlier classes' prompts, then the current task's) against
        the B images, with the multi-hot target ``mask[c, i] = [label_i == c]`` and
        cross-entropy with probability targets averaged over the C rows. Row c contributes
        ``sum_{i: label_i = c} -log softmax_i(row c)``; rows of earlier classes and of current
        classes absent from the batch carry no target and contribute exactly 0 (value and
        gradient), so only the current task's prompts are encoded, one row per sample:
        row i = the prompt of sample i's class scored against every image, target i. The
        sum of these per-sample terms is divided by C (``stream.clip_text_loss=classes``,
        default) or by B (``batch``: the batch mean this project used before).

        DDP: the image embeddings are gathered with autograd; each rank returns
        ``world * (its share of the global sums) / divisor`` (divisor B for the image side,
        C or B for the text side), so DDP's gradient averaging yields exactly the
        single-process loss gradient.
        """
        t = self.stream.tasks[task]
        img = self.encode_images(batch)
        local = batch["label"] - t.label_offset
        text = self.encode_prompts(t.prompts())  # with grad: the text tower adapts
        scale = self.logit_scale()
        logits = scale * img @ text.t()  # (B_local, C_t)
        all_img, offset, world = gather_with_grad(img)
        ce_img = F.cross_entropy(logits, local, reduction="sum")
        txt_logits = scale * text[local] @ all_img.t()  # (B_local, B_global)
        targets = torch.arange(len(local), device=img.device) + offset
        ce_txt = F.cross_entropy(txt_logits, targets, reduction="sum")
        n_global = all_img.shape[0]
        divisor = self.seen_classes(task) if self.text_norm == "classes" else n_global
        loss = world * (ce_img / n_global + ce_txt / divisor)
        return loss, {"image_emb": img, "text_emb": text, "logits": logits}

    # ---- evaluation (task-agnostic) ---------------------------------------------------
    @torch.no_grad()
    def on_eval_start(self) -> None:
        prompts = self.stream.all_prompts()
        self._eval_text = torch.cat([self.encode_prompts(prompts[i:i + 256]) for i in range(0, len(prompts), 256)])

    def logits(self, batch: dict, task: int) -> torch.Tensor:
        img = self.encode_images(batch)
        return img @ self._eval_text[self.stream.class_slice(task)].t()

    def scores(self, batch: dict, task: int) -> torch.Tensor:
        pred = self.logits(batch, task).argmax(-1)
        return (pred == batch["label"]).to(torch.float64) * 100.0

    def on_eval_end(self) -> None:
        self._eval_text = None
