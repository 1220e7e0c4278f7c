"""X-TAIL / MTIL inputs: the official prompt set (templates and class names of the official
X-TAIL code) and the CoOp switch, and training images through the training transform."""
from __future__ import annotations

import pytest
import torch

from moram_bench.config import resolve_config
from moram_bench.data import TaskStreamDataModule
from moram_bench.streams import classnames as C
from moram_bench.streams.base import StreamError
from test_coop_loaders import make_domain

DOMAINS = ["eurosat", "food101", "mnist", "oxford_pets"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    for dom in DOMAINS:
        make_domain(d, dom, train_per_class=3, test_per_class=1)
    return d


def build(root, *extra, stream="xtail"):
    from moram_bench import registry

    cfg = resolve_config([f"stream={stream}", f"data_dir={root}", f"stream.domains=[{','.join(DOMAINS)}]", *extra])
    return registry.STREAMS[cfg.stream.name](cfg)


def prompts_by_domain(s):
    return {t.name: t.prompts() for t in s.tasks}


def test_official_prompts_are_the_default(root):
    s = build(root)
    p = prompts_by_domain(s)
    assert p["eurosat"][0] == "a centered satellite photo of the Annual Crop Land satellite location."
    assert p["food101"][0] == "a photo of a apple_pie, a type of food."  # split-file names verbatim
    assert p["mnist"][:2] == ['a photo of the number: "number: "0 - zero"".',
                              'a photo of the number: "number: "1 - one"".']
    assert p["oxford_pets"][1] == "a photo of a american_bulldog, a type of pet."
    st = s.settings
    assert st["prompts"] == "official" and st["train_transform"] == "train"
    assert st["templates"]["eurosat"] == "a centered satellite photo of the {}."
    assert st["templates"]["food101"] == "a photo of a {}, a type of food."
    # MTIL reads the same inputs
    assert prompts_by_domain(build(root, stream="mtil")) == p


def test_coop_prompt_set_keeps_the_cleaned_names(root):
    s = build(root, "stream.prompts=coop", "stream.train_transform=eval")
    p = prompts_by_domain(s)
    assert p["eurosat"][0] == "a centered satellite photo of Annual Crop Land."
    assert p["food101"][0] == "a photo of apple pie, a type of food."
    assert p["mnist"][0] == 'a photo of the number: "0".'
    assert s.settings["prompts"] == "coop" and s.settings["train_transform"] == "eval"
    # the recorded class-name hash follows the names actually prompted
    assert s.settings["per_domain"]["food101"]["classnames_sha"] != \
        build(root).settings["per_domain"]["food101"]["classnames_sha"]


@pytest.mark.parametrize("override, key", [("stream.prompts=clip", "stream.prompts"),
                                           ("stream.train_transform=augment", "stream.train_transform")])
def test_bad_input_settings_are_one_line_errors(root, override, key):
    with pytest.raises(StreamError, match=key.replace(".", r"\.")) as e:
        build(root, override)
    assert "\n" not in str(e.value)


def test_prompt_inputs_unknown_set():
    with pytest.raises(ValueError, match="prompt set"):
        C.prompt_inputs("dtd", ["banded"], None, "clip")


def _tag(name):
    return lambda im: torch.tensor([float(name == "train")])


def test_datamodule_uses_the_training_transform_only_for_training_images(root):
    s = build(root)
    dm = TaskStreamDataModule(s, batch_size=4, steps_per_task=[1] * len(s), seed=0,
                              transform=_tag("eval"), train_transform=_tag("train"))
    assert s.settings["train_transform"] == "train"
    assert dm.dataset("train", 0)[0]["x"].item() == 1.0
    assert dm.dataset("train", 0, augment=False)[0]["x"].item() == 0.0
    assert dm.dataset("test", 0)[0]["x"].item() == 0.0
    # cached features are computed once, through the evaluation transform: recorded as eval
    dm.cache_features(lambda x: x, "id", None, log=lambda m: None)
    assert s.settings["train_transform"] == "eval"
    assert dm.dataset("train", 0)[0]["x"].item() == 0.0


def test_streams_without_a_training_transform_record_eval(root):
    s = build(root, "stream.train_transform=eval")
    dm = TaskStreamDataModule(s, batch_size=4, steps_per_task=[1] * len(s), seed=0,
                              transform=_tag("eval"), train_transform=_tag("train"))
    assert s.settings["train_transform"] == "eval" and dm.dataset("train", 0)[0]["x"].item() == 0.0
    s = build(root)  # requested, but the backbone has no training transform
    TaskStreamDataModule(s, batch_size=4, steps_per_task=[1] * len(s), seed=0, transform=_tag("eval"))
    assert s.settings["train_transform"] == "eval"


def test_open_clip_backbones_carry_open_clips_training_transform():
    from torchvision import transforms as T

    from moram_bench.backbones.open_clip_models import build_clip_vit_b16

    with pytest.warns(UserWarning, match="RANDOM weights"):
        bb = build_clip_vit_b16({"backbone": {"pretrained": None, "allow_random": True}})
    assert isinstance(bb.train_preprocess.transforms[0], T.RandomResizedCrop)
    assert bb.train_preprocess.transforms[0].size == (224, 224)
    assert not any(isinstance(t, T.RandomResizedCrop) for t in bb.preprocess.transforms)
