"""`python -m moram_bench rehearse`: the synthetic data folder has the real layout, classes and
split sizes (the real loaders and check-data read it), the run goes through the normal
runner with the whole label space, and the report projects the full run from what it
measured. The architecture is shrunk here (tiny CLIP / a 2-layer Llama shape) to keep CI
short; the command's defaults use ViT-B/16 and SmolLM2-135M's shape."""
import json

import pytest
import torch

from moram_bench import rehearse as R
from moram_bench.check_data import check_stream
from moram_bench.config import resolve_config
from moram_bench.streams.trace import TRACE_TASKS


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_image_layouts_have_the_real_classes_and_split_sizes(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    for d in ("aircraft", "eurosat", "sun397", "mnist"):
        R.write_image_domain(tmp_path, d, rng)
    cfg = resolve_config(["stream=mtil", f"data_dir={tmp_path}", "stream.domains=[aircraft,eurosat,sun397,mnist]"])
    report = check_stream(cfg)
    assert report.ok, report.format()
    counts = {d.domain: d.counts for d in report.domains}
    for d, k in (("aircraft", 100), ("eurosat", 10), ("sun397", 397)):
        train, val, test = R.SPLIT_SIZES[d]
        assert counts[d] == {"classes": k, "train": train, "val": val, "test": test}
    assert counts["mnist"] == {"classes": 10, "train": 60000, "test": 10000}


@pytest.mark.slow
def test_xtail_rehearsal_scores_all_1100_classes_and_projects_the_full_run(tmp_path):
    r = R.rehearse("xtail", ["backbone=tiny-clip", "stream.batch_size=4", "trainer.num_threads=1"], tmp_path,
                   steps=2, test_items=2, echo=lambda s: None)
    assert [t["task"] for t in r["tasks"]] == ["aircraft", "caltech101", "dtd", "eurosat", "oxford_flowers", "food101",
                                               "mnist", "oxford_pets", "stanford_cars", "sun397"]
    assert all(t["label_space"] == 1100 for t in r["tasks"])  # the union label space, whole
    assert all(t["steps_measured"] == 2 and t["step_s"] > 0 and t["eval_pass_s"] > 0 for t in r["tasks"])
    added = [t["params_added"] for t in r["tasks"]]
    assert added == sorted(added) and added[-1] == 10 * added[0]  # MoRAM grows by one task's atoms per task
    assert r["full_steps"] == [500] * 10
    assert r["full_test_items"] == [R.SPLIT_SIZES[d][2] for d in
                                    ("aircraft", "caltech101", "dtd", "eurosat", "oxford_flowers", "food101", "mnist",
                                     "oxford_pets", "stanford_cars", "sun397")]
    # the projection is the measured step times times the real steps, plus 11 full passes
    train = sum(500 * t["step_s"] for t in r["tasks"])
    assert r["projected_train_s"] == pytest.approx(train)
    per_pass = r["eval_fixed_per_pass_s"] + sum(a * b for a, b in zip(r["eval_per_item_s"], r["full_test_items"]))
    assert r["projected_eval_s"] == pytest.approx(11 * per_pass, rel=1e-3)
    saved = json.loads((tmp_path / "rehearsal.json").read_text())
    assert saved["projected_total_s"] == pytest.approx(r["projected_total_s"])
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test_samples_per_task"] == [2] * 10 and m["stream_settings"]["num_classes"] == 1100


@pytest.mark.slow
def test_trace_rehearsal_with_a_small_llama_shape_stops_after_two_tasks(tmp_path):
    shape = ["backbone.hidden_size=32", "backbone.intermediate_size=64", "backbone.num_layers=2",
             "backbone.num_heads=2", "backbone.num_kv_heads=1", "stream.batch_size=2", "trainer.num_threads=1",
             "stream.max_new_tokens=4"]
    r = R.rehearse("trace", shape, tmp_path, steps=1, test_items=1, max_tasks=2, random_llm=True, echo=lambda s: None)
    assert r["backbone"] == "tiny-llama" and r["stopped_early"] and r["tasks_measured"] == 2
    assert [t["task"] for t in r["tasks"]] == ["C-STANCE", "FOMC"]
    assert r["full_test_items"] == [2000] * 8
    # the real schedule: epochs 2,1,3,2,1,2,2,3 of 5,000 samples at the real batch (overridden to 2 here)
    assert r["full_steps"] == [e * 2500 for e in (2, 1, 3, 2, 1, 2, 2, 3)]
    assert r["projected_total_s"] > r["projected_train_s"] > 0
    for name in TRACE_TASKS:
        recs = json.loads((tmp_path / "data" / name / "test.json").read_text())
        assert len(recs) == 2000 and set(recs[0]) == {"prompt", "answer"}


def test_bad_arguments_are_one_line_errors(capsys):
    assert R.main(["stream=xtail-mini"]) == 2
    assert R.main(["stream=xtail", "--steps", "0"]) == 2
    assert R.main(["stream=xtail", "data_dir=/x"]) == 2
    assert capsys.readouterr().err.count("error:") == 3
