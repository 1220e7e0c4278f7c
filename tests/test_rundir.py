"""The run directory (issue 17 items 1-5): nothing lost, nothing reported that did not happen.

overwrite=true validates everything before touching the old run and keeps it aside until
the new one finishes a task; SIGTERM / SIGINT give 143 / 130 with the last finished task's
checkpoint intact, also while Lightning trains; one writer per run directory (a lock file
naming its owner, stale locks taken over); a read-only run folder is refused before training.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moram_bench import rundir
from moram_bench.__main__ import main
from moram_bench.errors import ConfigError


def snapshot(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_zeroshot(tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(["fit", *tiny_overrides(out, "method=zeroshot")]) == 0
    return out


# ---- item 1: overwrite ------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["method=moram", "method.targets=[nomatch]"], "nomatch"),
    (["stream.classes_per_task=100"], "classes"),
    (["trainer.precision=bogus"], "precision"),
])
def test_overwrite_with_a_failing_config_keeps_the_finished_run(tiny_overrides, finished_zeroshot, capsys,
                                                                args, fragment):
    before = snapshot(finished_zeroshot)
    code = main(["fit", *tiny_overrides(finished_zeroshot, "method=zeroshot"), "overwrite=true", *args])
    assert code == 2
    assert fragment in one_line_error(capsys)
    assert snapshot(finished_zeroshot) == before


def test_a_failed_new_run_leaves_no_folder_it_created_behind(tiny_overrides, tmp_path, capsys, monkeypatch):
    from moram_bench import runner

    def fail(self, plan, start):  # an error after the run folder was made (e.g. unreadable data)
        raise ConfigError("the data could not be read")

    monkeypatch.setattr(runner.Run, "execute", fail)
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deeper" / "run"
    assert main(["fit", *tiny_overrides(out, "method=seq-lora")]) == 2
    assert "could not be read" in one_line_error(capsys)
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())  # the parents it made: gone


def test_a_replaced_run_is_put_back_when_the_new_one_fails_before_its_first_task(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("matrix.csv", "metrics.json", "run_state.json"):
        (out / name).write_text(f"old {name}")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events").write_text("old events")
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="boom"):
        with rundir.RunDir(rundir.Plan(out, "replace")):
            assert (out / ".replaced" / "matrix.csv").read_text() == "old matrix.csv"
            assert not (out / "matrix.csv").exists()
            (out / "matrix.csv").write_text("new row 0")  # the new run's row 0, then a failure
            raise RuntimeError("boom")
    assert snapshot(out) == before and not (out / ".replaced").exists() and not (out / "run.lock").exists()

    # a replacement killed (-9) before its first task is undone by the next start
    (out / ".replaced").mkdir()
    for name in ("matrix.csv", "metrics.json", "run_state.json"):
        os.replace(out / name, out / ".replaced" / name)
    (out / "matrix.csv").write_text("row 0 of a killed replacement")
    with rundir.RunDir(rundir.Plan(out, "new")):
        pass
    assert (out / "matrix.csv").read_text() == "old matrix.csv" and not (out / ".replaced").exists()

    # the replaced run goes once the new one has finished a task
    with rundir.RunDir(rundir.Plan(out, "replace")) as rd:
        rd.task_done(0)
        assert (out / ".replaced").is_dir()
        rd.task_done(1)
        assert not (out / ".replaced").exists()


def test_overwrite_replaces_even_an_unreadable_state_and_a_file_is_no_run_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_state.json").write_text("[1, 2]")  # a list, not a state
    overwrite = type("Cfg", (), {"overwrite": True})()
    assert rundir.plan_run(overwrite, out).action == "replace"
    with pytest.raises(ConfigError, match="does not hold a run state.*overwrite=true"):
        rundir.plan_run(type("Cfg", (), {"overwrite": False})(), out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        rundir.plan_run(overwrite, tmp_path / "file")


def test_overwrite_replaces_a_finished_run_and_leaves_nothing_aside(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", *tiny_overrides(out, "method=zeroshot")]) == 0
    assert main(["fit", *tiny_overrides(out, "method=zeroshot"), "overwrite=true"]) == 0
    assert "kept in .replaced/ until this one finishes its first task" in capsys.readouterr().out
    assert not (out / ".replaced").exists() and not (out / "run.lock").exists()
    assert json.loads((out / "run_state.json").read_text())["finished"] is True


# ---- item 4: one writer -------------------------------------------------------------------------
def test_lock_refuses_a_second_writer_and_takes_over_a_stale_lock(tmp_path, capsys):
    path = tmp_path / "run.lock"
    with rundir.RunLock(path):
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
            rundir.RunLock(path).acquire()
        assert rundir.RunLock(path).live_owner().startswith(f"pid {os.getpid()}")
    assert not path.exists()  # released on exit
    # a lock file left by a dead process (kill -9): nobody holds it, it is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert rundir.RunLock(path).live_owner() is None
    with rundir.RunLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"took over the stale lock of pid {int(dead.stdout)}" in capsys.readouterr().out


def test_fit_into_a_locked_run_directory_is_refused_with_the_owner(tiny_overrides, finished_zeroshot, tmp_path,
                                                                   capsys):
    out = tmp_path / "run"
    out.mkdir()
    with rundir.RunLock(out / "run.lock"):
        assert main(["fit", *tiny_overrides(out, "method=zeroshot")]) == 2
        line = one_line_error(capsys)
        assert f"is in use by pid {os.getpid()} on {socket.gethostname()}" in line
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


# ---- item 5: read-only run folder ----------------------------------------------------------------
def test_resuming_into_a_read_only_run_folder_fails_before_training(tiny_overrides, tmp_path, capsys, monkeypatch):
    from moram_bench.config import resolve_config

    out = tmp_path / "run"
    out.mkdir()
    cfg = resolve_config(tiny_overrides(out, "method=seq-lora", "method.r=2"))
    (out / "run_state.json").write_text(json.dumps({"config_hash": rundir.config_hash(cfg), "config": {},
                                                    "finished": False, "completed_tasks": 1, "num_tasks": 3}))
    # as root every file is writable: simulate the read-only folder a user meets
    real_access = os.access
    monkeypatch.setattr(rundir.os, "access",
                        lambda p, mode: False if Path(p) == out and mode & os.W_OK else real_access(p, mode))
    built = []
    monkeypatch.setattr("moram_bench.runner.build", lambda cfg: built.append(cfg))
    assert main(["fit", *tiny_overrides(out, "method=seq-lora", "method.r=2")]) == 2
    assert "is not writable" in one_line_error(capsys) and not built


def test_ddp_children_that_did_not_get_the_signal_get_it_after_a_grace_then_sigkill(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from moram_bench.runner import StopDDPChildrenOnInterrupt, stop_ddp_children

    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    # a rank blocked in a collective: its Python handler never runs (here: it ignores SIGTERM)
    deaf = subprocess.Popen([sys.executable, "-c", "import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('ready', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert deaf.stdout.readline().strip() == "ready"
    monkeypatch.setattr(StopDDPChildrenOnInterrupt, "launched", [])
    # Lightning launches the ranks from the run's first trainer only; later trainers have none
    first = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[quick, stuck, deaf])))
    later = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[])))
    for trainer in (first, later, first):
        StopDDPChildrenOnInterrupt().setup(trainer, None, "fit")
    assert StopDDPChildrenOnInterrupt.launched == [quick, stuck, deaf]
    stop_ddp_children(signal.SIGTERM, grace=0.5)
    assert quick.wait(timeout=30) == 0  # it ended by itself: no signal sent
    assert stuck.wait(timeout=30) == -signal.SIGTERM
    assert deaf.wait(timeout=30) == -signal.SIGKILL


# ---- items 2 and 3: signals (subprocess fits) -------------------------------------------------------
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# MoRAM whose training steps of task 2 are slow and announce themselves, so that a signal
# lands inside Lightning's fit of task 2, after task 1 was saved
SLOW_METHOD = """
import os, time
from pathlib import Path
from moram_bench import registry

