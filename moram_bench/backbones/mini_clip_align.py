"""LiT-style alignment of ``mini-clip``'s two projections on cached frozen features.

The backbone loader (``mini_clip.py``) builds the composite and caches the result; this
module holds what trains it, with no knowledge of caching or open_clip's folders:

- :func:`load_alignment_set`: the committed alignment pairs (emoji and clip art disjoint
  from the ``xtail-mini`` stream);
- :func:`text_pooled` / :func:`trim_padding`: pooled outputs of the frozen text tower;
- :func:`clip_loss`, :func:`retrieval`: the symmetric CLIP loss (pairs sharing a caption
  are positives of each other) and image->caption top-k retrieval;
- :func:`align_projections`: AdamW on the image projection, the text projection and the
  logit scale over cached features, with a held-out evaluation history;
- :func:`align`: the whole procedure on cached features: choose the number of steps on a
  held-out 20 % of the pairs (it overfits early), then retrain on all pairs for that many
  steps from the same initial weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ALIGN_DATA = Path(__file__).resolve().parents[2] / "data" / "xtail_mini" / "align.npz"


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def load_alignment_set(path: str | os.PathLike | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """The alignment pairs: RGB images (N, H, W, 3) uint8, captions and sources.

    ``align.npz`` stores the images palette-encoded (``indices`` into per-image
    ``palettes``); plain ``images`` arrays are accepted too."""
    path = Path(path or DEFAULT_ALIGN_DATA)
    if not path.is_file():
        raise FileNotFoundError(f"backbone mini-clip: alignment data not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        if "images" in z.files:
            images = z["images"]
        else:
            idx, pal = z["indices"], z["palettes"]
            images = pal[np.arange(len(idx))[:, None, None], idx]
        captions = [str(c) for c in z["captions"]]
        sources = [str(s) for s in z["sources"]] if "sources" in z.files else [""] * len(captions)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(captions):
        raise ValueError(f"backbone mini-clip: malformed alignment data {path}: {images.shape}, {len(captions)} captions")
    return images, captions, sources


def grey_copies(images: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601) copies of RGB images, as 3-channel uint8."""
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return luma.round().clip(0, 255).astype(np.uint8)[..., None].repeat(3, -1)


def pixels(images: np.ndarray, preprocess: Callable) -> torch.Tensor:
    from PIL import Image

    return torch.stack([preprocess(Image.fromarray(x).convert("RGB")) for x in images])


@torch.no_grad()
def image_features(encode: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, preprocess: Callable,
                   batch_size: int = 128) -> torch.Tensor:
    """``encode(pixels)`` over ``images`` in batches (float32)."""
    return torch.cat([encode(pixels(images[i:i + batch_size], preprocess))
                      for i in range(0, len(images), batch_size)]).float()


