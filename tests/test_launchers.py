"""Sweep launchers: `launcher=local workers=2` gives exactly the sequential sweep's matrices;
submitit's local executor runs the job function the SLURM path submits; the sbatch script
of a 3-point grid carries what conf/launcher/slurm.yaml and the command line asked for;
re-running submits only unfinished points; `--status` per point; a job that receives the
time-limit signal mid-run is requeued and resumes to the same matrix."""
import json
import os
import pickle
import signal
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moram_bench import launchers
from moram_bench import results_io
from moram_bench.errors import ConfigError
from moram_bench.sweep import main as sweep_main
from moram_bench.sweep import plan_sweep

TINY = ["stream=synthetic-tiny", "stream.iterations=3", "trainer.enable_progress_bar=false", "trainer.num_threads=1"]


def matrices(results: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(results)): results_io.read_matrix_csv(p)[0] for p in sorted(results.rglob("matrix.csv"))}


def test_launcher_arguments_are_taken_out_of_the_fit_overrides():
    cfg, rest = launchers.split_launcher_args(["method=moram", "launcher=local", "workers=3", "seed=0,1"])
    assert cfg.name == "local" and cfg.workers == 3 and rest == ["method=moram", "seed=0,1"]
    cfg, rest = launchers.split_launcher_args(["launcher=slurm", "launcher.partition=gpu", "launcher.time_min=90"])
    assert (cfg.name, cfg.partition, cfg.time_min, cfg.max_requeues) == ("slurm", "gpu", 90, 3) and rest == []
    assert launchers.split_launcher_args(["seed=1"])[0].name == "sequential"
    with pytest.raises(ConfigError, match="unknown launcher 'pbs'"):
        launchers.split_launcher_args(["launcher=pbs"])
    with pytest.raises(ConfigError, match="has no setting 'partitoin'"):
        launchers.split_launcher_args(["launcher=slurm", "launcher.partitoin=gpu"])
    with pytest.raises(ConfigError, match="workers must be a positive integer"):
        launchers.split_launcher_args(["launcher=local", "workers=0"])
    env = launchers.worker_env(3, 2, ["4", "5"], None)
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    assert launchers.worker_env(0, 2, [], 3)["OMP_NUM_THREADS"] == "3"


@pytest.mark.slow
def test_local_launcher_with_two_workers_gives_the_sequential_matrices(tmp_path, capsys):
    grid = [*TINY, "method=moram,seq-lora", "seed=0", f"cache_dir={tmp_path / 'cache'}"]
    assert sweep_main([*grid, "--results", str(tmp_path / "seq")]) == 0
    assert sweep_main([*grid, "launcher=local", "workers=2", "--results", str(tmp_path / "par")]) == 0
    out = capsys.readouterr().out
    assert "2 at a time" in out and "sweep: 2 run(s) finished now" in out
    seq, par = matrices(tmp_path / "seq"), matrices(tmp_path / "par")
    assert sorted(seq) == sorted(par) and len(seq) == 2
    for k in seq:
        assert np.array_equal(seq[k], par[k]), k
    # a second run skips both, and --status says finished
    assert sweep_main([*grid, "launcher=local", "workers=2", "--results", str(tmp_path / "par")]) == 0
    assert sweep_main([*grid, "--status", "--results", str(tmp_path / "par")]) == 0
    assert capsys.readouterr().out.count(": finished (") == 2


# ---- SLURM through submitit, with fake sbatch/srun/sacct on PATH ----------------------------------
def _script(path: Path, text: str) -> None:
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch`` keeps each script it gets and answers job ids 4242, 4243...; ``sacct``
    answers the states written in ``states.txt``."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (tmp_path / "next_id").write_text("4242")
    _script(bin_ / "srun", "exit 0\n")
    _script(bin_ / "sbatch", f'id=$(cat {tmp_path}/next_id); cp "$1" {tmp_path}/sbatch-$id.sh; '
                             f'echo $((id+1)) > {tmp_path}/next_id; echo "Submitted batch job $id"\n')
    _script(bin_ / "sacct", f'echo "JobID|State|NodeList"; cat {tmp_path}/states.txt 2>/dev/null; exit 0\n')
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_slurm_launcher_without_slurm_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    assert sweep_main([*TINY, "launcher=slurm", "--results", str(tmp_path / "r")]) == 2
    assert "error: launcher=slurm: no SLURM here (srun not found)" in capsys.readouterr().err


def _submissions(folder: Path) -> list:
    return [pickle.loads(p.read_bytes()) for p in sorted(folder.rglob("*_submitted.pkl"))]


