"""The embedded ``xtail-mini`` stream and its offline ``mini-clip`` backbone.

Stream tests read only the committed files under data/xtail_mini/ (no system package).
The backbone tests load the aligned model from the cache (a few seconds when warm; a cold
cache builds it once: about a minute or two on 2 cores).
"""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from moram_bench.streams.base import StreamError
from moram_bench.streams.xtail_mini import (DEFAULT_DATA_ROOT, DOMAINS, build_xtail_mini, render_digit,
                                            shot_seed_for)

ROOT = Path(__file__).resolve().parents[1]
STREAM_YAML = ROOT / "conf" / "stream" / "xtail-mini.yaml"
BACKBONE_YAML = ROOT / "conf" / "backbone" / "mini-clip.yaml"


def make_cfg(seed: int = 0, **stream_overrides):
    stream = OmegaConf.load(STREAM_YAML)
    for k, v in stream_overrides.items():
        stream[k] = v
    return OmegaConf.create({"seed": seed, "stream": stream, "cache_dir": None})


@pytest.fixture(scope="module")
def stream():
    return build_xtail_mini(make_cfg(seed=0))


# ---- the stream ----------------------------------------------------------------------------
def test_stream_is_a_union_over_five_real_domains(stream):
    assert stream.name == "xtail-mini" and stream.modality == "image"
    assert stream.task_names == list(DOMAINS)
    assert stream.label_space == "union"
    sizes = [t.num_classes for t in stream.tasks]
    assert sizes == [10, 10, 7, 6, 7]
    assert [t.label_offset for t in stream.tasks] == [0, 10, 20, 27, 33]
    for t in range(len(stream)):
        assert stream.class_slice(t) == slice(0, 40)
    assert stream.tasks[1].classnames == ["zero", "one", "two", "three", "four", "five", "six", "seven",
                                          "eight", "nine"]
    assert "ankle boot" in stream.tasks[0].classnames
    assert stream.settings["num_classes"] == 40 and stream.settings["shots"] == 16
    assert stream.settings["data_root"] is None  # the embedded data: no machine path in the record
    assert len(set(stream.all_classnames())) == 40  # no class name is shared by two domains


def test_tasks_yield_64px_rgb_images_and_local_labels(stream):
    for t in stream.tasks:
        for ds in (t.train, t.test):
            item = ds[len(ds) - 1]
            assert item["image"].mode == "RGB" and item["image"].size == (64, 64)
            assert ds.labels.min() >= 0 and ds.labels.max() < t.num_classes
        # every class is present in both splits
        assert set(np.unique(t.train.labels)) == set(range(t.num_classes))
        assert set(np.unique(t.test.labels)) == set(range(t.num_classes))
    fashion, digits = stream.tasks[0], stream.tasks[1]
    assert len(fashion.test) == 1000 and len(fashion.train) == 160
    assert len(digits.train) == 160 and len(digits.train) + len(digits.test) < 1797
    # small clip-art / emoji classes contribute all their pool (at least 4), never more than 16
    for t in stream.tasks[2:]:
        counts = np.bincount(t.train.labels)
        assert counts.min() >= 4 and counts.max() <= 16


def test_templates_format_every_class(stream):
    prompts = stream.all_prompts()
    assert len(prompts) == 40
    assert prompts[0] == "a photo of a T-shirt/top, a type of clothing."
    assert prompts[10] == "a photo of the number zero."
    for t in stream.tasks:
        assert t.template.count("{}") == 1
        assert stream.settings["templates"][t.name] == t.template
        assert all(c in p for c, p in zip(t.classnames, t.prompts()))
    custom = build_xtail_mini(make_cfg(domains=["digits"], templates={"digits": "a drawing of {}."}))
    assert custom.tasks[0].prompts()[3] == "a drawing of three."
    with pytest.raises(StreamError, match="must contain"):
        build_xtail_mini(make_cfg(domains=["digits"], templates={"digits": "a drawing"}))


