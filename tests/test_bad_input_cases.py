"""Every bad input of issue 17 (items 6-9): one line ``error: ...`` and exit 2, nothing
left behind, or the stated behaviour. Cases run in-process through the CLI's ``main``.

``python tests/test_bad_input_cases.py`` prints the table case | exit code | first line.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import _tiny_overrides as tiny_overrides  # noqa: E402

from moram_bench.__main__ import main  # noqa: E402

LONG = "a" * 5000


@dataclass
class Case:
    name: str
    args: list[str] = field(default_factory=list)   # overrides after the tiny-stream ones
    config: str | bytes | None = None               # content of a --config file
    config_is_folder: bool = False
    code: int = 2
    fragment: str = ""                              # must appear in the first line
    setup: Callable[[Path], None] | None = None     # prepares the output folder
    overrides: bool = True                          # prepend tiny_overrides(out)
    command: str = "fit"                            # leaderboard: argv is [command, out]
    line: str = ""                                  # exit 0: the output line that must appear


def _state_is_a_list(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "run_state.json").write_text("[1, 2, 3]")


def _output_is_a_file(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("not a folder")


_FINISHED: dict[str, Path] = {}


def _finished_run(out: Path) -> None:
    """A finished zero-shot run in ``out`` (made once per session, then copied)."""
    import shutil
    import tempfile

    if "run" not in _FINISHED:
        src = Path(tempfile.mkdtemp(prefix="finished-")) / "run"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["fit", *tiny_overrides(src, "method=zeroshot", "stream.iterations=1")]) == 0
        _FINISHED["run"] = src
    shutil.copytree(_FINISHED["run"], out, ignore=shutil.ignore_patterns("cache"))


def _finished_files_deleted(out: Path) -> None:
    _finished_run(out)
    (out / "matrix.csv").unlink()
    (out / "metrics.json").unlink()


def _checkpoint_deleted(out: Path) -> None:
    """An unfinished run (1 of 3 tasks done) whose checkpoint was deleted."""
    _finished_run(out)
    state = json.loads((out / "run_state.json").read_text())
    state.update(finished=False, completed_tasks=1)
    (out / "run_state.json").write_text(json.dumps(state))
    (out / "metrics.json").unlink()
    (out / "checkpoint.pt").unlink(missing_ok=True)


def _only_unfinished_runs(out: Path) -> None:
    _checkpoint_deleted(out / "runs" / "a")
    (out / "LEADERBOARD.md").write_text("# the old leaderboard\n")


CASES = [
    # item 6: silent acceptance of wrong settings
    Case("stream.iterations=0", ["stream.iterations=0"], fragment="stream.iterations must be >= 1 (got 0)"),
    Case("stream.iterations=-3", ["stream.iterations=-3"], fragment="stream.iterations must be >= 1 (got -3)"),
    Case("method.r=2.5", ["method=moram", "method.r=2.5"], fragment="method.r=2.5 (command line) has the wrong type: expected an integer"),
    Case("seed=1e3", ["seed=1e3"], fragment="seed=1000.0 (command line) has the wrong type: expected an integer"),
    Case("stream.shots=8.0", ["stream.shots=8.0"], fragment="expected an integer"),
    Case("config seed: 3.0", config="seed: 3.0\n", fragment="seed=3.0 (in "),
    Case("method.name=no-such", ["method.name=no-such"], fragment="unknown method 'no-such'"),
    # item 8: config files
    Case("config seed: [1, 2]", config="seed: [1, 2]\n", fragment="seed=[1, 2] (in "),
    Case('config seed: "abc"', config='seed: "abc"\n', fragment="seed='abc' (in "),
    Case('config iterations: "many"', config='stream: {iterations: "many"}\n', fragment="stream.iterations='many' (in "),
    Case('config lr: "fast"', config='method: {optim: {lr: "fast"}}\n', fragment="method.optim.lr='fast' (in "),
    Case("config data: null", config="data: null\n", fragment="data (in "),
    Case("config not UTF-8", config=b"seed: \xff\xfe\n", fragment="is not UTF-8 text"),
    Case("config is a folder", config_is_folder=True, fragment="is a folder, not a YAML file"),
    Case("config trainer: 5", config="trainer: 5\n", fragment="trainer (in "),
    # item 8: overrides
    Case("seed=-1", ["seed=-1"], fragment="seed must be in [0, 4294967295] (got -1)"),
    Case("trainer.precision=bogus", ["trainer.precision=bogus"], fragment="trainer.precision='bogus' is not a precision"),
    Case("trainer.num_threads=-1", ["trainer.num_threads=-1"], fragment="trainer.num_threads must be >= 1"),
    Case("method.optim.betas=[2,3]", ["method=moram", "method.optim.betas=[2,3]"], fragment="method.optim.betas must be in [0, 1)"),
    Case("method.optim.weight_decay=-1", ["method=moram", "method.optim.weight_decay=-1"],
         fragment="method.optim.weight_decay must be >= 0"),
    Case("method.targets=[nomatch]", ["method=moram", "method.r=2", "method.targets=[nomatch]"], fragment="nomatch"),
    Case("method.targets=['(']", ["method=moram", "method.targets=['(']"], fragment="is not a valid regular expression"),
    Case("run_state.json holds a list", ["method=zeroshot"], setup=_state_is_a_list, fragment="run_state.json"),
    # item 9: messages that mislead
    Case("output_dir is a file", ["method=zeroshot"], setup=_output_is_a_file, fragment="is a file, not a folder"),
    Case("5000-character value", [f"seed={LONG}"], fragment="... (5002 characters)"),
    Case("5000-character method name", [f"method={LONG}"], fragment="characters)"),
    Case("finished run, matrix.csv and metrics.json deleted", ["method=zeroshot"], setup=_finished_files_deleted,
         fragment="says finished but metrics.json is missing"),
    Case("checkpoint.pt deleted (1 of 3 tasks done)", ["method=zeroshot"], setup=_checkpoint_deleted, code=0,
         line="checkpoint.pt is missing: starting again from task 0"),
    Case("leaderboard: path is a file", command="leaderboard", setup=_output_is_a_file, overrides=False,
         fragment="is a file, not a folder"),
    Case("leaderboard: only unfinished runs", command="leaderboard", setup=_only_unfinished_runs, overrides=False,
         code=1, fragment="no finished runs below"),
]


def run_case(case: Case, tmp: Path) -> tuple[int, str, str]:
    """(exit code, first line of stderr (else stdout), all output) of ``fit`` for ``case``."""
    out = tmp / "out"
    if case.setup:
        case.setup(out)
    if case.command != "fit":
        argv = [case.command, str(out)]
    else:
        argv = ["fit"]
    if case.config is not None or case.config_is_folder:
        path = tmp / "cfgdir" if case.config_is_folder else tmp / "user.yaml"
        if case.config_is_folder:
            path.mkdir()
        elif isinstance(case.config, bytes):
            path.write_bytes(case.config)
        else:
            path.write_text(case.config)
        argv += ["--config", str(path)]
    if case.overrides:
        argv += tiny_overrides(out, "stream.iterations=1")
    argv += case.args
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        code = main(argv)
    lines = [ln for ln in (err.getvalue().splitlines() or std.getvalue().splitlines()) if ln.strip()]
    if code == 0 and case.line:  # a run that goes on: the line that says what happens
        lines = [ln for ln in std.getvalue().splitlines() if case.line in ln] or lines
    return code, (lines[0] if lines else ""), err.getvalue() + std.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_one_line_exit_2(case, tmp_path):
    code, first, output = run_case(case, tmp_path)
    assert code == case.code, output[-2000:]
    assert "Traceback" not in output
    if code == 0:
        assert case.line in first, output[-2000:]
        return
    errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert "Traceback" not in output and len(errors) == 1, output[-2000:]
    assert first.startswith("error: ") and case.fragment in first, first
    assert len(first) < 400, first  # long values are cut
    out = tmp_path / "out"
    if case.setup is None:
        assert not out.exists(), sorted(out.rglob("*"))  # no folder left behind after a config error
    if case.setup is _only_unfinished_runs:
        assert (out / "LEADERBOARD.md").read_text() == "# the old leaderboard\n"  # the old file is kept


# ---- item 6: the stated behaviours ------------------------------------------------------------
def test_method_name_key_switches_the_method_with_its_own_defaults(tmp_path):
    from moram_bench.config import resolve_config

    via_key = resolve_config(["stream=synthetic-tiny", "method.name=seq-lora", "method.r=4"])
    via_group = resolve_config(["stream=synthetic-tiny", "method=seq-lora", "method.r=4"])
    assert via_key == via_group and via_key.method.name == "seq-lora"
    assert "topk" not in via_key.method  # none of MoRAM's settings came along
    text = resolve_config(["stream=trace-mini", "method.name=seq-lora"])
    assert text.method.alpha == 16 and text.method.r == 8  # seq-lora's own text block: scale 2
    user = resolve_config(["stream=synthetic-tiny"], _write(tmp_path, "method: {name: seq-lora, r: 4}\n"))
    assert user.method == via_group.method


def _write(folder: Path, text: str) -> str:
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".yaml", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def test_integer_keys_keep_integers_and_floats_stay_floats():
    from moram_bench.config import resolve_config

    cfg = resolve_config(["stream=synthetic-tiny", "method=moram", "method.r=3", "seed=7", "method.tau=1",
                          "method.optim.lr=1"])
    assert type(cfg.method.r) is int and type(cfg.seed) is int
    assert cfg.method.tau == 1 and cfg.method.optim.lr == 1  # an int is a fine float


# ---- item 7: `~` and environment variables, expanded once ---------------------------------------
@pytest.mark.parametrize("how", ["override", "quoted", "yaml"])
def test_home_in_output_dir_is_expanded_everywhere(tmp_path, monkeypatch, how):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    args = [a for a in tiny_overrides(tmp_path / "unused", "method=zeroshot") if not a.startswith("output_dir=")]
    if how == "yaml":
        argv = ["fit", "--config", _write(tmp_path, "output_dir: ~/x\n"), *args]
    else:
        argv = ["fit", *args, "output_dir=~/x" if how == "override" else "output_dir='~/x'"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    run = home / "x"
    assert (run / "matrix.csv").is_file() and (run / "metrics.json").is_file()
    assert (run / "tensorboard").is_dir()
    assert not (cwd / "~").exists()
    assert json.loads((run / "metrics.json").read_text())["config"]["output_dir"] == str(run)


def test_environment_variables_in_path_settings(monkeypatch, tmp_path):
    from moram_bench.config import resolve_config

    monkeypatch.setenv("MB_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    cfg = resolve_config(["stream=synthetic-tiny", "output_dir=$MB_TEST_ROOT/out", "cache_dir=~/cache",
                          "data_dir=${oc.env:MB_TEST_ROOT}/data"])
    assert cfg.output_dir == f"{tmp_path}/out" and cfg.cache_dir == f"{tmp_path}/h/cache"
    assert cfg.data_dir == f"{tmp_path}/data"


# ---- item 8: caches ------------------------------------------------------------------------------
def test_empty_feature_cache_file_is_rebuilt(tmp_path):
    import torch

    from moram_bench.config import resolve_config
    from moram_bench.data import TaskStreamDataModule
    from moram_bench import registry

    cfg = resolve_config(["stream=synthetic-tiny", "stream.num_tasks=2"])
    stream = registry.STREAMS[cfg.stream.name](cfg)
    import numpy as np

    def to_tensor(image):
        return torch.as_tensor(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image), dtype=torch.float32)

    def module(**kw):
        return TaskStreamDataModule(stream, batch_size=4, steps_per_task=[1, 1], seed=0, transform=to_tensor, **kw)

    dm = module()
    trunk = lambda x: x.flatten(1)[:, :5]  # noqa: E731  (any frozen feature map)
    path = tmp_path / "features" / f"{dm.cache_key('b')}.pt"
    path.parent.mkdir()
    torch.save({}, path)  # a valid file holding nothing
    logs: list[str] = []
    dm.cache_features(trunk, "b", tmp_path, log=logs.append)
    assert any("ignoring unreadable feature cache" in m for m in logs), logs
    assert len(dm.dataset("train", 1)) == len(stream.tasks[1].train)
    again = module()
    logs.clear()
    again.cache_features(trunk, "b", tmp_path, log=logs.append)
    assert logs and logs[0].startswith("loaded cached image features")  # the rewritten file is complete


@pytest.mark.parametrize("broken", ["weights", "config", "record", "standardise"])
def test_corrupt_mini_clip_cache_is_rebuilt_once(tmp_path, monkeypatch, broken):
    import torch

    from moram_bench.backbones import mini_clip as mc
    from moram_bench.config import ConfigError

    folder = tmp_path / "mini-clip" / "key"
    real_load = mc.load_cached

    def fake_build(settings, f, log=print):  # a rebuild that yields a readable cache
        f.mkdir(parents=True, exist_ok=True)
        (f / mc.WEIGHTS_FILE).write_bytes(b"rebuilt")
        (f / mc.BUILD_INFO_FILE).write_text("{}")
        from safetensors.torch import save_file

        save_file({"mean": torch.zeros(2), "std": torch.ones(2)}, str(f / mc.STANDARDISE_FILE))

    def load(f):  # the real loader, unless the folder is the rebuilt one
        if (f / mc.WEIGHTS_FILE).read_bytes() == b"rebuilt":
            return "model", "preprocess", "tokenizer"
        if broken in ("record", "standardise"):  # weights and config fine: only this file is garbage
            return "model", "preprocess", "tokenizer"
        return real_load(f)

    folder.mkdir(parents=True)
    (folder / mc.WEIGHTS_FILE).write_bytes(b"\x00truncated" if broken == "weights" else b"ok")
    (folder / "open_clip_config.json").write_text('{"model_cfg": {"text_cfg": {}}' if broken == "config" else "{}")
    (folder / mc.BUILD_INFO_FILE).write_text('{"seconds": ' if broken == "record" else "{}")
    settings = {"image_side": "tokens"} if broken == "standardise" else {}
    if broken == "standardise":
        (folder / mc.STANDARDISE_FILE).write_bytes(b"\x08\x00\x00\x00truncated")
    monkeypatch.setattr(mc, "build_aligned", fake_build)
    monkeypatch.setattr(mc, "load_cached", load)
    logs: list[str] = []
    assert mc.load_or_build(settings, folder, log=logs.append) == ("model", "preprocess", "tokenizer", True)
    assert any("unreadable" in m and "rebuilding it" in m for m in logs), logs
    assert not list(tmp_path.glob("mini-clip/.key.corrupt-*"))

    # a rebuild that does not help: one line naming the folder to delete
    monkeypatch.setattr(mc, "build_aligned", lambda s, f, log=print: f.mkdir() or (f / mc.WEIGHTS_FILE).write_bytes(b"x"))
    monkeypatch.setattr(mc, "load_cached", lambda f: (_ for _ in ()).throw(ValueError("garbage")))
    with pytest.raises(ConfigError, match=f"the cached model in {folder} is unreadable even after a rebuild.*delete that folder"):
        mc.load_or_build({}, folder, log=logs.append)


def table() -> str:
    import tempfile

    rows = ["| case | exit code | first line of output |", "|---|---|---|"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            code, first, _ = run_case(case, Path(tmp))
        rows.append(f"| `{case.name[:60]}` | {code} | `{first.replace(tmp, '<tmp>')}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(table())
