"""Sweeps: grid parsing, planning (directories, states, one-line errors before anything
runs), running past failures, and the real skip of a finished run directory."""
import json
import os
import signal

import pytest

from moram_bench import sweep as S
from moram_bench.config import ConfigError, config_hash
from moram_bench.errors import RunInterrupted

TINY = ["stream=synthetic-tiny", "stream.num_tasks=2", "stream.classes_per_task=2", "stream.test_per_class=2",
        "stream.shots=2", "trainer.enable_progress_bar=false"]


def test_split_values_respects_brackets_and_quotes():
    assert S.split_values("moram,seq-lora") == ["moram", "seq-lora"]
    assert S.split_values("0, 1 ,2") == ["0", "1", "2"]
    assert S.split_values("[a,b],[c]") == ["[a,b]", "[c]"]
    assert S.split_values("{x: 1, y: 2}") == ["{x: 1, y: 2}"]
    assert S.split_values("'a photo, of {}',\"b, c\"") == ["'a photo, of {}'", '"b, c"']
    assert S.split_values("single") == ["single"] and S.split_values("") == [""]


def test_expand_grid_order_axes_and_errors():
    grid = S.expand_grid(["method=moram,seq-lora", "stream=xtail-mini", "seed=0,1", "method.r=8"])
    assert [g[0] for g in grid] == [
        ["method=moram", "stream=xtail-mini", "seed=0", "method.r=8"],
        ["method=moram", "stream=xtail-mini", "seed=1", "method.r=8"],
        ["method=seq-lora", "stream=xtail-mini", "seed=0", "method.r=8"],
        ["method=seq-lora", "stream=xtail-mini", "seed=1", "method.r=8"],
    ]
    assert grid[3][1] == {"method": "seq-lora", "seed": "1"}  # only the swept keys
    assert S.expand_grid(["seed=1", "seed=2,3"]) == [(["seed=2"], {"seed": "2"}), (["seed=3"], {"seed": "3"})]
    assert S.expand_grid(["method.targets=[a,b]"]) == [(["method.targets=[a,b]"], {})]
    for bad, msg in ((["seed"], "malformed override"), (["=3"], "malformed override"),
                     (["seed=0,,1"], "empty value"), (["seed=0,1,0"], "lists '0' twice")):
        with pytest.raises(ConfigError, match=msg):
            S.expand_grid(bad)


def test_plan_directories_and_axes(tmp_path):
    pts = S.plan_sweep(["method=zeroshot,seq-lora", *TINY, "seed=0,1"], results=str(tmp_path))
    assert [p.label for p in pts] == ["zeroshot on synthetic-tiny seed 0", "zeroshot on synthetic-tiny seed 1",
                                      "seq-lora on synthetic-tiny seed 0", "seq-lora on synthetic-tiny seed 1"]
    assert pts[2].out == tmp_path / "runs" / "synthetic-tiny" / "seq-lora" / "seed0"
    assert all(p.state == "new" for p in pts) and str(pts[2].cfg.output_dir) == str(pts[2].out)
    # other swept keys get their own folder, and the label says which value
    pts = S.plan_sweep(["method=seq-lora", *TINY, "method.r=2,4", "seed=0"], results=str(tmp_path))
    assert [p.out.relative_to(tmp_path).as_posix() for p in pts] == [
        "runs/synthetic-tiny/seq-lora/r=2/seed0", "runs/synthetic-tiny/seq-lora/r=4/seed0"]
    assert pts[1].label == "seq-lora on synthetic-tiny seed 0 (method.r=4)"
    # no --results: where `fit` writes by default
    (p,) = S.plan_sweep(["method=zeroshot", *TINY, "seed=3"])
    assert p.out.as_posix() == "results/runs/synthetic-tiny/zeroshot/seed3"
    # an explicit output_dir, swept along with the seed
    pts = S.plan_sweep(["method=zeroshot", *TINY, f"output_dir={tmp_path}/a,{tmp_path}/b"])
    assert [p.out for p in pts] == [tmp_path / "a", tmp_path / "b"]


def test_plan_errors_before_anything_runs(tmp_path):
    cases = [
        (["method=zeroshot,nope", *TINY], "unknown method 'nope'.*grid point 2 of 2: method=nope"),
        (["method=zeroshot,seq-lora", *TINY, "method.r=2"], "unknown config key 'method.r' for method 'zeroshot'"),
        (["method=seq-lora", *TINY, "method.r=0,2"], "method.r must be >= 1"),
        (["method=zeroshot", *TINY, "seed=0,1", f"output_dir={tmp_path}/same"], "would both write to"),
        (["method=zeroshot", *TINY, f"output_dir={tmp_path}/x"], "not both"),
        (["method=zeroshot", *TINY, "trainer.devices=4096"], "trainer.devices=4096"),
    ]
    for overrides, msg in cases:
        results = str(tmp_path) if "not both" in msg else None
        with pytest.raises(ConfigError, match=msg):
            S.plan_sweep(overrides, results=results)


