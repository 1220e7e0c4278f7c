"""open_clip backbones: a tiny random-weight CLIP for tests, and an offline open_clip loader.

Both builders return a ``ClipBackbone`` whose open_clip model has had its
``nn.MultiheadAttention`` modules unfused (``moram_bench.adapters.attention``), so q, k, v
and out_proj are separate ``nn.Linear`` modules that adapters can be injected into by name.
``info["adapter_targets"]`` holds the regular expressions of MoRAM's CLIP placement (q, k, v,
out_proj and both MLP linears of every block of both towers); a config may override them
with ``backbone.adapter_targets``. ``info["adapter_blocks"]`` declares the transformer blocks
of both towers for block-level adapters (``CLIP_ADAPTER_BLOCKS``).

``open-clip`` never touches the network: ``backbone.pretrained`` is a checkpoint file, a
folder saved for open_clip's ``local-dir:`` loader, or a pretrained tag (e.g. ``openai``)
whose weights are already in the local Hugging Face or open_clip cache. ``pretrained: null``
gives random weights, allowed only with ``allow_random: true``.
"""
from __future__ import annotations

import os
import re
import warnings
import zipfile
from dataclasses import asdict
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..adapters.attention import unfuse_attention
from ..adapters.inject import match_linear_names
from ..registry import register_backbone
from .clip import ClipBackbone

# MoRAM's CLIP placement: q, k, v, out_proj and both MLP linears of every residual block of
# the image and the text transformer (names as they are after unfuse_attention). The
# leading "(^|\.)" lets the patterns match with or without a prefix such as "model.".
CLIP_ADAPTER_TARGETS = (
    r"(^|\.)transformer\.resblocks\.\d+\.attn\.(q_proj|k_proj|v_proj|out_proj)$",
    r"(^|\.)transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)$",
)


# MoE-Adapters4CL's placement: every residual block of both towers carries a block-level
# adapter reading the residual stream that enters the MLP branch (the input of ln_2) and
# adding its output beside the MLP (after ls_2, the identity in CLIP); see
# moram_bench.adapters.inject (AdaptedBlock).
CLIP_ADAPTER_BLOCKS = (
    {"pattern": r"(^|\.)transformer\.resblocks\.\d+$", "read": "ln_2", "write": "ls_2"},
)


def _as_config(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg or {})


def _opt(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """``cfg.<key>`` or ``default`` when the key is missing or null."""
    value = OmegaConf.select(cfg, key, default=None)
    return default if value is None else value


# ---------------------------------------------------------------------------------------
# shared wrapping
# ---------------------------------------------------------------------------------------
def _tower_of(name: str) -> str:
    """'visual' for image-tower module names, 'text' for the rest."""
    return "visual" if name.startswith("visual.") else "text"


def target_counts(model: nn.Module, patterns) -> dict[str, dict[int, int]]:
    """Per tower, the number of ``nn.Linear`` modules matched by ``patterns`` in each
    residual block: ``{"visual": {0: 6, 1: 6}, "text": {...}}`` (blocks with no match are
    absent; matches outside ``resblocks`` count under block -1)."""
    counts: dict[str, dict[int, int]] = {"visual": {}, "text": {}}
    for name in match_linear_names(model, patterns):
        m = re.search(r"resblocks\.(\d+)\.", name)
        block = int(m.group(1)) if m else -1
        tower = counts[_tower_of(name)]
        tower[block] = tower.get(block, 0) + 1
    return counts


def _num_blocks(tower: nn.Module | None) -> int:
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    return len(blocks) if blocks is not None else 0


def _check_placement(model: nn.Module, patterns, name: str, strict: bool) -> dict[str, int]:
    """Check that the default placement hits 6 linears in every block of both towers.

    Raises (``strict``) or warns otherwise; returns the number of matches per tower.
    """
    counts = target_counts(model, patterns)
    towers = {"visual": getattr(model, "visual", None),
              "text": model.text if hasattr(model, "text") else model}
    problems = []
    for tower_name, tower in towers.items():
        n_blocks = _num_blocks(tower)
        per_block = counts[tower_name]
        if n_blocks == 0:
            problems.append(f"the {tower_name} tower has no open_clip transformer blocks")
        elif per_block != {i: 6 for i in range(n_blocks)}:
            problems.append(f"{tower_name} blocks matched {per_block}, expected 6 in each of {n_blocks}")
    if problems:
        msg = f"backbone {name}: MoRAM's CLIP adapter placement does not fit: " + "; ".join(problems)
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg + " (set backbone.adapter_targets to choose the linears)")
    return {tower: sum(c.values()) for tower, c in counts.items()}


