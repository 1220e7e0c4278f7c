"""The X-TAIL and MTIL streams on fixtures of a few domains: few-shot sampling, label
spaces, recorded settings, check-data and require_data, and an end-to-end fit."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from moram_bench.check_data import check_stream, main as check_main, require_data
from moram_bench.config import resolve_config
from moram_bench.streams.base import StreamError, few_shot_indices
from moram_bench.streams.xtail import MTIL_DOMAINS, XTAIL_DOMAINS
from test_coop_loaders import make_domain

DOMAINS = ["aircraft", "dtd", "mnist"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """aircraft (3 classes), dtd (3), mnist (10), with 20 training samples per class."""
    d = tmp_path_factory.mktemp("data")
    for dom in DOMAINS:
        make_domain(d, dom, train_per_class=20, test_per_class=2)
    return d


def cfg_for(root, stream="xtail", *extra):
    return resolve_config([f"stream={stream}", f"data_dir={root}", f"stream.domains=[{','.join(DOMAINS)}]", *extra])


def build(cfg):
    from moram_bench import registry

    return registry.STREAMS[cfg.stream.name](cfg)


def train_paths(task):
    base = task.train.base
    return [base.paths[i] if hasattr(base, "paths") else int(i) for i in task.train.indices]


# ---- the protocol ---------------------------------------------------------------------------
def test_official_orders():
    assert XTAIL_DOMAINS == ("aircraft", "caltech101", "dtd", "eurosat", "oxford_flowers", "food101", "mnist",
                             "oxford_pets", "stanford_cars", "sun397")
    assert MTIL_DOMAINS == ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "oxford_flowers", "food101",
                            "mnist", "oxford_pets", "stanford_cars", "sun397")
    cfg = resolve_config(["stream=xtail"])
    assert cfg.stream.shots == 16 and cfg.stream.backbone == "clip-vit-b16" and cfg.stream.modality == "image"
    assert cfg.stream.iterations > 0 and cfg.stream.batch_size > 0
    cfg = resolve_config(["stream=mtil"])
    assert cfg.stream.shots is None and cfg.stream.backbone == "clip-vit-b16"


def test_xtail_union_label_space_offsets_and_settings(root):
    s = build(cfg_for(root, "xtail", "stream.shots=4"))
    assert s.task_names == DOMAINS and s.label_space == "union" and s.modality == "image"
    assert [t.num_classes for t in s.tasks] == [3, 3, 10]
    assert [t.label_offset for t in s.tasks] == [0, 3, 6]
    assert s.class_slice(1) == slice(0, 16)  # every task scored over all 16 classes
    assert len(s.all_prompts()) == 16
    assert s.all_prompts()[0] == "a photo of a 707-320, a type of aircraft."
    assert s.all_prompts()[3] == "banded texture."
    assert s.all_prompts()[6] == 'a photo of the number: "number: "0 - zero"".'  # the official MNIST names
    for t in s.tasks:
        counts = np.bincount(t.train.labels, minlength=t.num_classes)
        assert (counts == 4).all()  # 4 shots per class
        assert len(t.test) == 2 * t.num_classes  # full test split
    st = s.settings
    assert st["shots"] == 4 and st["shot_seed"] == 1 and st["domains"] == DOMAINS
    assert st["label_space"] == "union" and st["num_classes"] == 16 and st["test"] == "full"
    assert st["templates"]["dtd"] == "{} texture." and st["domain_id_at_test"] is False
    assert st["per_domain"]["mnist"] == {"classes": 10, "train": 40, "test": 20,
                                          "classnames_sha": st["per_domain"]["mnist"]["classnames_sha"]}
    json.dumps(st)  # recorded in metrics.json


def test_few_shot_draw_is_deterministic_and_depends_only_on_shot_seed(root):
    a = build(cfg_for(root, "xtail", "stream.shots=4"))
    b = build(cfg_for(root, "xtail", "stream.shots=4", "seed=123"))  # another run seed: same samples
    c = build(cfg_for(root, "xtail", "stream.shots=4", "stream.shot_seed=2"))
    for ta, tb in zip(a.tasks, b.tasks):
        assert train_paths(ta) == train_paths(tb)
    assert any(train_paths(ta) != train_paths(tc) for ta, tc in zip(a.tasks, c.tasks))
    # the draw of a domain does not depend on which other domains the stream holds, or their order
    d = build(resolve_config(["stream=xtail", f"data_dir={root}", "stream.domains=[mnist,dtd]", "stream.shots=4"]))
    assert train_paths(d.tasks[0]) == train_paths(a.tasks[2])
    assert train_paths(d.tasks[1]) == train_paths(a.tasks[1])
    # and the sampler itself
    labels = np.repeat(np.arange(5), 30)
    x, y = few_shot_indices(labels, 16, 1), few_shot_indices(labels, 16, 1)
    assert np.array_equal(x, y) and len(x) == 80
    assert not np.array_equal(x, few_shot_indices(labels, 16, 2))
    assert (np.bincount(labels[x]) == 16).all()


def test_mtil_is_full_shot_with_per_domain_label_spaces(root):
    s = build(cfg_for(root, "mtil"))
    assert s.label_space == "per_task" and s.settings["shots"] == "all"
    assert [t.label_offset for t in s.tasks] == [0, 0, 0]
    assert [len(t.train) for t in s.tasks] == [60, 60, 200]
    assert s.class_slice(2) == slice(6, 16)


def test_max_test_per_domain_is_a_fixed_subset(root):
    s1 = build(cfg_for(root, "xtail", "stream.max_test_per_domain=5"))
    s2 = build(cfg_for(root, "xtail", "stream.max_test_per_domain=5", "seed=7"))
    assert [len(t.test) for t in s1.tasks] == [5, 5, 5]
    assert all(np.array_equal(a.test.indices, b.test.indices) for a, b in zip(s1.tasks, s2.tasks))
    assert s1.settings["max_test_per_domain"] == 5


def test_bad_stream_settings(root):
    with pytest.raises(StreamError, match="unknown domain 'imagenet'"):
        build(resolve_config(["stream=xtail", f"data_dir={root}", "stream.domains=[dtd,imagenet]"]))
    with pytest.raises(StreamError, match="appears twice"):
        build(resolve_config(["stream=xtail", f"data_dir={root}", "stream.domains=[dtd,dtd]"]))
    with pytest.raises(StreamError, match="positive integer"):
        build(cfg_for(root, "xtail", "stream.shots=0"))
    with pytest.raises(StreamError, match="set data_dir"):
        build(resolve_config(["stream=xtail", "stream.domains=[dtd]"]))


# ---- check-data -----------------------------------------------------------------------------
def test_check_data_reports_found_missing_malformed(tmp_path, capsys):
    make_domain(tmp_path, "aircraft")
    make_domain(tmp_path, "dtd")
    split = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split.write_text("{corrupt")
    args = ["stream=xtail", f"data_dir={tmp_path}", "stream.domains=[aircraft,dtd,eurosat]"]
    report = check_stream(resolve_config(args))
    by = {d.domain: d for d in report.domains}
    assert by["aircraft"].status == "found" and by["aircraft"].counts["classes"] == 3
    assert by["dtd"].status == "malformed" and by["dtd"].path == str(split)
    assert by["eurosat"].status == "missing" and by["eurosat"].path == str(tmp_path / "eurosat")
    assert not report.ok

    assert check_main(args) == 2
    out = capsys.readouterr().out
    assert "1 found, 1 missing, 1 malformed" in out
    assert str(split) in out and str(tmp_path / "eurosat") in out

    with pytest.raises(StreamError) as e:
        require_data(resolve_config(args))
    msg = str(e.value)
    assert "\n" not in msg and "dtd: malformed" in msg and str(split) in msg and "1 more" in msg

    # a partial download: the split file is fine but a class folder is gone
    make_domain(tmp_path, "eurosat")
    import shutil
    shutil.rmtree(tmp_path / "eurosat" / "2750" / "Forest")
    r = check_stream(resolve_config(args)).domains[2]
    assert r.status == "missing" and r.path == str(tmp_path / "eurosat" / "2750" / "Forest")


def test_check_data_all_found_and_verify_images(tmp_path, capsys):
    for d in ("aircraft", "mnist"):
        make_domain(tmp_path, d)
    args = ["stream=xtail", f"data_dir={tmp_path}", "stream.domains=[aircraft,mnist]"]
    assert check_main(args) == 0
    out = capsys.readouterr().out
    assert "2 found, 0 missing, 0 malformed" in out and "found      " + str(tmp_path / "fgvc_aircraft") in out
    require_data(resolve_config(args))  # no problem: returns quietly

    assert check_main(["--verify-images", *args]) == 0
    assert "all 24 listed images exist" in capsys.readouterr().out
    gone = sorted((tmp_path / "fgvc_aircraft" / "images").iterdir())[:2]
    for p in gone:
        p.unlink()
    assert check_main(args) == 0  # existence of single images is only checked on request
    capsys.readouterr()
    assert check_main(["--verify-images", *args]) == 2
    out = capsys.readouterr().out
    assert "2 of 24 listed images not found" in out and str(gone[0]) in out


def test_check_data_usage_errors(tmp_path, capsys):
    assert check_main(["stream=xtail"]) == 2
    assert "set data_dir=PATH" in capsys.readouterr().out
    assert check_main(["stream=xtail", f"data_dir={tmp_path}/nope"]) == 2
    assert f"data_dir not found: {tmp_path}/nope" in capsys.readouterr().out
    assert check_main(["stream=xtail", f"data_dir={tmp_path}", "stream.domains=[nope]"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown domain 'nope'")
    assert check_main(["stream=xtail", "stream.nope=1"]) == 2
    # streams with bundled/synthetic data have nothing to check
    report = check_stream(resolve_config(["stream=synthetic-tiny"]))
    assert report.ok and not report.checked
    require_data(resolve_config(["stream=synthetic-tiny"]))


# ---- end to end -----------------------------------------------------------------------------
def _tiny_clip_registered() -> bool:
    """The only thing that may be missing: the tiny-clip backbone. Any other failure (a
    broken import of the runner or a backbone module) is an error, not a skip."""
    import moram_bench.runner  # noqa: F401
    from moram_bench import registry

    registry.discover()
    return "tiny-clip" in registry.BACKBONES


@pytest.mark.skipif(not _tiny_clip_registered(), reason="the tiny-clip backbone is not registered")
def test_xtail_fit_end_to_end(root, tmp_path):
    from moram_bench.__main__ import main

    out = tmp_path / "run"
    code = main(["fit", "stream=xtail", f"data_dir={root}", "backbone=tiny-clip",
                 f"stream.domains=[{','.join(DOMAINS)}]", "stream.iterations=2", "stream.batch_size=8", "method.r=2",
                 f"output_dir={out}", f"cache_dir={tmp_path}/cache", "trainer.enable_progress_bar=false"])
    assert code == 0
    with open(out / "matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after_task", *DOMAINS]
    R = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    assert R.shape == (4, 3) and ((R >= 0) & (R <= 100)).all()
    m = json.loads((out / "metrics.json").read_text())
    assert m["stream_settings"]["label_space"] == "union"
    assert m["stream_settings"]["num_classes"] == 16 and m["stream_settings"]["shot_seed"] == 1