def _state(out, cfg, finished, done=1):
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_state.json").write_text(json.dumps(
        {"config_hash": config_hash(cfg), "config": {}, "finished": finished, "completed_tasks": done, "num_tasks": 2}))
    if finished:
        (out / "metrics.json").write_text("{}")


def test_plan_states_resume_finished_and_conflicts(tmp_path):
    args = ["method=zeroshot", *TINY, "seed=0,1,2"]
    pts = S.plan_sweep(args, results=str(tmp_path))
    _state(pts[0].out, pts[0].cfg, finished=True, done=2)
    _state(pts[1].out, pts[1].cfg, finished=False, done=1)
    pts = S.plan_sweep(args, results=str(tmp_path))
    assert [p.state for p in pts] == ["finished", "resume", "new"] and pts[1].progress == "1/2 tasks done"
    # a directory holding another config: refused up front, with the remedy
    (pts[2].out).mkdir(parents=True)
    (pts[2].out / "run_state.json").write_text(json.dumps({"config_hash": "other", "config": {}, "finished": True}))
    with pytest.raises(ConfigError, match="holds a run with a different config.*--results DIR"):
        S.plan_sweep(args, results=str(tmp_path))
    # overwrite=true reruns everything (each earlier run is replaced)
    pts = S.plan_sweep(args + ["overwrite=true"], results=str(tmp_path))
    assert [p.state for p in pts] == ["replace", "replace", "replace"]


def test_run_sweep_continues_past_failures_and_reports_them(tmp_path):
    pts = S.plan_sweep(["method=zeroshot", *TINY, "seed=0,1,2,3"], results=str(tmp_path))
    pts[0].state = "finished"
    calls, lines = [], []

    def fake(point):
        calls.append(point.cfg.seed)
        if point.cfg.seed == 2:
            raise ConfigError("data folder missing")

    code = S.run_sweep(pts, runner=fake, echo=lines.append, log_path=tmp_path / "sweeps" / "log.json")
    assert code == 1 and calls == [1, 2, 3]
    assert [p.result for p in pts] == ["skipped", "done", "failed", "done"]
    text = "\n".join(lines)
    assert "[1/4] zeroshot on synthetic-tiny seed 0: already finished" in text
    assert "[2/4] zeroshot on synthetic-tiny seed 1 ... (starting;" in text
    assert "[4/4] zeroshot on synthetic-tiny seed 3 ... (starting;" in text and ", ETA " in text
    assert "[3/4] zeroshot on synthetic-tiny seed 2: FAILED: ConfigError: data folder missing" in text
    assert "sweep: 2 run(s) finished now, 1 already finished, 1 failed" in text
    assert "FAILED [3/4] zeroshot on synthetic-tiny seed 2: ConfigError: data folder missing" in text
    log = json.loads((tmp_path / "sweeps" / "log.json").read_text())
    assert [p["result"] for p in log["points"]] == ["skipped", "done", "failed", "done"]


def test_interrupt_stops_the_sweep(tmp_path):
    pts = S.plan_sweep(["method=zeroshot", *TINY, "seed=0,1"], results=str(tmp_path))

    def fake(point):
        raise KeyboardInterrupt

    lines = []
    assert S.run_sweep(pts, runner=fake, echo=lines.append) == 130
    assert [p.result for p in pts] == ["interrupted", "pending"] and "1 not started" in "\n".join(lines)


def test_sigterm_in_a_point_is_interrupted_not_done_and_the_log_is_written(tmp_path):
    """Issue 17 item 2: a point stopped by SIGTERM is never counted as finished; the sweep
    writes its summary and log and exits 143."""
    pts = S.plan_sweep(["method=zeroshot", *TINY, "seed=0,1,2"], results=str(tmp_path))

    def fake(point):
        if point.cfg.seed == 1:
            raise RunInterrupted(signal.SIGTERM, "tasks 1-1 of 2 are saved")

    lines, log = [], tmp_path / "sweeps" / "log.json"
    assert S.run_sweep(pts, runner=fake, echo=lines.append, log_path=log) == 143
    assert [p.result for p in pts] == ["done", "interrupted", "pending"]
    text = "\n".join(lines)
    assert "1 run(s) finished now, 0 already finished, 0 failed, 1 interrupted, 1 not started" in text
    assert "interrupted by SIGTERM: run the same sweep again" in text
    assert [q["result"] for q in json.loads(log.read_text())["points"]] == ["done", "interrupted", "pending"]
    assert not list(log.parent.glob("*.lock"))  # the log's lock is released