Base = registry.METHODS["moram"]


@registry.register_method("slow-moram")
class SlowMoRAM(Base):
    \"\"\"MoRAM with slow training steps from task 2 on (tests of interruptions).\"\"\"

    def training_step(self, batch, batch_idx):
        if self.current_task >= 1:
            Path(os.environ["MORAM_TEST_MARKER"]).write_text("training task 2")
            time.sleep(0.5)
        return super().training_step(batch, batch_idx)
"""


def slow_args(where: Path) -> list[str]:
    """Overrides of a MoRAM run whose task 2 trains slowly (plugin files in ``where``)."""
    plugin = where / "plugin"
    if not plugin.exists():
        plugin.mkdir(parents=True)
        (plugin / "slow_moram.py").write_text(SLOW_METHOD)
        (plugin / "slow-moram.yaml").write_text((Path(rundir.__file__).parents[1] / "conf/method/moram.yaml").read_text())
    return ["stream=synthetic-tiny", "method=slow-moram", "method.r=2", f"plugins=[{plugin}]", "stream.iterations=200",
            f"cache_dir={where}/cache", "trainer.enable_progress_bar=false", "trainer.num_threads=1"]


def fit_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "moram_bench", "fit", *slow_args(out.parent), f"output_dir={out}"]


def start_until_task_2(out: Path, cmd: list[str] | None = None) -> subprocess.Popen:
    """A fit (or ``cmd``) that has saved task 1 and is inside Lightning's fit of task 2."""
    marker = out.parent / "marker"
    env = {**ENV, "MORAM_TEST_MARKER": str(marker)}
    proc = subprocess.Popen(cmd or fit_cmd(out), env=env, stdout=subprocess.PIPE if cmd else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None and marker.exists(), "the run never reached task 2's training"
    return proc


def stop_and_check(proc: subprocess.Popen, signum: int, out: Path) -> None:
    """Send ``signum``: exit 128 + signum, one last line saying what is saved and how to
    resume, and task 1's state and checkpoint intact, the lock released."""
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"error: interrupted by {signal.Signals(signum).name}; tasks 1-1 of 3 are saved in {out} (checkpoint.pt); "
        "run the same command again to resume")
    state = json.loads((out / "run_state.json").read_text())
    assert state["completed_tasks"] == 1 and state["finished"] is False
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["completed_tasks"] == 1 and ckpt["rows"].shape == (2, 3) and ckpt["grown_state"]
    assert not (out / "run.lock").exists()


