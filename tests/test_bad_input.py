"""Bad input: one-line error, exit code 2, no traceback, results directory intact."""
import json

import pytest

from moram_bench.__main__ import main


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(["fit", *tiny_overrides(out, "method=zeroshot")]) == 0
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["method=nope"], "unknown method 'nope'"),
    (["stream=nope"], "unknown stream 'nope'"),
    (["backbone=nope"], "unknown backbone 'nope'"),
    (["seed=abc"], "wrong type"),
    (["method.nope=1"], "unknown config key 'method.nope'"),
    (["trainer.devicez=1"], "unknown config key 'trainer.devicez'"),
    (["method=moram", "method.topk=0"], "method.topk must be >= 1"),
    (["method=moram", "method.tau=0"], "method.tau must be > 0"),
    (["method=moram", "method.r=0"], "method.r must be >= 1"),
    (["method=seq-lora", "method.r=0"], "method.r must be >= 1"),
    (["trainer.accelerator=gpu"], "no usable GPU"),
    (["trainer.devices=512"], "has only"),
    (["stream=xtail"], "data_dir"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_results_intact(tiny_overrides, finished_run, capsys, args, fragment):
    before = snapshot(finished_run)
    # pointed at the finished run's directory: nothing there may change
    code = main(["fit", *tiny_overrides(finished_run, "method=zeroshot"), *args])
    assert code == 2
    assert fragment in one_line_error(capsys)
    assert snapshot(finished_run) == before


def test_task_with_no_samples(tiny_overrides, tmp_path, capsys):
    import numpy as np

    from moram_bench.streams.base import ArrayImageSet, Stream, StreamError, Task

    assert main(["fit", *tiny_overrides(tmp_path / "out", "stream.shots=0")]) == 2
    assert "shots >= 1" in one_line_error(capsys)
    assert not (tmp_path / "out" / "matrix.csv").exists()
    empty = ArrayImageSet(np.zeros((0, 4, 4, 3), np.uint8), [])
    full = ArrayImageSet(np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    with pytest.raises(StreamError, match="task 'b' of stream 's' has no training samples"):
        Stream("s", "image", [Task("a", full, full, ["x", "y"]), Task("b", empty, full, ["z"])])


def test_malformed_yaml_config(tiny_overrides, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: moram\n")
    assert main(["fit", "--config", str(bad), *tiny_overrides(tmp_path / "out")]) == 2
    assert "malformed YAML" in one_line_error(capsys)


def test_missing_and_corrupt_data_files(tiny_overrides, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "eurosat").mkdir(parents=True)
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text("{not json")
    assert main(["fit", "stream=xtail", f"data_dir={root}", *tiny_overrides(tmp_path / "out")[1:]]) == 2
    line = one_line_error(capsys)
    assert str(root) in line


def test_unwritable_output_dir(tiny_overrides, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["fit", *tiny_overrides(blocker / "run", "method=zeroshot")]) == 2
    assert "not writable" in one_line_error(capsys)


def test_checkpoint_from_another_method_is_refused(tiny_overrides, tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    assert main(["fit", *tiny_overrides(out, "method=zeroshot")]) == 0
    state = json.loads((out / "run_state.json").read_text())
    state["finished"], state["completed_tasks"] = False, 1
    (out / "run_state.json").write_text(json.dumps(state))
    torch.save({"method": "moram", "stream": "synthetic-tiny", "completed_tasks": 1}, out / "checkpoint.pt")
    before = snapshot(out)
    assert main(["fit", *tiny_overrides(out, "method=zeroshot")]) == 2
    line = one_line_error(capsys)
    assert "checkpoint" in line and "moram" in line
    assert snapshot(out) == before


def test_non_finite_loss_names_task_and_step_and_keeps_rows(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["fit", *tiny_overrides(out, "method=seq-lora", "method.r=2", "method.optim.lr=1e30")])
    assert code == 1
    line = one_line_error(capsys)
    assert "non-finite loss" in line and "task 1" in line and "step" in line
    from moram_bench import results_io

    rows, _ = results_io.read_matrix_csv(out / "matrix.csv")
    assert rows.shape[0] >= 1  # row 0 (and any finished task) kept