@pytest.mark.parametrize("code", [130, 143, -15])
def test_subprocess_exit_130_143_means_interrupted(tmp_path, monkeypatch, code):
    (p,) = S.plan_sweep(["method=zeroshot", *TINY], results=str(tmp_path))

    class FakePopen:
        def __init__(self, cmd, **kw):
            import io

            self.stderr = io.StringIO("error: interrupted by SIGTERM; tasks 1-1 of 2 are saved\n")

        def wait(self):
            return code

    monkeypatch.setattr(S.subprocess, "Popen", FakePopen)
    with pytest.raises(RunInterrupted) as info:
        S.run_subprocess(p)
    assert info.value.exit_code == (128 - code if code < 0 else code)
    lines = []
    assert S.run_sweep([p], force_subprocess=True, echo=lines.append) == info.value.exit_code
    assert p.result == "interrupted" and "finished now" in "\n".join(lines)


def test_a_sweep_log_is_locked(tmp_path):
    from moram_bench.rundir import RunLock

    log = tmp_path / "sweeps" / "log.json"
    log.parent.mkdir()
    with RunLock(log.with_suffix(".lock")):
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}"):
            S.run_sweep([], log_path=log, echo=lambda s: None)


def test_multi_process_points_run_as_fit_subprocesses(tmp_path, monkeypatch):
    (p,) = S.plan_sweep(["method=zeroshot", *TINY], results=str(tmp_path))
    assert not S.needs_subprocess(p.cfg)
    for extra in ("trainer.strategy=ddp", "trainer.num_nodes=2"):
        (q,) = S.plan_sweep(["method=zeroshot", *TINY, extra], results=str(tmp_path))
        assert S.needs_subprocess(q.cfg)

    seen = {}

    class FakePopen:
        def __init__(self, cmd, **kw):
            seen["cmd"] = cmd
            import io

            self.stderr = io.StringIO("some warning\nerror: stream data not found\n")

        def wait(self):
            return 2

    monkeypatch.setattr(S.subprocess, "Popen", FakePopen)
    with pytest.raises(S.SubprocessFailed, match="code 2: stream data not found"):
        S.run_subprocess(p, config_file="my.yaml")
    cmd = seen["cmd"]
    assert cmd[1:6] == ["-m", "moram_bench", "fit", "--config", "my.yaml"]
    assert cmd[6:] == ["method=zeroshot", *TINY, f"output_dir={p.out}"]


def test_real_finished_run_is_skipped_and_sweep_continues(tmp_path, monkeypatch, capsys):
    args = ["method=zeroshot", *TINY, f"cache_dir={tmp_path}/cache", "--results", str(tmp_path)]
    assert S.main([*args, "seed=0"]) == 0  # a real run, in-process
    run_dir = tmp_path / "runs" / "synthetic-tiny" / "zeroshot" / "seed0"
    assert json.loads((run_dir / "run_state.json").read_text())["finished"] is True
    assert (run_dir / "metrics.json").exists()
    out = capsys.readouterr().out
    assert "[1/1] zeroshot on synthetic-tiny seed 0 ... (starting;" in out and "1 run(s) finished now" in out
    before = (run_dir / "metrics.json").read_bytes()

    calls = []
    monkeypatch.setattr(S, "run_in_process", lambda point: calls.append(point.cfg.seed))
    assert S.main([*args, "seed=0,1"]) == 0
    out = capsys.readouterr().out
    assert "sweep: 2 run(s): 1 new, 0 to resume, 1 already finished" in out
    assert "[1/2] zeroshot on synthetic-tiny seed 0: already finished" in out
    assert calls == [1]  # seed 0 was not run again
    assert (run_dir / "metrics.json").read_bytes() == before
    assert len(list((tmp_path / "sweeps").glob("sweep-*.json"))) == 2


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert S.main([]) == 2
    assert S.main(["method=zeroshot,nope", *TINY, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "unknown method 'nope'" in err[1]
    assert not (tmp_path / "runs").exists()
    assert S.main(["--bogus"]) == 2


def test_dry_run_lists_the_grid(tmp_path, capsys):
    assert S.main(["method=zeroshot", *TINY, "seed=0,1", "--results", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[2/2] zeroshot on synthetic-tiny seed 1: new -> " in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()
