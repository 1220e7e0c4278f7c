"""DDP with 2 CPU processes (gloo) gives exactly the matrix of 1 process (subprocesses)."""
import os
import subprocess
import sys

import pytest

from moram_bench import results_io

pytestmark = pytest.mark.slow  # subprocess fits with 1 and 2 processes


def fit(out, devices, method_args):
    cmd = [sys.executable, "-m", "moram_bench", "fit", "stream=synthetic-tiny", *method_args,
           "stream.iterations=6", f"output_dir={out}", f"cache_dir={out.parent}/cache",
           "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", f"trainer.devices={devices}",
           "trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return results_io.read_matrix_csv(out / "matrix.csv")[0]


@pytest.mark.parametrize("method_args", [
    ["method=seq-lora", "method.r=2", "method.optim.lr=0.005"],
    ["method=moram", "method.r=2", "method.optim.lr=0.001"],
], ids=["seq-lora", "moram"])
def test_two_process_ddp_equals_one_process(tmp_path, method_args):
    one = fit(tmp_path / "one", 1, method_args)
    two = fit(tmp_path / "two", 2, method_args)
    assert one.shape == two.shape == (4, 3)
    assert (one == two).all(), (one, two)
    # the comparison means something only if training changed the matrix
    assert not (one[1:] == one[0]).all()