def _split_visual(visual: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """(trunk, head) of an open_clip image tower.

    A timm tower (``TimmModel``: ``forward = head(trunk(x))``) splits into its timm trunk
    and its pooling/projection head, so a trunk without adapters can be cached. Native
    towers (ViT, ModifiedResNet) have adapters inside: no trunk, the head is the tower.
    """
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if isinstance(trunk, nn.Module) and isinstance(head, nn.Module):
        return trunk, head
    return None, visual


def _text_pad_id(model: nn.Module) -> int | None:
    """The pad id when trailing padding can be trimmed without changing text features.

    Only Hugging Face text towers whose pooler ignores padding (masked mean or first-token
    pooling) qualify. open_clip's native text transformer adds its full positional
    embedding and full causal mask, so its inputs must keep the configured context length.
    """
    text = getattr(model, "text", None)
    pooler = type(getattr(text, "pooler", None)).__name__
    config = getattr(text, "config", None)
    if config is not None and pooler in ("MeanPooler", "ClsPooler", "ClsLastHiddenStatePooler"):
        return getattr(config, "pad_token_id", None)
    return None


def _wrap(model: nn.Module, tokenizer, preprocess, name: str, cfg: DictConfig,
          info: dict[str, Any], strict_placement: bool, train_preprocess=None) -> ClipBackbone:
    """Unfuse attention, work out the adapter targets and build the ``ClipBackbone``."""
    n_unfused = unfuse_attention(model)
    custom = OmegaConf.select(cfg, "backbone.adapter_targets", default=None)
    if custom is not None:
        targets = [str(p) for p in custom]
        per_tower = {t: sum(c.values()) for t, c in target_counts(model, targets).items()}
    else:
        targets = list(CLIP_ADAPTER_TARGETS)
        per_tower = _check_placement(model, targets, name, strict_placement)
    trunk, head = _split_visual(model.visual)
    info = dict(info)
    info.update(
        adapter_targets=targets,
        adapter_target_counts=per_tower,
        adapter_blocks=[dict(spec) for spec in CLIP_ADAPTER_BLOCKS],
        unfused_attention=n_unfused,
        model_class=type(model).__name__,
        visual_class=type(model.visual).__name__,
        preprocess_cfg={k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in getattr(model.visual, "preprocess_cfg", {}).items()},
        num_params=sum(p.numel() for p in model.parameters()),
    )
    model.eval()
    return ClipBackbone(model, tokenizer, preprocess, trunk, head, name, info,
                        pad_id=_text_pad_id(model), train_preprocess=train_preprocess)


def _eval_transform(model: nn.Module):
    from open_clip.model import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**get_model_preprocess_cfg(model)), is_train=False)


