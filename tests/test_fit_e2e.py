"""End-to-end fits on the tiny synthetic stream: the run directory contract."""
import json
import subprocess
import sys

import numpy as np
import pytest

from moram_bench import metrics as M
from moram_bench import results_io
from moram_bench.__main__ import main

REQUIRED = ("last", "avg_incremental", "mtil_avg", "transfer", "bwt", "bwt_trace_clipped", "forgetting", "fwt",
            "method", "stream", "seed", "config", "versions", "train_seconds", "eval_seconds")


@pytest.mark.parametrize("method", ["moram", "seq-lora", "zeroshot"])
def test_fit_writes_the_run_directory(tiny_overrides, tmp_path, method):
    out = tmp_path / "run"
    assert main(["fit", *tiny_overrides(out, f"method={method}", "method.r=2" if method != "zeroshot" else "seed=0")]) == 0
    R, names = results_io.read_matrix_csv(out / "matrix.csv")
    assert names == ["task1", "task2", "task3"]
    assert (out / "matrix.csv").read_text().splitlines()[0] == "after_task,task1,task2,task3"
    assert [line.split(",")[0] for line in (out / "matrix.csv").read_text().splitlines()[1:]] == ["0", "1", "2", "3"]
    assert R.shape == (4, 3)
    assert ((R >= 0) & (R <= 100)).all()
    m = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED:
        assert key in m, key
    # the metrics are exactly the pure functions of the written matrix
    expected = M.compute_all(R)
    for key in ("last", "avg_incremental", "mtil_avg", "transfer", "bwt", "forgetting", "fwt"):
        assert m[key] == pytest.approx(expected[key], abs=1e-2)
    assert m["method"] == method and m["stream"] == "synthetic-tiny"
    assert m["config"]["method"]["name"] == method
    assert m["versions"]["torch"]
    events = list((out / "tensorboard").rglob("events.out.tfevents*"))
    assert events, "no TensorBoard event files"
    if method == "zeroshot":
        assert np.allclose(R, R[0])  # nothing trains: every row is the zero-shot row
        assert m["params_added"] == 0
    else:
        assert m["train_seconds"] > 0
        assert not np.allclose(R[1:], R[0])
    assert not (out / "checkpoint.pt").exists()
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if method == "moram":  # a routing method: the routing matrix after the last task
        from moram_bench.routing import read_routing_csv

        shares, names = read_routing_csv(out / "routing.csv")
        assert shares.shape == (3, 3) and names == ["task1", "task2", "task3"]


def test_one_tensorboard_run_with_global_steps_task_tags_heatmap_and_hparams(tiny_overrides, tmp_path):
    """Issue 14 item 7: one TensorBoard run per run directory (every event file in one
    folder), a global step across tasks, tags namespaced by task, the matrix heatmap as an
    image, and the method's settings with the final metrics in the HParams view."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    assert main(["fit", *tiny_overrides(out, "method=seq-lora", "method.r=2", "trainer.log_every_n_steps=1")]) == 0
    folders = {ev.parent for ev in (out / "tensorboard").rglob("events.out.tfevents*")}
    assert folders == {out / "tensorboard"}
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    steps = 5  # synthetic-tiny: iterations per task
    for t in (1, 2, 3):
        train = [e.step for e in acc.Scalars(f"train/task{t}/loss")]
        assert train and min(train) >= (t - 1) * steps and max(train) < t * steps, (t, train)  # global step
        for name in ("task1", "task2", "task3"):
            assert f"eval/after_task{t}/{name}" in tags
    assert "eval/after_task0/task1" in tags  # row 0: the untrained backbone
    assert [e.step for e in acc.Scalars("eval/avg_seen_tasks")] == [0, 5, 10, 15]
    m = json.loads((out / "metrics.json").read_text())
    assert acc.Scalars("eval/after_task3/task2")[-1].value == pytest.approx(m["matrix"][3][1], abs=1e-4)
    assert "accuracy_matrix" in acc.Tags()["images"]
    # HParams: the settings (method.r) and the final metrics
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["method"].string_value == "seq-lora" and start.hparams["method.r"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"final/last", "final/bwt"} <= {mi.name.tag for mi in experiment.metric_infos}
    assert acc.Scalars("final/last")[-1].value == pytest.approx(m["last"], abs=1e-4)


def test_finished_run_is_not_retrained_and_other_config_refused(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", *tiny_overrides(out, "method=zeroshot")]) == 0
    before = (out / "matrix.csv").read_text()
    assert main(["fit", *tiny_overrides(out, "method=zeroshot")]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["fit", *tiny_overrides(out, "method=zeroshot", "seed=5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "different config" in err and "\n" not in err
    assert (out / "matrix.csv").read_text() == before


def test_cli_errors_are_one_line_exit_2(tmp_path):
    for args in (["method=nope"], ["stream=nope"], ["bad-override"], ["method.topk=0", "stream=synthetic-tiny"]):
        p = subprocess.run([sys.executable, "-m", "moram_bench", "fit", f"output_dir={tmp_path}/x", *args],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, (args, p.stderr)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
        assert "Traceback" not in p.stderr


def test_recorded_command_is_the_one_a_user_types(monkeypatch):
    from moram_bench import runner

    monkeypatch.setattr("sys.argv", ["/some/where/moram_bench/__main__.py", "fit", "seed=1"])
    assert runner.command_line() == "python -m moram_bench fit seed=1"
    monkeypatch.setattr("sys.argv", ["pytest", "-q"])
    assert runner.command_line() == "pytest -q"