def test_slurm_sbatch_script_of_a_3_point_grid_and_resubmission(fake_slurm, capsys):
    results = fake_slurm / "results"
    grid = [*TINY, "method=moram,seq-lora,inflora", "seed=0", "launcher=slurm", "launcher.partition=gpu",
            "launcher.time_min=90", "launcher.mem_gb=32", "launcher.cpus_per_task=4", "launcher.qos=high",
            "launcher.setup=[module load cuda]", "--results", str(results)]
    assert sweep_main(grid) == 0
    out = capsys.readouterr().out
    assert "submitted SLURM job array 4242: 3 array task(s)" in out and str(results / "slurm") in out
    script = (fake_slurm / "sbatch-4242.sh").read_text()
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --mem=32GB",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --qos=high", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1", "#SBATCH --signal=USR2@120",
                 "#SBATCH --job-name=moram_bench", "module load cuda"):
        assert line in script.splitlines(), line
    command = script.strip().splitlines()[-1]
    assert command.startswith("srun --unbuffered") and f"{sys.executable} -u -m submitit.core._submit" in command
    # each array task runs FitJob on its own grid point
    jobs = [d.function for d in _submissions(results / "slurm")]
    assert all(isinstance(j, launchers.FitJob) for j in jobs)
    methods = sorted(next(o for o in j.overrides if o.startswith("method=")) for j in jobs)
    assert methods == ["method=inflora", "method=moram", "method=seq-lora"]
    assert sorted(Path(j.output_dir).parts[-2] for j in jobs) == ["inflora", "moram", "seq-lora"]

    # status: one queued, one running, one failed (with the last line of its log)
    points = plan_sweep([*TINY, "method=moram,seq-lora,inflora", "seed=0"], results=str(results), running_ok=True)
    rec = json.loads(next((results / "sweeps").glob("launcher-slurm-4242.json")).read_text())
    by_method = {Path(d).parts[-2]: r for d, r in rec["points"].items()}
    Path(by_method["inflora"]["err"]).parent.mkdir(parents=True, exist_ok=True)
    Path(by_method["inflora"]["err"]).write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
    ids = {m: r["job_id"] for m, r in by_method.items()}
    (fake_slurm / "states.txt").write_text(f"{ids['moram']}|PENDING|\n{ids['seq-lora']}|RUNNING|node1\n"
                                           f"{ids['inflora']}|FAILED|node2\n")
    launchers.print_status(points, results)
    status = capsys.readouterr().out
    assert "moram on synthetic-tiny seed 0: queued" in status
    assert "seq-lora on synthetic-tiny seed 0: running" in status
    assert "inflora on synthetic-tiny seed 0: failed (job 4242_2 FAILED: RuntimeError: CUDA out of memory)" in status
    # the same command again submits only the failed point (a single job, no array)
    assert sweep_main(grid) == 0
    out = capsys.readouterr().out
    assert "queued, not submitted" in out and "running, not submitted" in out
    script = (fake_slurm / "sbatch-4243.sh").read_text()
    assert "--array" not in script
    new = [d.function for d in _submissions(results / "slurm" / "4243")]
    assert len(new) == 1 and "method=inflora" in new[0].overrides


def _fit_job(tmp_path, name, iterations):
    over = [*TINY[:1], f"stream.iterations={iterations}", *TINY[2:], "method=moram", "seed=0",
            f"cache_dir={tmp_path / 'cache'}"]
    return launchers.FitJob(over, str(tmp_path / name))


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
def test_submitit_local_executor_runs_the_job_function_and_a_preempted_job_resumes(tmp_path):
    submitit = pytest.importorskip("submitit")
    straight = _fit_job(tmp_path, "straight", 12)
    assert straight()["attempt"] == 1  # the job function in this process

    ex = submitit.LocalExecutor(folder=str(tmp_path / "submitit" / "%j"))
    ex.update_parameters(timeout_min=30)
    job = ex.submit(_fit_job(tmp_path, "preempted", 12))
    state = tmp_path / "preempted" / "run_state.json"
    deadline = time.time() + 600
    while time.time() < deadline:  # wait for the first finished task, then signal mid-run
        try:
            if json.loads(state.read_text()).get("completed_tasks", 0) >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    tasks = _children(int(job.job_id))
    assert tasks, "no job process found"
    os.kill(tasks[0], signal.SIGUSR2)  # what SLURM sends signal_delay_s before the time limit
    result = job.result()
    assert result["attempt"] == 2  # checkpointed, requeued and started again
    log = Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert "resuming" in log and "Requeued" in log
    a = results_io.read_matrix_csv(tmp_path / "straight" / "matrix.csv")[0]
    b = results_io.read_matrix_csv(tmp_path / "preempted" / "matrix.csv")[0]
    assert np.array_equal(a, b)
    assert json.loads(state.read_text())["finished"] is True
