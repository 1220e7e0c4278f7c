"""The synthetic-tiny stream: deterministic, seed-dependent, fast, and usable by tiny-clip."""
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from moram_bench.streams.base import Stream, StreamError
from moram_bench.streams.synthetic import MAX_CLASSES, build_synthetic, class_spec, render_class


def make_cfg(seed=0, **stream):
    return OmegaConf.create({"seed": seed, "stream": {"name": "synthetic-tiny", **stream}})


def arrays(stream: Stream):
    return [(t.train.images, t.train.labels, t.test.images, t.test.labels) for t in stream.tasks]


def test_shape_of_the_default_stream():
    s = build_synthetic(make_cfg())
    assert s.name == "synthetic-tiny" and s.modality == "image" and s.label_space == "union"
    assert s.task_names == ["task1", "task2", "task3"]
    for t in s.tasks:
        assert t.num_classes == 3
        assert t.train.images.shape == (3 * 8, 32, 32, 3) and t.train.images.dtype == np.uint8
        assert t.test.images.shape == (3 * 12, 32, 32, 3)
        assert np.bincount(t.train.labels).tolist() == [8, 8, 8]
        assert np.bincount(t.test.labels).tolist() == [12, 12, 12]
        item = t.train[0]
        assert item["image"].size == (32, 32) and item["image"].mode == "RGB" and item["label"] == 0
    names = s.all_classnames()
    assert len(set(names)) == 9 and names[:3] == ["red circle", "green square", "blue triangle"]
    assert s.tasks[0].prompts()[0] == "a picture of a red circle."
    assert len({t.template for t in s.tasks}) == 3  # one template per task
    assert s.settings["shots"] == 8 and s.settings["data_seed"] == 0


def test_deterministic_and_fast():
    start = time.perf_counter()
    a = build_synthetic(make_cfg())
    elapsed = time.perf_counter() - start
    b = build_synthetic(make_cfg())
    for xa, xb in zip(arrays(a), arrays(b)):
        for u, v in zip(xa, xb):
            assert np.array_equal(u, v)
    assert a.tasks[0].train.fingerprint() == b.tasks[0].train.fingerprint()
    assert elapsed < 1.0  # milliseconds in practice; generous bound for a loaded machine
    # a pure function of (seed, task, class, split): no dependence on global RNG state
    np.random.seed(123)
    torch.manual_seed(123)
    assert np.array_equal(render_class(0, 1, 2, 3, 5), render_class(0, 1, 2, 3, 5))


def test_seed_dependence_and_fixed_data_seed():
    a, b = build_synthetic(make_cfg(seed=0)), build_synthetic(make_cfg(seed=1))
    assert not np.array_equal(a.tasks[0].train.images, b.tasks[0].train.images)
    assert a.tasks[0].train.fingerprint() != b.tasks[0].train.fingerprint()
    assert a.all_classnames() == b.all_classnames()  # classes do not depend on the seed
    # data_seed pins the images whatever the run seed
    c, d = build_synthetic(make_cfg(seed=0, data_seed=7)), build_synthetic(make_cfg(seed=1, data_seed=7))
    assert np.array_equal(c.tasks[2].test.images, d.tasks[2].test.images)
    # train and test images differ, as do tasks
    assert not np.array_equal(a.tasks[0].train.images[:8], a.tasks[0].test.images[:8])


def test_classes_are_separable_by_colour_statistics():
    """Each class has its own colour within a task: a nearest-mean classifier on the
    foreground colour (the most saturated pixels of each image) separates test images, so
    a tiny model can learn the task."""
    s = build_synthetic(make_cfg(shots=16, test_per_class=20))

    def feats(ds):
        x = ds.images.reshape(len(ds.images), -1, 3).astype(np.float32)
        sat = x.max(-1) - x.min(-1)
        top = np.argsort(-sat, axis=1)[:, : x.shape[1] // 12]
        return np.take_along_axis(x, top[..., None], axis=1).mean(1)

    for t in s.tasks:
        tr, te = feats(t.train), feats(t.test)
        means = np.stack([tr[t.train.labels == c].mean(0) for c in range(t.num_classes)])
        pred = np.argmin(((te[:, None] - means[None]) ** 2).sum(-1), 1)
        assert (pred == t.test.labels).mean() > 0.9


@pytest.mark.parametrize("label_space", ["union", "per_task"])
def test_label_space_offsets(label_space):
    s = build_synthetic(make_cfg(label_space=label_space, num_tasks=3, classes_per_task=4))
    assert s.label_space == label_space
    if label_space == "union":
        assert [t.label_offset for t in s.tasks] == [0, 4, 8]
        assert [s.class_slice(i) for i in range(3)] == [slice(0, 12)] * 3
    else:
        assert [t.label_offset for t in s.tasks] == [0, 0, 0]
        assert [s.class_slice(i) for i in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert len(s.all_prompts()) == 12


def test_config_validation():
    with pytest.raises(StreamError, match="label_space"):
        build_synthetic(make_cfg(label_space="joint"))
    with pytest.raises(StreamError, match="at most"):
        build_synthetic(make_cfg(num_tasks=9, classes_per_task=8))
    with pytest.raises(StreamError):
        build_synthetic(make_cfg(shots=0))
    with pytest.raises(StreamError, match="templates"):
        build_synthetic(make_cfg(templates=["no placeholder"]))
    names = [class_spec(g)[0] for g in range(MAX_CLASSES)]
    assert len(set(names)) == MAX_CLASSES  # every class name is distinct


def test_tiny_clip_encodes_a_batch():
    from moram_bench.backbones.open_clip_models import build_tiny_clip

    cfg = make_cfg(image_size=32)
    cfg.backbone = {"name": "tiny-clip"}
    stream, bb = build_synthetic(cfg), build_tiny_clip(cfg)
    task = stream.tasks[1]
    pixels = torch.stack([bb.preprocess(task.train[i]["image"]) for i in range(8)])
    assert pixels.shape == (8, 3, 32, 32)
    with torch.no_grad():
        img = bb.encode_image(pixels)
        txt = bb.encode_text(bb.tokenize(task.prompts()))
    assert img.shape == (8, 32) and txt.shape == (3, 32)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    # different classes give different image features even with random weights
    assert not torch.allclose(img[0], img[-1])