def test_few_shot_sampling_is_deterministic_and_seeded(stream):
    again = build_xtail_mini(make_cfg(seed=0))
    other_seed = build_xtail_mini(make_cfg(seed=1))
    fixed = build_xtail_mini(make_cfg(seed=1, shot_seed=0))
    for a, b, c, d in zip(stream.tasks, again.tasks, other_seed.tasks, fixed.tasks):
        assert a.extra["pool_indices"] == b.extra["pool_indices"]
        assert np.array_equal(a.train.images, b.train.images)
        assert a.train.fingerprint() == b.train.fingerprint()
        # shot_seed null follows the run seed; an explicit shot_seed overrides it
        assert d.extra["pool_indices"] == a.extra["pool_indices"]
    assert any(a.extra["pool_indices"] != c.extra["pool_indices"] for a, c in zip(stream.tasks, other_seed.tasks))
    assert stream.settings["shot_seed"] == 0 and other_seed.settings["shot_seed"] == 1
    assert fixed.settings["shot_seed_source"] == "stream.shot_seed"
    # a domain's samples depend on (shot_seed, domain) only, not on the other domains
    alone = build_xtail_mini(make_cfg(seed=0, domains=["emoji_things", "digits"]))
    assert alone.task_names == ["emoji_things", "digits"]
    assert alone.tasks[1].extra["pool_indices"] == stream.tasks[1].extra["pool_indices"]
    assert alone.tasks[0].label_offset == 0 and alone.tasks[1].label_offset == 7
    assert shot_seed_for(0, "digits") != shot_seed_for(0, "fashion_mnist") != shot_seed_for(1, "fashion_mnist")
    shots4 = build_xtail_mini(make_cfg(seed=0, shots=4, domains=["fashion_mnist"]))
    assert np.bincount(shots4.tasks[0].train.labels).tolist() == [4] * 10


def test_train_pool_and_test_split_are_disjoint():
    for d in DOMAINS:
        with np.load(DEFAULT_DATA_ROOT / f"{d}.npz") as z:
            assert not set(z["train_sources"]) & set(z["test_sources"]), d
            train = {hashlib.sha1(x.tobytes()).hexdigest() for x in z["train_images"]}
            test = {hashlib.sha1(x.tobytes()).hexdigest() for x in z["test_images"]}
            if d != "digits":  # 8x8 digit counts can coincide between different writers
                assert not train & test, d


def test_alignment_set_is_disjoint_from_the_stream():
    stream_sources, class_words = set(), set()
    for d in DOMAINS:
        with np.load(DEFAULT_DATA_ROOT / f"{d}.npz") as z:
            stream_sources |= set(z["train_sources"]) | set(z["test_sources"])
            for c in z["classnames"]:
                class_words |= set(re.split(r"[^a-z]+", str(c).lower())) - {"", "or", "a"}
    with np.load(DEFAULT_DATA_ROOT / "align.npz") as z:
        captions, sources = list(z["captions"]), list(z["sources"])
    assert len(captions) > 2000
    assert not set(sources) & stream_sources
    assert not any(s.startswith(("fashion-mnist", "sklearn-digits")) for s in sources)
    for cap in captions:
        assert cap.startswith(("an emoji of ", "a clip art of a "))
        words = set(re.split(r"[^a-z]+", cap.lower()))
        assert not words & class_words, cap


def test_render_digit_draws_dark_strokes_on_white():
    counts = np.zeros((8, 8), dtype=np.uint8)
    counts[1:7, 3:5] = 16  # a vertical bar: "one"
    img = render_digit(counts)
    assert img.shape == (64, 64) and img.dtype == np.uint8
    assert img[0, 0] == 255 and img[32, 32] < 40  # paper white, ink dark
    assert img[:, :16].min() > 200  # no ink far from the stroke


