"""l2p: Learning to Prompt (Wang et al., CVPR 2022) on a frozen CLIP.

A pool of ``pool_size`` prompts (``prompt_length`` tokens each) with learnable keys, both
U(-1, 1) (moram_bench/adapters/prompts.py). For every image, the query is the frozen,
UN-prompted backbone's own pooled image feature; the ``top_n`` keys with the highest cosine
are selected PER SAMPLE and their prompts are prepended; the loss is the CLIP task loss
minus ``pull_lambda`` (0.1, the official CIFAR-100 setting) times the SUM of the selected
keys' cosines averaged over the batch (the pull constraint of the official code, which
trains the keys). Only prompts and keys train; class scores come from the text tower (no
linear head), all classes of the label space at test time: no task id. The image side is
read at [CLS] (CLIP's pooled output), not at the average of the prompt tokens' outputs as
L2P's linear classifier does: CLIP's class scores live in its [CLS] projection. Prompts
apply from the first task on, so row 0 of the accuracy matrix is the plain backbone (an
untrained pool of U(-1, 1) prompts is no zero-shot model). Fidelity, point by point:
docs/FIDELITY.md (L2P).

Placement (``placement: auto``), the most faithful one the backbone allows:

- ``image`` (open_clip ViT image tower, e.g. tiny-clip): as in the paper, the prompts are
  inserted into the vision transformer's input after [CLS], each with [CLS]'s position
  embedding (``prompt_cls_position``); the query is the frozen tower's image feature
  (pooled [CLS], projected).
  Cost: one extra un-prompted image forward per batch (the query), as in L2P.
- ``text`` (the image tower is not a transformer, e.g. mini-clip's EfficientNet): the
  prompts go on the TEXT tower, selected by image-feature keys (query: the pooled CNN trunk
  feature, i.e. the cached features): each image's selected prompts are inserted after
  [CLS] in every class prompt's input embeddings, so each image is scored against its own
  prompted class embeddings (logit[b, c] = img_b . text(prompts(b), class c)). The image
  embedding stays frozen. Naively this is B x C text forwards per batch; images that
  select the same prompt SET share one pass (prompts are concatenated in pool-index order,
  see prompts.py), so the cost is U x C with U the number of distinct sets in the batch
  (U <= B), with C the current task's classes in training and the whole label space at
  test time (in chunks of ``text_chunk`` sequences); during an evaluation (model frozen)
  each distinct set's class embeddings are encoded once and reused by later batches. This grouping is
  exact: nothing is shared across images that selected different prompts. A batch-level
  union of prompts is NOT used (it would leak across samples). This text-side design is
  AttriCLIP's (Wang et al., CVPR 2023), with L2P's pool, selection and pull loss; its
  leaderboard row is named ``l2p (text prompts)`` (``display_name`` in metrics.json).
  With ``prompt_cls_position`` the prompts take [CLS]'s position in the text tower.

Switches (conf/method/l2p.yaml):
- ``batch_voting`` (default false): the official code gives the whole batch the ``top_n``
  prompts chosen most often in the batch, at test time too (``true``); that leaks task
  identity when a test batch holds one task. Recorded in metrics.json (method_settings).
- ``train_batch_voting`` (default true): vote in training (the official training step, which
  votes whenever ``batchwise_prompt`` is on; test images keep their own selection, so no
  task identity leaks at test time): one prompt set per batch, so the text placement
  encodes the task's classes once per step instead of once per distinct set (about 17x
  cheaper per step on xtail-mini, see docs/BASELINES.md); false selects per training sample.
- ``pull_sum_over_selected`` (default true, the official code): the pull term sums the
  ``top_n`` selected cosines per sample and averages over the batch; false takes their
  mean (``top_n`` times weaker; this project's earlier default).
- ``prompt_cls_position`` (default true, the official code): prompts get the position
  embedding of [CLS]; false: none (image placement) / positions after [CLS] (text).

Optimiser: L2P's own (Adam, constant lr 0.03 * batch / 256, grad clip 1.0): its U(-1, 1)
prompts and keys barely move at the shared 5e-4. The default ``lr`` 0.00375 is that rule
for the embedded stream's batch 32; rescale it for other batch sizes. Iterations and batch
are the stream's (5 epochs in the paper).

Text (LLM) streams (placement ``llm``, chosen automatically): the prompts are prepended to
the causal LM's input embeddings through the text protocol's ``text_prefix`` hook, in
training and in generation. The query is the frozen, un-prompted LM's last hidden state
mean-pooled over the prompt's tokens (padding masked; one extra prompt-only forward per
batch, as L2P's extra un-prompted forward). Keys are U(-1, 1) as in L2P; the prompts start
from randomly drawn rows of the LM's own embedding table (prompt tuning's initialisation,
Lester et al. 2021): U(-1, 1) is ~50x the scale of an LLM's token embeddings and would
swamp the input. The pull term, selection and switches are the same as for CLIP. The
optimiser is the method's ``text:`` block (conf/method/l2p.yaml).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moram_bench.adapters.prompts import (PromptPool, Selection, VisionPromptHook, encode_hf_text_with_prompts,
                                          is_hf_text_tower, is_vision_transformer, unique_selections)
from moram_bench.config import ConfigError
from moram_bench.method import ContinualModule
from moram_bench.protocols.clip import ClipProtocol, gather_with_grad
from moram_bench.registry import register_method

PLACEMENTS = ("auto", "image", "text")


class PromptedClipProtocol(ClipProtocol):
    """The CLIP protocol with per-sample prompts selected by the method's pool.

    Training loss and scores are the ``ClipProtocol``'s (image->text plus text-side
    cross-entropy over the task's classes; argmax over the label space), computed with
    prompted embeddings; ``outputs["prompt_sim"]`` carries the selected keys' cosines for
    the pull term.
    """

    def __init__(self, module: "L2P"):
        super().__init__(module)
        self._eval_tokens: torch.Tensor | None = None
        self._eval_text: dict[tuple, torch.Tensor] = {}  # (class slice, prompt set) -> class embeddings

    # ---- image placement: the hook prompts the image tower --------------------------
    def _with_image_prompts(self, sel: Selection, fn):
        with self.m.vision_hook.prompts(self.m.pool.tokens(sel.idx)):
            return fn()

    # ---- text placement: per-selection class embeddings -------------------------------
    def prompted_text(self, sel_idx: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised class embeddings ``(U, C, e)`` for the ``U`` distinct prompt sets in
        ``sel_idx`` and the set of each sample ``(B,)``; ``tokens`` (C, L) are the classes."""
        uniq, inv = unique_selections(sel_idx)
        u, c = len(uniq), len(tokens)
        prompts = self.m.pool.tokens(uniq)                       # (U, P, hidden)
        text = self.backbone.model.text
        chunk = max(1, int(self.m.hp.text_chunk))
        # rows = (class, set) pairs, classes sorted by length, so that each chunk can drop
        # the padding columns all its rows share (exact: padding is masked everywhere)
        lengths = (tokens != text.config.pad_token_id).sum(1)
        cls = lengths.argsort().repeat_interleave(u)
        sets = torch.arange(u, device=tokens.device).repeat(c)
        out = []
        for s in range(0, u * c, chunk):
            cr, sr = cls[s:s + chunk], sets[s:s + chunk]
            width = int(lengths[cr].max())
            out.append(encode_hf_text_with_prompts(text, tokens[cr, :width], prompts[sr],
                                                   cls_position=bool(self.m.hp.prompt_cls_position)))
        emb = torch.cat(out)[(sets * c + cls).argsort()]         # back to (set, class) order
        return F.normalize(emb, dim=-1).view(u, c, -1), inv

    def _text_logits(self, batch: dict, sel: Selection, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine logits (B, C) of each image against its own prompted classes, and the
        frozen image embeddings."""
        img = self.encode_images(batch)                           # frozen image embedding
        text, inv = self.prompted_text(sel.idx, tokens)
        return torch.einsum("be,bce->bc", img, text[inv]), img

    @staticmethod
    def clip_loss_from_logits(logits: torch.Tensor, local: torch.Tensor, text_divisor: int | None = None) -> torch.Tensor:
        """``ClipProtocol.loss``'s objective from per-sample logits (B_local, C_t): image->text
        CE averaged over the GLOBAL batch plus the text->image CE terms summed and divided
        by ``text_divisor`` (``ClipProtocol``'s: the classes seen so far by default; None:
        the global batch), where the text side scores sample i's class against every image
        j of the global batch by image j's OWN logit for that class. Under DDP the logits
        are gathered with autograd and each rank returns ``world * (its share)``, as
        ``ClipProtocol.loss``."""
        all_logits, offset, world = gather_with_grad(logits)
        n_global = all_logits.shape[0]
        ce_img = F.cross_entropy(logits, local, reduction="sum")
        txt_logits = all_logits[:, local].t()                    # (B_local, B_global)
        targets = torch.arange(len(local), device=logits.device) + offset
        ce_txt = F.cross_entropy(txt_logits, targets, reduction="sum")
        return world * (ce_img / n_global + ce_txt / (text_divisor or n_global))

    # ---- protocol ---------------------------------------------------------------------------
    def loss(self, batch: dict, task: int):
        if not self.m.prompting:  # before the first task: the plain frozen CLIP
            loss, out = super().loss(batch, task)
            return loss, {**out, "prompt_sim": None}
        sel = self.m.select(batch)
        if self.m.placement == "image":
            loss, out = self._with_image_prompts(sel, lambda: ClipProtocol.loss(self, batch, task))
        else:
            t = self.stream.tasks[task]
            local = batch["label"] - t.label_offset
            tokens = self.backbone.tokenize(t.prompts()).to(self.m.device)
            cos, img = self._text_logits(batch, sel, tokens)
            logits = self.logit_scale() * cos                     # (B_local, C_t)
            divisor = self.seen_classes(task) if self.text_norm == "classes" else None
            loss = self.clip_loss_from_logits(logits, local, divisor)
            out = {"image_emb": img, "logits": logits}
        out["prompt_sim"] = sel.sim
        return loss, out

    @torch.no_grad()
    def on_eval_start(self) -> None:
        if self.m.placement == "image" or not self.m.prompting:
            super().on_eval_start()  # class embeddings are un-prompted and frozen
        else:
            self._eval_tokens = self.backbone.tokenize(self.stream.all_prompts()).to(self.m.device)
            self._eval_text = {}

    def logits(self, batch: dict, task: int) -> torch.Tensor:
        if not self.m.prompting:
            return super().logits(batch, task)
        sel = self.m.select(batch)
        if self.m.placement == "image":
            return self._with_image_prompts(sel, lambda: ClipProtocol.logits(self, batch, task))
        return self._eval_text_logits(batch, sel, self.stream.class_slice(task))

    @torch.no_grad()
    def _eval_text_logits(self, batch: dict, sel: Selection, classes: slice) -> torch.Tensor:
        """Evaluation logits of the text placement: the model is frozen during an evaluation,
        so each distinct prompt set's class embeddings are encoded once per evaluation and
        reused by every later batch that selects the same set (the same numbers as encoding
        them per batch)."""
        uniq, inv = unique_selections(sel.idx)
        keys = [(classes.start, classes.stop, tuple(row.tolist())) for row in uniq]
        missing = [i for i, k in enumerate(keys) if k not in self._eval_text]
        if missing:
            text, _ = self.prompted_text(uniq[missing], self._eval_tokens[classes])
            for j, i in enumerate(missing):
                self._eval_text[keys[i]] = text[j]
        text = torch.stack([self._eval_text[k] for k in keys])           # (U, C, e)
        img = self.encode_images(batch)
        return torch.einsum("be,bce->bc", img, text[inv])

    def on_eval_end(self) -> None:
        super().on_eval_end()
        self._eval_tokens = None
        self._eval_text = {}


@register_method("l2p")
class L2P(ContinualModule):
    """L2P: a prompt pool with learnable keys; each image picks its top-N prompts by its frozen feature."""

    modalities = ("image", "text")

    ranges = {"pool_size": ">= 1", "prompt_length": ">= 1", "pull_lambda": ">= 0", "text_chunk": ">= 1"}

    @classmethod
    def validate_config(cls, h) -> None:
        super().validate_config(h)
        if not 1 <= int(h.top_n) <= int(h.pool_size):
            raise ConfigError(f"method.top_n must be in 1..pool_size={h.pool_size} (got {h.top_n})")
        if str(h.placement) not in PLACEMENTS:
            raise ConfigError(f"method.placement={h.placement!r} is not one of {', '.join(PLACEMENTS)}")

    # ---- set-up ---------------------------------------------------------------------------
    def _choose_placement(self) -> str:
        model = self.backbone.model
        vit = is_vision_transformer(getattr(model, "visual", None))
        hf_text = is_hf_text_tower(getattr(model, "text", None))
        want = str(self.hp.placement)
        if want == "image" or (want == "auto" and vit):
            if not vit:
                raise ConfigError(f"l2p: placement=image needs an open_clip ViT image tower; backbone "
                                  f"{self.backbone.name!r} has {type(model.visual).__name__} (use placement=text)")
            return "image"
        if not hf_text:
            raise ConfigError(f"l2p: backbone {self.backbone.name!r} has neither a ViT image tower nor a Hugging Face "
                              "text tower to prepend prompts to")
        return "text"

    def setup_adapters(self) -> None:
        h = self.hp
        # Prompts apply from the first task on: row 0 of the matrix is the plain backbone.
        self.prompting = False
        if self.stream.modality == "text":
            self._setup_llm()
            return
        self.placement = self._choose_placement()
        model = self.backbone.model
        if self.placement == "image":
            self.vision_hook = VisionPromptHook(model.visual, cls_position=bool(h.prompt_cls_position))
            dim = self.vision_hook.width
        else:
            self.vision_hook = None
            dim = model.text.transformer.get_input_embeddings().embedding_dim
        key_dim = self._query_dim()
        self.pool = PromptPool(int(h.pool_size), int(h.prompt_length), dim, key_dim)

    def build_protocol(self):
        """Image streams: the CLIP protocol with per-sample prompts; text streams: the
        plain text protocol (the prompts come in through ``text_prefix``)."""
        if self.stream.modality == "image":
            return PromptedClipProtocol(self)
        return super().build_protocol()

    # ---- LLM placement ------------------------------------------------------------------------
    def _setup_llm(self) -> None:
        h = self.hp
        self.placement, self.vision_hook = "llm", None
        model = self.backbone.model
        table = model.get_input_embeddings().weight
        self.pool = PromptPool(int(h.pool_size), int(h.prompt_length), table.shape[1], int(model.config.hidden_size))
        with torch.no_grad():  # prompt tuning's initialisation: real token embeddings
            rows = torch.randint(0, table.shape[0], (int(h.pool_size) * int(h.prompt_length),))
            self.pool.prompts.copy_(table[rows].reshape_as(self.pool.prompts).to(self.pool.prompts.dtype))

    @torch.no_grad()
    def _llm_query(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """The frozen, un-prompted LM's last hidden state, mean-pooled over the prompt tokens."""
        model = self.backbone.model
        decoder = getattr(model, "base_model", None)
        if decoder is not None and decoder is not model:
            hidden = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=False).last_hidden_state
        else:
            hidden = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=False,
                           output_hidden_states=True).hidden_states[-1]
        m = prompt_mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * m).sum(1) / m.sum(1).clamp_min(1.0)).float()

    def text_prefix(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """The text protocol's hook: each prompt's selected pool prompts, ``(B, N * L_p, d)``,
        and the selected keys' cosines (``prompt_sim``, for the pull term) as step outputs."""
        if not self.prompting:
            return None, {}
        sel = self.pool.select(self._llm_query(prompt_ids, prompt_mask), int(self.hp.top_n),
                               batch_voting=self.voting())
        return self.pool.tokens(sel.idx), {"prompt_sim": sel.sim}

    def begin_task(self, task: int, data, restoring: bool) -> None:
        self.prompting = True

    @torch.no_grad()
    def _query_dim(self) -> int:
        size = int(self.backbone.info.get("image_size") or 224)
        was = self.backbone.training
        self.backbone.eval()
        try:
            q = self._frozen_query(torch.zeros(1, 3, size, size), is_feature=False)
        finally:
            self.backbone.train(was)
        return int(q.shape[-1])

    # ---- selection --------------------------------------------------------------------------
    @torch.no_grad()
    def _frozen_query(self, x: torch.Tensor, is_feature: bool) -> torch.Tensor:
        """The frozen, un-prompted backbone's pooled image feature: the trunk's pooled
        features where the tower has a (cacheable) trunk, else the whole tower's output."""
        bb = self.backbone
        if is_feature:
            return x
        if bb._trunk is not None:
            return bb.image_trunk(x)
        return bb.encode_image(x)  # the hook is inactive outside ``prompts()``

    def query(self, batch: dict) -> torch.Tensor:
        q = self._frozen_query(batch["x"], bool(batch.get("is_feature", False)))
        return (q.mean(1) if q.dim() == 3 else q).float()  # a token trunk (mini-clip tokens): mean token

    def select(self, batch: dict) -> Selection:
        return self.pool.select(self.query(batch), int(self.hp.top_n), batch_voting=self.voting())

    def voting(self) -> bool:
        """Whether this selection votes across the batch (``batch_voting``, or
        ``train_batch_voting`` while training)."""
        return bool(self.hp.batch_voting) or (bool(self.hp.get("train_batch_voting", False)) and self.training)

    # ---- loss ----------------------------------------------------------------------------------
    def extra_loss(self, batch: dict, outputs: dict) -> torch.Tensor | None:
        sim = outputs.get("prompt_sim")
        if sim is None:
            return None
        pull = sim.sum(1).mean() if self.hp.pull_sum_over_selected else sim.mean()
        return -float(self.hp.pull_lambda) * pull

    def extra_metrics(self) -> dict:
        h = self.hp
        # the leaderboard row name: on a CNN image tower this is a text-prompt variant
        name = "l2p (text prompts)" if self.placement == "text" else "l2p"
        return {"display_name": name, "placement": self.placement, "batch_voting": bool(h.batch_voting),
                "train_batch_voting": bool(h.get("train_batch_voting", False)),
                "pool_size": int(h.pool_size), "prompt_length": int(h.prompt_length), "top_n": int(h.top_n),
                "pull_lambda": float(h.pull_lambda), "pull_sum_over_selected": bool(h.pull_sum_over_selected),
                "prompt_cls_position": bool(h.prompt_cls_position), "prompt_order": "pool index",
                "image_readout": "[CLS]" if self.placement != "llm" else None}