# ---------------------------------------------------------------------------------------
# tiny-clip
# ---------------------------------------------------------------------------------------
@register_backbone("tiny-clip")
def build_tiny_clip(cfg) -> ClipBackbone:
    """A tiny random-weight open_clip ViT CLIP (seeded by backbone.init_seed) for tests."""
    from open_clip import SimpleTokenizer
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    cfg = _as_config(cfg)
    b = lambda key, default: _opt(cfg, f"backbone.{key}", default)  # noqa: E731
    seed = int(b("init_seed", 0))
    image_size = int(b("image_size", 32))
    vision_width = int(b("vision_width", 64))
    vision_heads = int(b("vision_heads", 2))
    if vision_width % vision_heads:
        raise ValueError(f"backbone tiny-clip: vision_width {vision_width} is not divisible "
                         f"by vision_heads {vision_heads}")
    context_length = int(b("context_length", 16))
    tokenizer = SimpleTokenizer(context_length=context_length)
    vision_cfg = CLIPVisionCfg(
        image_size=image_size,
        width=vision_width,
        layers=int(b("vision_layers", 2)),
        patch_size=int(b("patch_size", 8)),
        head_width=vision_width // vision_heads,
    )
    text_cfg = CLIPTextCfg(
        context_length=context_length,
        vocab_size=tokenizer.vocab_size,  # the CLIP BPE vocabulary (49408), shipped with open_clip
        width=int(b("text_width", 64)),
        heads=int(b("text_heads", 2)),
        layers=int(b("text_layers", 2)),
    )
    # a private RNG stream: the same init_seed always gives the same weights, and the
    # caller's global RNG state is left exactly as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(embed_dim=int(b("embed_dim", 32)), vision_cfg=vision_cfg, text_cfg=text_cfg)
    set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=image_size)))
    info = {"arch": "tiny-clip", "pretrained": None, "init_seed": seed, "embed_dim": model.visual.output_dim,
            "image_size": image_size, "context_length": context_length}
    return _wrap(model, tokenizer, _eval_transform(model), "tiny-clip", cfg, info, strict_placement=True)


# ---------------------------------------------------------------------------------------
# open-clip (general offline loader)
# ---------------------------------------------------------------------------------------
def _is_torchscript(path: str) -> bool:
    """True for TorchScript archives (e.g. OpenAI's original CLIP .pt files)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in f"/{n}" for n in zf.namelist())


def _cached_tag_weights(arch: str, tag: str, tag_cfg: dict, cache_dir: str | None, name: str) -> str:
    """The local file holding the weights of ``arch``/``tag``, found without network access
    in the Hugging Face hub cache or open_clip's download folder (``~/.cache/clip``)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    looked = []
    if tag_cfg.get("file"):
        looked.append(tag_cfg["file"])
        if os.path.isfile(tag_cfg["file"]):
            return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub") or ""
    if hub:
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for fname in names:
            found = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        looked.append(f"HF cache {cache_dir or hf_constants.HF_HUB_CACHE} ({repo_id}: {', '.join(names)})")
    url = tag_cfg.get("url") or ""
    if url:
        path = os.path.join(os.path.expanduser(cache_dir or "~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
        looked.append(path)
    raise FileNotFoundError(
        f"backbone {name}: no local weights for {arch} pretrained={tag!r} (offline); looked in: "
        f"{'; '.join(looked) or 'nowhere (tag has no source)'}; set backbone.pretrained to a checkpoint file")


def _load_torchscript_weights(model: nn.Module, path: str) -> None:
    """Load a TorchScript CLIP archive's state dict (``torch.load(weights_only=True)``
    refuses TorchScript; ``torch.jit.load`` unpickles no arbitrary Python objects)."""
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    from ..logs import no_warnings

    with no_warnings(FutureWarning):  # torch.jit.load is deprecated, but these files need it
        state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    # OpenAI archives carry three scalar entries; scripted open_clip models carry their
    # non-persistent buffers (the causal attn_mask), which the model rebuilds itself
    non_persistent = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    for key in ("input_resolution", "context_length", "vocab_size", *non_persistent):
        state_dict.pop(key, None)
    scale = state_dict.get("logit_scale")
    if scale is not None and scale.ndim != model.logit_scale.ndim:
        state_dict["logit_scale"] = scale.reshape(model.logit_scale.shape)
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    model.load_state_dict(state_dict, strict=True)


def _resolve_weights(arch: str | None, pretrained: str | None, cache_dir: str | None, name: str):
    """Classify ``backbone.pretrained``: returns (kind, path, tag_cfg) with kind one of
    "random", "file", "local-dir", "tag"; raises a one-line error when nothing is found."""
    if pretrained in (None, ""):
        return "random", None, {}
    path = os.path.expanduser(str(pretrained))
    if os.path.isfile(path):
        return "file", path, {}
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "open_clip_config.json")):
            raise FileNotFoundError(f"backbone {name}: folder {path} has no open_clip_config.json (local-dir format)")
        return "local-dir", path, {}
    from open_clip.pretrained import get_pretrained_cfg

    tag_cfg = get_pretrained_cfg(arch, str(pretrained)) if arch else {}
    if tag_cfg:
        return "tag", _cached_tag_weights(arch, str(pretrained), tag_cfg, cache_dir, name), tag_cfg
    raise FileNotFoundError(
        f"backbone {name}: checkpoint file not found: {path} (nor a folder or a pretrained tag of {arch})")


