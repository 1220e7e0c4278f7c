"""scripts/embedded_report.py: per-task diagonal, last row and routing shares over seeds."""
import importlib.util
import json
from pathlib import Path

from moram_bench.routing import write_routing_report

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "embedded_report.py"


def load_script():
    spec = importlib.util.spec_from_file_location("embedded_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_run(folder: Path, seed: int, matrix, routing=None):
    d = folder / "moram" / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"finished": True, "seed": seed, "matrix": matrix,
                                                "task_names": ["a", "b"]}))
    if routing is not None:
        write_routing_report(d, routing, ["a", "b"])


def test_diagonal_last_row_and_routing_over_two_seeds(tmp_path, capsys):
    # rows: 0 = untrained, 1 = after a, 2 = after b
    write_run(tmp_path, 0, [[5, 5], [10, 0], [8, 30]], routing=[[0.9, 0.1], [0.2, 0.8]])
    write_run(tmp_path, 1, [[5, 5], [20, 0], [12, 50]], routing=[[0.7, 0.3], [0.4, 0.6]])
    (tmp_path / "moram" / "seed2").mkdir()  # unfinished: no metrics.json, skipped
    assert load_script().main([str(tmp_path), "--methods", "moram,seq-lora"]) == 0
    out = capsys.readouterr().out
    # diagonal a: 10, 20 -> 15 ± t(0.975, 1) * std / sqrt(2) = 12.706 * 7.071 / 1.414 = 63.5
    # diagonal b: 30, 50 -> 40 ± 127.1; plasticity per seed 20, 35 -> 27.5 ± 95.3
    assert "| moram | 2 | 15.0 ± 63.5 | 40.0 ± 127.1 | 27.5 ± 95.3 |" in out
    # last row: a 8, 12 -> 10 ± 25.4; b 30, 50; mean per seed 19, 31 -> 25 ± 76.2
    assert "| moram | 2 | 10.0 ± 25.4 | 40.0 ± 127.1 | 25.0 ± 76.2 |" in out
    # routing own task: a 90, 70 -> 80 ± 127.1; b 80, 60 -> 70 ± 127.1; last task: a 10, 30; b = own
    assert "| moram | 2 | own task (%) | 80.0 ± 127.1 | 70.0 ± 127.1 |" in out
    assert "| moram | 2 | last task (%) | 20.0 ± 127.1 | 70.0 ± 127.1 |" in out
    assert "seq-lora" not in out  # no runs: no row


def test_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert load_script().main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
