"""`python -m moram_bench doctor` on a machine without a GPU: the CPU checks run and pass,
a broken computation or partial data fails them, and the exit code says so."""
import json

import pytest
import torch

from moram_bench import doctor


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_memory_check_passes_and_catches_a_wrong_gradient():
    assert doctor.check_memory_cpu().ok is True
    mem, x, y0, up = doctor._memory_case("cpu")
    good = doctor._memory_result(mem, x, y0, up)
    ref = doctor._memory_result(mem, x, y0, up, reference=True)
    assert doctor._compare(good, ref, **doctor.MEMORY_TOL)[0]
    bad = dict(good, **{"grad keys": good["grad keys"] * 1.01})  # a 1% error in one gradient
    ok, msg = doctor._compare(bad, ref, **doctor.MEMORY_TOL)
    assert not ok and "grad keys" in msg
    nan = dict(good, output=good["output"].clone().fill_(float("nan")))
    assert doctor._compare(nan, ref, **doctor.MEMORY_TOL) == (False, "output is not finite")


def test_bf16_autocast_on_the_clip_protocol_is_close_to_float32(tmp_path):
    c = doctor.check_bf16("clip", "cpu", cache_dir=str(tmp_path))
    assert c.ok is True, c.detail
    assert "relative difference" in c.detail


def _trace_partial(root):
    folder = root / "C-STANCE"
    folder.mkdir(parents=True)
    for split in ("train", "eval", "test"):
        (folder / f"{split}.json").write_text(json.dumps([{"prompt": "p", "answer": "A"}]))


def test_data_checks_report_absent_streams_and_fail_partial_ones(tmp_path):
    _trace_partial(tmp_path)
    checks = {c.name: c for c in doctor.check_data_dir(str(tmp_path))}
    assert checks["data for trace"].ok is False and "1/8 parts found" in checks["data for trace"].detail
    assert checks["data for xtail"].ok is None  # nothing of it there: reported, not failed


def test_main_exits_1_on_a_failed_check_and_2_on_bad_arguments(tmp_path, monkeypatch, capsys):
    # the bf16 checks are tested above; here they are replaced to keep the test short
    monkeypatch.setattr(doctor, "check_bf16", lambda kind, dev, cache_dir=None: doctor.Check(f"bf16 {kind}", True, "ok"))
    _trace_partial(tmp_path)
    assert doctor.main(["--no-estimate", f"data_dir={tmp_path}"]) == 1
    out = capsys.readouterr().out
    assert "no CUDA GPU found" in out and "torch" in out and "FAILED data for trace" in out
    assert doctor.main(["--no-estimate"]) == 0
    assert doctor.main(["--no-estimate", "method=moram"]) == 2
    assert doctor.main(["--no-estimate", f"data_dir={tmp_path}/nowhere"]) == 2
