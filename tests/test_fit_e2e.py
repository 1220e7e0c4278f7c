"""End-to-end fits on the tiny synthetic stream: the run directory contract."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides
from moram_bench import metrics as M
from moram_bench.__main__ import main

REQUIRED = ("last", "avg_incremental", "mtil_avg", "transfer", "bwt", "bwt_trace_clipped", "forgetting", "fwt",
            "method", "stream", "seed", "config", "versions", "train_seconds", "eval_seconds")


def read_matrix(path: Path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], np.array([[float(v) for v in r[1:]] for r in rows[1:]]), [r[0] for r in rows[1:]]


@pytest.mark.parametrize("method", ["moram", "seq-lora", "zeroshot"])
def test_fit_writes_the_run_directory(tmp_path, method):
    out = tmp_path / "run"
    assert main(["fit", *tiny_overrides(out, f"method={method}", "method.r=2" if method != "zeroshot" else "seed=0")]) == 0
    header, R, idx = read_matrix(out / "matrix.csv")
    assert header == ["after_task", "task1", "task2", "task3"]
    assert idx == ["0", "1", "2", "3"] and R.shape == (4, 3)
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


def test_per_task_scalars_do_not_overwrite(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["fit", *tiny_overrides(out, "method=seq-lora", "method.r=2", "trainer.log_every_n_steps=1")]) == 0
    tags = set()
    for ev in (out / "tensorboard").rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(ev.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for t in (1, 2, 3):
        assert f"train/task{t}/loss" in tags
    assert "eval/task1" in tags and "eval/avg_seen_tasks" in tags


def test_finished_run_is_not_retrained_and_other_config_refused(tmp_path, capsys):
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
