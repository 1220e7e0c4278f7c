"""Resume after a crash: kill -9 during task 2, start again, same matrix as a straight run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moram_bench import results_io

pytestmark = pytest.mark.slow  # subprocess fits

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fit_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moram_bench", "fit", "stream=synthetic-tiny", "method=moram", "method.r=2",
            "stream.iterations=6", "method.optim.lr=0.01", f"output_dir={out}", f"cache_dir={out.parent}/cache",
            "trainer.enable_progress_bar=false", "trainer.num_threads=1", *extra]


def completed_tasks(out: Path) -> int:
    try:
        return json.loads((out / "run_state.json").read_text())["completed_tasks"]
    except (OSError, ValueError, KeyError):
        return -1


def test_kill_during_task_2_then_resume_equals_straight_run(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(fit_cmd(straight), check=True, env=ENV, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    # slow the second task down so the kill lands inside it
    proc = subprocess.Popen(fit_cmd(killed, "stream.iterations=6"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while completed_tasks(killed) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert completed_tasks(killed) in (1, 2)
    # the matrix on disk is never truncated: it parses and holds whole rows only
    rows, names = results_io.read_matrix_csv(killed / "matrix.csv")
    assert rows.shape[1] == 3 and rows.shape[0] >= 2

    p = subprocess.run(fit_cmd(killed), env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stdout
    a, _ = results_io.read_matrix_csv(straight / "matrix.csv")
    b, _ = results_io.read_matrix_csv(killed / "matrix.csv")
    assert a.shape == b.shape == (4, 3)
    assert (a == b).all(), (a, b)
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    assert ma["last"] == mb["last"] and ma["bwt"] == mb["bwt"]


def test_same_config_twice_gives_the_same_matrix(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        subprocess.run(fit_cmd(out), check=True, env=ENV, capture_output=True, timeout=600)
    a, _ = results_io.read_matrix_csv(outs[0] / "matrix.csv")
    b, _ = results_io.read_matrix_csv(outs[1] / "matrix.csv")
    assert (a == b).all()