def test_missing_and_corrupt_data_raise_a_one_line_stream_error(tmp_path):
    with pytest.raises(StreamError, match=re.escape(str(tmp_path / "fashion_mnist.npz"))):
        build_xtail_mini(make_cfg(data_root=str(tmp_path)))
    shutil.copy(DEFAULT_DATA_ROOT / "digits.npz", tmp_path / "digits.npz")
    (tmp_path / "emoji_things.npz").write_bytes(b"not a zip file")
    build_xtail_mini(make_cfg(data_root=str(tmp_path), domains=["digits"]))  # no manifest: no sha check
    with pytest.raises(StreamError, match="corrupt data file .*emoji_things.npz") as e:
        build_xtail_mini(make_cfg(data_root=str(tmp_path), domains=["emoji_things"]))
    assert "\n" not in str(e.value)
    shutil.copy(DEFAULT_DATA_ROOT / "manifest.json", tmp_path / "manifest.json")
    data = bytearray((tmp_path / "digits.npz").read_bytes())
    data[-200] ^= 0xFF
    (tmp_path / "digits.npz").write_bytes(bytes(data))
    with pytest.raises(StreamError, match="corrupt data file .*digits.npz"):
        build_xtail_mini(make_cfg(data_root=str(tmp_path), domains=["digits"]))
    with pytest.raises(StreamError, match="unknown xtail-mini domain 'mnist'"):
        build_xtail_mini(make_cfg(domains=["mnist"]))


# ---- the backbone ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone():
    from moram_bench.backbones.mini_clip import build_mini_clip

    cfg = OmegaConf.create({"backbone": OmegaConf.load(BACKBONE_YAML), "cache_dir": None, "seed": 0})
    return build_mini_clip(cfg)


def test_backbone_structure_and_adapter_targets(backbone):
    from moram_bench.adapters.inject import match_linear_names

    assert backbone.name == "mini-clip" and backbone.trunk_cacheable
    assert backbone.info["image_side"] == "tokens" and backbone.info["image_tokens"] == 4
    names = match_linear_names(backbone.model, backbone.info["adapter_targets"])
    assert len(names) == 39
    assert {"visual.head.conv_head", "visual.head.proj", "text.proj"} <= set(names)
    assert "text.transformer.encoder.layer.5.attention.self.query" in names
    assert "text.transformer.encoder.layer.0.output.dense" in names
    assert not any(n.startswith("visual.trunk") for n in names)
    assert backbone.pad_id == 0
    assert backbone.info["alignment"]["holdout_retrieval"]["top1"] > 10.0