def _tuple_or_none(values) -> tuple | None:
    return None if values is None else tuple(float(v) for v in values)


def _build_open_clip(cfg, default_arch: str | None, name: str) -> ClipBackbone:
    import open_clip

    cfg = _as_config(cfg)
    b = lambda key, default=None: _opt(cfg, f"backbone.{key}", default)  # noqa: E731
    arch = b("arch", default_arch)
    pretrained = b("pretrained")
    cache_dir = b("cache_dir")
    kind, path, tag_cfg = _resolve_weights(arch, pretrained, cache_dir, name)
    if kind != "local-dir" and not arch:
        raise ValueError(f"backbone {name}: set backbone.arch (an open_clip model name such as ViT-B-16)")
    if kind == "random":
        if not b("allow_random", False):
            raise ValueError(
                f"backbone {name}: pretrained is null, which means random weights; "
                "set backbone.pretrained to a checkpoint (or allow_random: true for smoke tests)")
        warnings.warn(f"backbone {name}: {arch} with RANDOM weights (pretrained: null, allow_random: true)")

    # the tag decides QuickGELU (OpenAI weights need it) and the preprocessing unless set
    quick_gelu = b("quick_gelu", tag_cfg.get("quick_gelu", False))
    kwargs = dict(
        precision=b("precision", "fp32"),
        force_quick_gelu=bool(quick_gelu),
        force_image_size=b("image_size"),
        force_context_length=b("context_length"),
        image_mean=_tuple_or_none(b("image_mean", tag_cfg.get("mean"))),
        image_std=_tuple_or_none(b("image_std", tag_cfg.get("std"))),
        image_interpolation=b("image_interpolation", tag_cfg.get("interpolation")),
        image_resize_mode=b("image_resize_mode", tag_cfg.get("resize_mode")),
        pretrained_image=False,  # never fetch tower weights from a hub
        pretrained_text=False,
        cache_dir=cache_dir,
        weights_only=True,
    )
    model_name = f"local-dir:{path}" if kind == "local-dir" else arch
    torchscript = kind in ("file", "tag") and _is_torchscript(path)
    # open_clip loads plain/safetensors checkpoints itself (weights_only=True); TorchScript
    # archives are loaded below. Random init runs on a private, seeded RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(b("init_seed", 0)))
        model, train_preprocess, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=path if kind in ("file", "tag") and not torchscript else None, **kwargs)
    if torchscript:
        _load_torchscript_weights(model, path)
    tokenizer = open_clip.get_tokenizer(model_name, context_length=b("context_length"))
    info = {"arch": model_name, "pretrained": pretrained, "weights": path, "weights_kind": kind,
            "quick_gelu": bool(quick_gelu), "embed_dim": getattr(model.visual, "output_dim", None),
            "context_length": getattr(tokenizer, "context_length", None)}
    return _wrap(model, tokenizer, preprocess, name, cfg, info, strict_placement=False,
                 train_preprocess=train_preprocess)


@register_backbone("open-clip")
def build_open_clip(cfg) -> ClipBackbone:
    """An open_clip model (backbone.arch) with local weights (backbone.pretrained), offline."""
    return _build_open_clip(cfg, None, "open-clip")


@register_backbone("clip-vit-b16")
def build_clip_vit_b16(cfg) -> ClipBackbone:
    """CLIP ViT-B/16 through the open-clip loader (arch ViT-B-16; weights from backbone.pretrained)."""
    return _build_open_clip(cfg, "ViT-B-16", "clip-vit-b16")