@pytest.mark.slow
def test_sigterm_exits_143_keeps_task_1_and_a_second_writer_is_refused_meanwhile(tmp_path):
    out = tmp_path / "run"
    proc = start_until_task_2(out)
    second = subprocess.run(fit_cmd(out), env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 2, second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"in use by pid {proc.pid} on {socket.gethostname()}" in lines[0], second.stderr
    stop_and_check(proc, signal.SIGTERM, out)


def _processes_writing(out: Path) -> list[int]:
    """Pids of live processes whose command line names ``out`` (a run and its DDP children)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(out).encode() in (proc / "cmdline").read_bytes() and (proc / "stat").read_text().split()[2] != "Z":
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the DDP children")
def test_sigterm_to_a_two_process_ddp_run_saves_task_1_and_leaves_no_process(tmp_path):
    out = tmp_path / "run"
    cmd = [*fit_cmd(out), "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    proc = start_until_task_2(out, cmd)
    assert len(_processes_writing(out)) >= 2  # rank 0 and the launched rank 1
    stop_and_check(proc, signal.SIGTERM, out)
    deadline = time.time() + 30
    while _processes_writing(out) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_writing(out) == []  # the DDP child did not outlive the run


@pytest.mark.slow
def test_ctrl_c_while_lightning_trains_exits_130_and_says_what_was_saved(tmp_path):
    out = tmp_path / "run"
    proc = start_until_task_2(out)
    stop_and_check(proc, signal.SIGINT, out)


@pytest.mark.slow
def test_an_in_process_sweep_stopped_by_sigterm_writes_its_summary_and_log_and_exits_143(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "moram_bench", "sweep", *slow_args(tmp_path), "seed=0,1", "--results", str(results)]
    proc = start_until_task_2(tmp_path / "run", cmd)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "1 interrupted, 1 not started" in out and "interrupted by SIGTERM: run the same sweep again" in out
    (log,) = (results / "sweeps").glob("sweep-*.json")
    assert [p["result"] for p in json.loads(log.read_text())["points"]] == ["interrupted", "pending"]
    run0 = results / "runs" / "synthetic-tiny" / "slow-moram" / "seed0"
    assert json.loads((run0 / "run_state.json").read_text())["completed_tasks"] == 1
    assert not list((results / "sweeps").glob("*.lock")) and not (run0 / "run.lock").exists()