@torch.no_grad()
def test_trunk_is_mode_independent_and_padding_trim_is_exact(backbone):
    x = torch.randn(4, 3, 64, 64)
    backbone.model.train()
    try:
        train_feats = backbone.image_trunk(x)
    finally:
        backbone.model.eval()
    assert train_feats.shape == (4, 4, 320)  # 2 x 2 tokens of the last stage
    assert torch.equal(train_feats, backbone.image_trunk(x))
    texts = ["an emoji of a clock.", "a photo of a T-shirt/top, a type of clothing, on a plain background."]
    full = backbone.tokenizer(texts)
    trimmed = backbone.tokenize(texts)
    assert trimmed.shape[1] < full.shape[1] == 64
    torch.testing.assert_close(backbone.encode_text(full), backbone.encode_text(trimmed), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_token_head_computes_the_pooled_trunk_features():
    """TokenTrunk + TokenHead.pooled == EfficientNet's own forward up to its average pool
    (random weights and BatchNorm statistics, eval mode), and with mean 0 / std 1 the head
    is the pooled design's head."""
    from open_clip.timm_model import TimmModel

    from moram_bench.backbones.mini_clip import token_image_side

    torch.manual_seed(0)
    visual = TimmModel("tf_efficientnet_lite0", 16, image_size=64, pool="avg", proj="linear", proj_bias=True).eval()
    for m in visual.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.normal_()
            m.bias.normal_()
    x = torch.randn(3, 3, 96, 96)
    trunk, head = token_image_side(visual)
    tokens = trunk(x)
    assert tokens.shape == (3, 9, 320)
    torch.testing.assert_close(head.pooled(tokens), visual.trunk(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(tokens), visual(x), atol=1e-5, rtol=1e-5)
    assert isinstance(head.conv_head, torch.nn.Linear) and not head.conv_head.weight.requires_grad


def test_image_side_setting_and_cache_keys():
    from moram_bench.backbones.mini_clip import _settings, cache_key

    tokens = _settings(OmegaConf.create({"backbone": OmegaConf.load(BACKBONE_YAML)}))
    pooled = _settings(OmegaConf.create({"backbone": {"image_side": "pooled"}}))
    assert tokens["image_side"] == "tokens" and pooled["image_side"] == "pooled"
    assert cache_key(tokens) != cache_key(pooled)
    # the pooled key is the one of the settings before image_side existed (same weights)
    legacy = {k: v for k, v in pooled.items() if k != "image_side"}
    assert cache_key(legacy) == cache_key(pooled)
    with pytest.raises(ValueError, match="image_side must be one of tokens, pooled"):
        _settings(OmegaConf.create({"backbone": {"image_side": "patches"}}))


@torch.no_grad()
def test_adapted_image_layers_read_inputs_of_both_signs(backbone, stream):
    """The invariant of the tokens design: no adapted image-side layer reads inputs of one
    sign. conv_head reads the cached trunk tokens, proj the standardised pooled features:
    over real images of every domain, their per-channel means take both signs. (The pooled
    design's proj read the ReLU6 features, all >= 0.)"""
    from moram_bench.adapters.inject import match_linear_names

    head = backbone.model.visual.head
    idx = {t.name: np.arange(len(t.test))[:: max(1, len(t.test) // 40)] for t in stream.tasks}
    pixels = torch.stack([backbone.preprocess(t.test[int(j)]["image"]) for t in stream.tasks for j in idx[t.name]])
    tokens = backbone.image_trunk(pixels)                  # what the feature cache holds
    pooled = head.pooled(tokens)
    proj_in = head.standardise(pooled)
    assert bool((pooled >= 0).all())                       # the pooled design's proj input
    image_layers = [n for n in match_linear_names(backbone.model, backbone.info["adapter_targets"])
                    if n.startswith("visual.")]
    assert sorted(image_layers) == ["visual.head.conv_head", "visual.head.proj"]
    for name, x in (("conv_head", tokens.reshape(-1, tokens.shape[-1])), ("proj", proj_in)):
        positive = float((x.mean(0) > 0).float().mean())
        assert 0.2 < positive < 0.8, (name, positive)
        # the shared mean direction carries a minority of the inputs' energy (pooled: ~all)
        assert float(x.mean(0).pow(2).sum() / x.pow(2).sum(1).mean()) < 0.5, name


def test_adapters_inject_into_the_token_head_through_the_one_path(backbone):
    """MoRAM's memory on the declared targets: conv_head gets a memory that reads every
    token, and a backward pass from the image embedding reaches its current atoms."""
    import copy

    from moram_bench.adapters.inject import inject_adapters
    from moram_bench.memory import RankOneMemory

    model = copy.deepcopy(backbone.model)
    wrapped = inject_adapters(model, backbone.info["adapter_targets"],
                              lambda name, lin: RankOneMemory(lin.in_features, lin.out_features, topk=4))
    assert "visual.head.conv_head" in wrapped
    for w in wrapped.values():
        w.adapter.grow(4)
        torch.nn.init.normal_(w.adapter.values)
    tokens = torch.randn(2, 4, 320)
    model.visual.head(tokens).sum().backward()
    mem = wrapped["visual.head.conv_head"].adapter
    assert mem.keys.grad is not None and mem.keys.grad.abs().sum() > 0


@torch.no_grad()
def test_zero_shot_over_the_union_beats_chance(backbone, stream):
    """Row 0 of the accuracy matrix: every test image against all 40 class prompts. The
    clip-art and emoji test sets are used whole; the two large grey domains (which sit near
    chance, as in the prototype) are subsampled to keep the test quick."""
    text = torch.nn.functional.normalize(backbone.encode_text(backbone.tokenize(stream.all_prompts())), dim=-1)
    accs = []
    for t in stream.tasks:
        idx = np.arange(len(t.test))[:: max(1, len(t.test) // 200)]
        pixels = torch.stack([backbone.preprocess(t.test[int(j)]["image"]) for j in idx])
        img = torch.nn.functional.normalize(backbone.encode_image(pixels), dim=-1)
        pred = (img @ text.t()).argmax(1)
        accs.append(100.0 * float((pred == torch.as_tensor(t.test.labels[idx]) + t.label_offset).float().mean()))
    chance = 100.0 / 40
    assert sum(a > 2 * chance for a in accs) >= 3, accs