@torch.no_grad()
def text_pooled(text: nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean-pooled outputs of the frozen HF text tower ``text`` (before its projection)."""
    was_training = text.training
    text.eval()
    out = []
    for i in range(0, len(tokens), batch_size):
        x = tokens[i:i + batch_size]
        mask = (x != text.config.pad_token_id).long()
        out.append(text.pooler(text.transformer(input_ids=x, attention_mask=mask), mask))
    text.train(was_training)
    return torch.cat(out).float()


def trim_padding(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    keep = (tokens != pad_id).any(0)
    last = int(keep.nonzero().max()) + 1 if keep.any() else 1
    return tokens[:, :last]


# ---------------------------------------------------------------------------------------
# loss and retrieval
# ---------------------------------------------------------------------------------------
def clip_loss(img: torch.Tensor, txt: torch.Tensor, caption_ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss; pairs that share a caption are positives of each other (soft
    targets spread evenly over them), so repeated clip-art categories are no false negatives."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale * img @ txt.t()
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    loss_i = -(target * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(target * logits.t().log_softmax(1)).sum(1).mean()
    return (loss_i + loss_t) / 2


@torch.no_grad()
def retrieval(img_proj: torch.Tensor, cap_proj: torch.Tensor, caption_ids: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Image -> caption retrieval among ``cap_proj`` (all distinct captions): top-k (%)."""
    sims = F.normalize(img_proj, dim=-1) @ F.normalize(cap_proj, dim=-1).t()
    rank = (sims > sims.gather(1, caption_ids[:, None])).sum(1)  # 0 = best
    return {f"top{k}": float((rank < k).float().mean() * 100) for k in ks}


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------
class single_thread:
    """Run a block with one torch thread: the projection training consists of tiny ops, for
    which extra threads only add synchronisation (5x slower on a busy 2-core machine)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def align_projections(vproj: nn.Linear, tproj: nn.Linear, logit_scale: nn.Parameter, img_feats: torch.Tensor,
                      cap_feats: torch.Tensor, caption_ids: torch.Tensor, a: dict[str, Any], steps: int,
                      eval_idx: torch.Tensor | None = None, num_pairs: int | None = None,
                      on_eval: Callable[[int, dict], None] | None = None) -> list[tuple[int, dict]]:
    """Train ``vproj``, ``tproj`` and ``logit_scale`` on cached features.

    ``img_feats`` (N, d_img) are what ``vproj`` reads, ``cap_feats`` (C, d_txt) the pooled
    text features of the C distinct captions, ``caption_ids`` (N,) the caption of each
    image. ``img_feats`` may stack several views of the pairs (row ``v * num_pairs + i`` is
    view v of pair i; view 0 is the original image). Trains on every view of the pairs not
    in ``eval_idx``; when ``eval_idx`` is given, evaluates retrieval of their original
    images among all C captions every ``a["eval_every"]`` steps (calling ``on_eval(step,
    metrics)``) and returns the history [(step, metrics)]."""
    n_pairs = len(caption_ids) if num_pairs is None else num_pairs
    train_idx = torch.arange(len(img_feats))
    if eval_idx is not None:
        train_idx = train_idx[~torch.isin(train_idx % n_pairs, eval_idx)]
    decay = [vproj.weight, tproj.weight]
    no_decay = [logit_scale] + ([vproj.bias] if vproj.bias is not None else [])
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(a["weight_decay"])},
                             {"params": no_decay, "weight_decay": 0.0}], lr=float(a["lr"]))
    gen = torch.Generator().manual_seed(int(a["seed"]))
    bs = min(int(a["batch_size"]), len(train_idx))
    history, order, pos = [], torch.empty(0, dtype=torch.long), 0

    def evaluate(step):
        with torch.no_grad():
            m = retrieval(vproj(img_feats[eval_idx]), tproj(cap_feats), caption_ids[eval_idx])
        history.append((step, m))
        if on_eval is not None:
            on_eval(step, m)

    if eval_idx is not None:
        evaluate(0)
    for step in range(1, steps + 1):
        if pos + bs > len(order):
            order, pos = train_idx[torch.randperm(len(train_idx), generator=gen)], 0
        batch = order[pos:pos + bs]
        pos += bs
        loss = clip_loss(vproj(img_feats[batch]), tproj(cap_feats[caption_ids[batch]]), caption_ids[batch],
                         logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(0, float(np.log(100)))
        if eval_idx is not None and (step % int(a["eval_every"]) == 0 or step == steps):
            evaluate(step)
    return history


def align(vproj: nn.Linear, tproj: nn.Linear, logit_scale: nn.Parameter, img_feats: torch.Tensor,
          cap_feats: torch.Tensor, caption_ids: torch.Tensor, sources: list[str], num_pairs: int,
          a: dict[str, Any], log: Callable = print) -> dict[str, Any]:
    """Choose the number of steps on a held-out ``a["holdout"]`` of the pairs, then retrain
    the projections on all pairs for that many steps from their initial weights.

    Arguments as :func:`align_projections`; ``sources`` (one per pair) split the held-out
    retrieval into emoji / clip art. Returns the alignment record (held-out retrieval,
    chosen steps, history, seconds)."""
    import time

    params = [vproj.weight, tproj.weight, logit_scale] + [p for p in (vproj.bias, tproj.bias) if p is not None]
    init = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(int(a["seed"]) + 1)
    n_eval = int(round(float(a["holdout"]) * num_pairs))
    eval_idx = torch.sort(torch.randperm(num_pairs, generator=gen)[:n_eval]).values
    is_emoji = torch.tensor([s.startswith("emoji:") for s in sources])
    best_seen = {"score": -1.0, "parts": {}}
    t0 = time.time()

    def breakdown(step, m):  # retrieval per source at the best step so far
        if m["top1"] + m["top5"] > best_seen["score"]:
            with torch.no_grad():
                best_seen["parts"] = {
                    part: retrieval(vproj(img_feats[idx]), tproj(cap_feats), caption_ids[idx])
                    for part, idx in (("emoji", eval_idx[is_emoji[eval_idx]]),
                                      ("clipart", eval_idx[~is_emoji[eval_idx]])) if len(idx)}
            best_seen["score"] = m["top1"] + m["top5"]

    with single_thread():
        history = align_projections(vproj, tproj, logit_scale, img_feats, cap_feats, caption_ids, a,
                                    int(a["max_steps"]), eval_idx, num_pairs, on_eval=breakdown)
    best_step, best = max(history, key=lambda h: (h[1]["top1"] + h[1]["top5"], -h[0]))
    log(f"mini-clip: held-out ({n_eval} pairs) image->caption retrieval among {len(cap_feats)} captions: "
        f"top-1 {best['top1']:.1f}%, top-5 {best['top5']:.1f}% at step {best_step} "
        f"(step 0: top-1 {history[0][1]['top1']:.1f}%; last: top-1 {history[-1][1]['top1']:.1f}%)")
    with torch.no_grad():
        for p, v in zip(params, init):
            p.copy_(v)
    with single_thread():
        align_projections(vproj, tproj, logit_scale, img_feats, cap_feats, caption_ids, a, best_step, None, num_pairs)
    seconds = time.time() - t0
    log(f"mini-clip: aligned on all {num_pairs} pairs for {best_step} steps ({seconds:.1f}s in total)")
    return {"pairs": num_pairs, "views": len(img_feats) // num_pairs, "distinct_captions": len(cap_feats),
            "holdout_pairs": n_eval, "chosen_steps": best_step, "holdout_retrieval": best,
            "holdout_by_source": best_seen["parts"], "holdout_history": history, "seconds": seconds}
