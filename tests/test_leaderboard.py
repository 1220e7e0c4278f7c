"""The leaderboard from hand-made run directories: exact means, sample stds and 95 %
confidence intervals, best and tied-best marking (paired t-test), grouping by settings,
unfinished and unreadable runs listed, the files and the CLI's errors.

Student t values used below (two-sided 95 %, i.e. the 0.975 quantile), from the standard
table: df 1: 12.7062, df 2: 4.3027, df 4: 2.7764, df 9: 2.2622, df 30: 2.0423. For the
p-values, the t distribution's CDF has a closed form for small df:
df 1: F(t) = 1/2 + atan(t)/pi, so the two-sided p = 1 - 2 atan(|t|)/pi;
df 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - |t| / sqrt(2 + t^2)."""
import csv
import io
import json
import math
import sys

import numpy as np
import pytest

from moram_bench import leaderboard as L
from moram_bench import metrics as M
from moram_bench import results_io as IO

T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 9: 2.2622, 30: 2.0423}  # 4-decimal table values

# T = 2 matrices, rows 0..2. Hand-computed metrics per matrix:
#   last, mtil_avg, transfer, avg_incremental, bwt, forgetting, plasticity
MORAM = {
    0: ([[10, 20], [60, 30], [70, 70]], (70.0, 57.5, 30.0, 65.0, 10.0, -10.0, 65.0)),
    1: ([[10, 20], [50, 40], [72, 72]], (72.0, 58.5, 40.0, 61.0, 22.0, -22.0, 61.0)),
    2: ([[10, 20], [80, 20], [74, 80]], (77.0, 63.5, 20.0, 78.5, -6.0, 6.0, 80.0)),
}
SEQ_LORA = [[10, 20], [90, 10], [40, 85]]  # 62.5, 56.25, 10, 76.25, -50, 50, 87.5
ZEROSHOT = [[10, 35], [10, 35], [10, 35]]  # 22.5, 22.5, 35, 16.25, 0, 0, 22.5
NAMES = ["alpha", "beta"]


def make_run(root, method, seed, R, *, stream="xtail-mini", finished=True, r=16, shots=16, stream_settings=None,
             trainable=(100, 100), params_added=200, train_s=10.0, eval_s=2.0, method_settings=None,
             modality="image", backbone="mini-clip", subdir=None, rows_written=None, iterations=500):
    """Write a run directory the way the runner does (matrix.csv, run_state.json, metrics.json)."""
    out = root / "runs" / stream / method / (subdir or f"seed{seed}")
    R = np.asarray(R, dtype=float)
    T = R.shape[1]
    method_cfg = {"name": method} if method == "zeroshot" else {"name": method, "r": r, "optim": {"lr": 5e-4}}
    config = {"method": method_cfg,
              "stream": {"name": stream, "modality": modality, "shots": shots, "iterations": iterations},
              "backbone": {"name": backbone, "pretrained": "/home/someone/weights/mini.pt"},
              "seed": seed, "output_dir": str(out), "overwrite": False, "cache_dir": None, "data_dir": "/data",
              "trainer": {"devices": 1, "accelerator": "cpu", "precision": "32-true"},
              "data": {"eval_batch_size": 256, "num_workers": 0}}
    n_rows = (T + 1) if rows_written is None else rows_written
    IO.write_matrix_csv(out / "matrix.csv", R[:n_rows], NAMES[:T])
    IO.atomic_write_json(out / "run_state.json", {
        "config_hash": "x", "config": config, "method": method, "stream": stream, "seed": seed,
        "completed_tasks": n_rows - 1, "num_tasks": T, "finished": finished,
        "train_seconds": train_s, "eval_seconds": eval_s})
    if finished:
        met = M.compute_all(R)
        met.update({"method": method, "stream": stream, "backbone": backbone, "seed": seed, "num_tasks": T,
                    "task_names": NAMES[:T], "matrix": R.tolist(), "train_seconds": train_s,
                    "eval_seconds": eval_s, "setup_seconds": 1.0,
                    "trainable_params_per_task": list(trainable), "params_added": params_added,
                    "stream_settings": stream_settings or {"shots": shots, "templates": ["a photo of a {}."],
                                                           "data_seed": seed},
                    "method_settings": method_settings or {}, "config": config, "versions": {},
                    "finished": True})
        IO.atomic_write_json(out / "metrics.json", met)
    return out


@pytest.fixture
def results(tmp_path):
    for seed, (R, _) in MORAM.items():
        make_run(tmp_path, "moram", seed, R, trainable=(100, 300), params_added=400 + seed * 10,
                 train_s=10.0 * (seed + 1), eval_s=3.0)
    make_run(tmp_path, "seq-lora", 0, SEQ_LORA, trainable=(50, 50), params_added=0)
    make_run(tmp_path, "zeroshot", 0, ZEROSHOT, trainable=(0, 0), params_added=0)
    return tmp_path


def test_hand_computed_metrics_of_the_fixtures():
    for R, expected in MORAM.values():
        m = M.compute_all(R)
        got = tuple(m[k] for k in ("last", "mtil_avg", "transfer", "avg_incremental", "bwt", "forgetting",
                                   "plasticity"))
        assert got == pytest.approx(expected)


def test_means_sample_stds_cis_and_best_marking(results):
    lb = L.aggregate(L.collect_runs(results))
    assert lb.problems == [] and lb.num_runs == 5
    (table,) = lb.tables
    assert table.stream == "xtail-mini" and table.modality == "image"
    assert [s.key for s in table.metrics] == ["last", "mtil_avg", "transfer", "avg_incremental", "plasticity",
                                              "bwt", "forgetting"]
    rows = {r.label: r for r in table.rows}
    assert list(rows) == ["zeroshot", "moram", "seq-lora"]  # reference row first
    moram = rows["moram"]
    assert moram.n == 3 and moram.seeds == [0, 1, 2]
    # last 70, 72, 77: mean 73, sample std sqrt((9 + 1 + 16) / 2) = sqrt(13) = 3.6056,
    # 95 % CI half-width t(0.975, 2) * sqrt(13) / sqrt(3) = 4.303 * 2.0817 = 8.957
    assert moram.mean["last"] == pytest.approx(73.0, abs=1e-12)
    assert moram.std["last"] == pytest.approx(math.sqrt(13), abs=1e-12)
    assert moram.ci["last"] == pytest.approx(T975[2] * math.sqrt(13) / math.sqrt(3), rel=1e-4)
    # transfer 30, 40, 20: mean 30, std 10, CI 4.303 * 10 / sqrt(3) = 24.84
    assert moram.mean["transfer"] == pytest.approx(30.0) and moram.std["transfer"] == pytest.approx(10.0)
    assert moram.ci["transfer"] == pytest.approx(T975[2] * 10 / math.sqrt(3), rel=1e-4)
    # bwt 10, 22, -6: mean 26/3, std sqrt(((4/3)^2 + (40/3)^2 + (44/3)^2) / 2)
    assert moram.mean["bwt"] == pytest.approx(26 / 3)
    assert moram.std["bwt"] == pytest.approx(math.sqrt(((4 / 3) ** 2 + (40 / 3) ** 2 + (44 / 3) ** 2) / 2))
    assert moram.mean["avg_incremental"] == pytest.approx((65 + 61 + 78.5) / 3)
    assert moram.mean["forgetting"] == pytest.approx(-26 / 3)
    # plasticity (diagonal means) 65, 61, 80
    assert moram.mean["plasticity"] == pytest.approx(206 / 3)
    # average accuracy over seen tasks after task 1: 60, 50, 80 (mean 190/3, std sqrt(7/3 * 100)...);
    # after task 2 it is Last: 70, 72, 77
    (m1, c1), (m2, c2) = moram.curve
    assert m1 == pytest.approx(190 / 3) and m2 == pytest.approx(73.0)
    sd1 = math.sqrt(((60 - 190 / 3) ** 2 + (50 - 190 / 3) ** 2 + (80 - 190 / 3) ** 2) / 2)
    assert c1 == pytest.approx(T975[2] * sd1 / math.sqrt(3), rel=1e-4) and c2 == pytest.approx(moram.ci["last"])
    # costs: mean over tasks, then over seeds
    assert moram.costs["trainable_params_per_task"] == pytest.approx(200.0)
    assert moram.costs["params_added"] == pytest.approx(410.0)
    assert moram.costs["train_seconds"] == pytest.approx(20.0)
    assert moram.costs["eval_seconds"] == pytest.approx(3.0)
    assert moram.seconds_per_run == pytest.approx(23.0)
    # single seed: std and CI unknown (None), never 0
    seq = rows["seq-lora"]
    assert seq.n == 1 and seq.std["last"] is None and seq.ci["last"] is None
    assert seq.mean["last"] == pytest.approx(62.5) and seq.curve == [(90.0, None), (62.5, None)]
    assert seq.missing_seeds == [1, 2]
    # best: moram everywhere except avg_incremental (seq-lora 76.25 > 68.17) and plasticity
    # (87.5 > 68.67); zero-shot's transfer 35 beats moram's 30 but a row that trains
    # nothing is never marked. moram and seq-lora share one seed: no test, no tie.
    assert moram.best == moram.tied_best == {"last", "mtil_avg", "transfer", "bwt", "forgetting"}
    assert seq.best == seq.tied_best == {"avg_incremental", "plasticity"}
    assert seq.p_vs_best["last"] is None and moram.p_vs_best["plasticity"] is None
    zs = rows["zeroshot"]
    assert zs.reference and zs.best == zs.tied_best == set() and zs.mean["transfer"] == pytest.approx(35.0)


def test_markdown_csv_and_latex(results):
    lb = L.aggregate(L.collect_runs(results))
    md = L.render_markdown(lb)
    assert "## xtail-mini" in md
    # CIs: last 8.96 (above), mtil_avg 57.5/58.5/63.5 -> std sqrt(31/3) -> 4.303 * 1.8559 = 7.99
    assert "| moram | 3 | **73.00 ± 8.96** | **59.83 ± 7.99** | **30.00 ± 24.84** | 68.17 ± 22.78 |" in md
    assert "| seq-lora | 1 (missing seeds 1, 2) | 62.50 ± – | 56.25 ± – | 10.00 ± – | **76.25 ± –** | **87.50 ± –** |" in md
    assert "| zeroshot (reference) | 1 (missing seeds 1, 2) | 22.50 ± – |" in md
    assert "backbone mini-clip (mini.pt); 2 tasks (alpha, beta); shots: 16; templates: a photo of a {}." in md
    assert "200 | 410 | 20.0 s | 3.0 s |" in md
    assert "95 % confidence interval (Student t" in md and "paired t-test" in md
    # how long the runs took: per row per run, and the table's total (12 + 3 * 23 + 12 = 93 s)
    assert ("Time per run (training + evaluation, mean over seeds): zeroshot (reference) 12.0 s; moram 23.0 s; "
            "seq-lora 12.0 s. All 5 runs of this table: 93.0 s.") in md
    assert "Unfinished" not in md and ".png" not in md  # no pictures unless given

    rows = list(csv.DictReader(io.StringIO(L.render_csv(lb))))
    assert [r["label"] for r in rows] == ["zeroshot", "moram", "seq-lora"]
    m = rows[1]
    assert m["status"] == "finished" and m["n_seeds"] == "3" and m["seeds"] == "0;1;2"
    assert float(m["last_mean"]) == 73.0 and float(m["last_std"]) == pytest.approx(math.sqrt(13), abs=1e-6)
    assert float(m["last_ci95"]) == pytest.approx(8.9567, rel=1e-4) and m["last_tied_best"] == "true"
    assert m["avg_incremental_tied_best"] == "false" and m["avg_incremental_p_vs_best"] == ""
    assert m["best"] == "last;mtil_avg;transfer;bwt;forgetting" and m["task_order"] == "alpha;beta"
    assert float(m["params_added"]) == 410.0 and m["bwt_trace_magnitude_mean"] == ""
    assert m["bwt_trace_magnitude_tied_best"] == ""  # not a column of this table
    assert rows[2]["last_ci95"] == "" and rows[2]["best"] == "avg_incremental;plasticity"
    assert rows[2]["plasticity_tied_best"] == "true" and rows[2]["last_tied_best"] == "false"
    assert rows[0]["best"] == "" and "reference" in rows[0]["note"] and rows[0]["last_tied_best"] == "false"
    for metric in ("last", "plasticity", "forgetting"):
        assert {f"{metric}_mean", f"{metric}_ci95", f"{metric}_tied_best"} <= set(m)

    tex = L.render_latex(lb)
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\begin{tabular}{lr" in tex
    assert "moram & 3 & \\textbf{73.00 $\\pm$ 8.96} &" in tex
    assert "seq-lora & 1 (missing seeds 1, 2) & 62.50 $\\pm$ -- &" in tex
    assert "xtail-mini" in tex and "xtail\\_mini" not in tex  # '-' needs no escaping
    assert "All 5 runs of this table: 93.0 s." in tex


def test_different_settings_are_separate_rows_labelled_by_the_difference(tmp_path):
    for seed, (R, _) in MORAM.items():
        make_run(tmp_path, "moram", seed, R)
    make_run(tmp_path, "moram", 0, SEQ_LORA, r=8, subdir="r8/seed0")
    lb = L.aggregate(L.collect_runs(tmp_path))
    (table,) = lb.tables
    rows = {r.label: r for r in table.rows}
    assert set(rows) == {"moram (r=16)", "moram (r=8)"}
    assert rows["moram (r=16)"].n == 3 and rows["moram (r=16)"].mean["last"] == pytest.approx(73.0)
    assert rows["moram (r=8)"].n == 1 and rows["moram (r=8)"].mean["last"] == pytest.approx(62.5)
    assert rows["moram (r=8)"].variant == {"method.r": 8}


def test_fairness_settings_split_rows_and_tables(tmp_path):
    # test-time batch voting (method_settings) -> a separate row with a Settings column
    make_run(tmp_path, "l2p", 0, MORAM[0][0], method_settings={"batch_voting": True, "pool": 10})
    make_run(tmp_path, "l2p", 1, MORAM[1][0], method_settings={"batch_voting": False, "pool": 10}, subdir="nv/seed1")
    make_run(tmp_path, "moram", 0, MORAM[2][0])
    # a different few-shot count -> a different table (protocol), even for the same method
    make_run(tmp_path, "moram", 0, SEQ_LORA, shots=4, subdir="shots4/seed0")
    lb = L.aggregate(L.collect_runs(tmp_path))
    assert [t.protocol["shots"] for t in lb.tables] == [16, 4]
    rows = {r.label: r for r in lb.tables[0].rows}
    assert set(rows) == {"l2p (batch_voting=on)", "l2p (batch_voting=off)", "moram"}
    assert all(r.n == 1 for r in rows.values())
    md = L.render_markdown(lb)
    assert "| Method | Settings | Seeds |" in md and "batch voting: on" in md
    assert md.count("## xtail-mini") == 2 and "shots: 4" in md
    assert lb.tables[1].rows[0].mean["last"] == pytest.approx(62.5)


def test_other_stream_settings_make_another_table(tmp_path):
    # seq-lora trained 10x shorter than moram is not compared against it in one table
    make_run(tmp_path, "moram", 0, MORAM[0][0])
    make_run(tmp_path, "seq-lora", 0, SEQ_LORA)
    make_run(tmp_path, "seq-lora", 1, SEQ_LORA, iterations=50)
    lb = L.aggregate(L.collect_runs(tmp_path))
    # the table with more runs first
    assert [[r.label for r in t.rows] for t in lb.tables] == [["moram", "seq-lora"], ["seq-lora"]]
    assert [t.distinct for t in lb.tables] == [{"stream.iterations": 500}, {"stream.iterations": 50}]
    assert not any(t.show_order for t in lb.tables)  # same task order: titles are the stream's name
    md = L.render_markdown(lb)
    assert "a photo of a {}.; stream.iterations=50*" in md and "a photo of a {}.; stream.iterations=500*" in md


def test_backbone_weights_recorded_by_the_run_name_and_split_the_tables(tmp_path):
    import json

    def with_weights(out, desc):
        met = json.loads((out / "metrics.json").read_text())
        met["backbone_weights"] = desc
        IO.atomic_write_json(out / "metrics.json", met)

    with_weights(make_run(tmp_path, "moram", 0, MORAM[0][0]), "ImageNet EfficientNet + MiniLM [key1]")
    with_weights(make_run(tmp_path, "seq-lora", 0, SEQ_LORA), "ImageNet EfficientNet + MiniLM [key2]")
    lb = L.aggregate(L.collect_runs(tmp_path))
    assert sorted(t.weights for t in lb.tables) == ["ImageNet EfficientNet + MiniLM [key1]",
                                                    "ImageNet EfficientNet + MiniLM [key2]"]
    assert "backbone mini-clip (ImageNet EfficientNet + MiniLM [key1])" in L.render_markdown(lb)


def test_backbone_weights_describes_pretrained_and_seeded_backbones():
    from types import SimpleNamespace

    from moram_bench.runner import backbone_weights

    assert backbone_weights(SimpleNamespace(info={"pretrained": "ImageNet", "weights_id": "abc"})) == "ImageNet [abc]"
    assert backbone_weights(SimpleNamespace(info={"init_seed": 3, "weights_id": "tiny:3"})) == "random init (seed 3) [tiny:3]"
    assert backbone_weights(SimpleNamespace(info={"weights": "SmolLM2", "weights_id": "a.gguf:12"})) == "SmolLM2 [a.gguf:12]"
    assert backbone_weights(SimpleNamespace(info={"weights": "/w/model", "weights_id": "/w/model"})) == "/w/model"
    assert backbone_weights(SimpleNamespace(info={})) is None


def test_unfinished_unreadable_and_duplicate_runs_are_listed(results):
    # interrupted after task 1 of 2: run_state finished false, 2 of 3 matrix rows
    make_run(results, "moram", 3, MORAM[0][0], finished=False, rows_written=2)
    # says finished but matrix.csv lost its last row
    bad = make_run(results, "seq-lora", 1, SEQ_LORA)
    IO.write_matrix_csv(bad / "matrix.csv", np.asarray(SEQ_LORA)[:2], NAMES)
    # corrupt metrics.json
    broken = make_run(results, "seq-lora", 2, SEQ_LORA)
    (broken / "metrics.json").write_text("{not json")
    # the same run copied elsewhere: same settings and seed -> not averaged twice
    make_run(results, "moram", 0, MORAM[0][0], subdir="copy/seed0")

    lb = L.aggregate(L.collect_runs(results))
    probs = {p.path.relative_to(results).as_posix(): p for p in lb.problems}
    assert set(probs) == {"runs/xtail-mini/moram/seed3", "runs/xtail-mini/seq-lora/seed1",
                          "runs/xtail-mini/seq-lora/seed2", "runs/xtail-mini/moram/seed0"} or \
        set(probs) == {"runs/xtail-mini/moram/seed3", "runs/xtail-mini/seq-lora/seed1",
                       "runs/xtail-mini/seq-lora/seed2", "runs/xtail-mini/moram/copy/seed0"}
    p = probs["runs/xtail-mini/moram/seed3"]
    assert p.status == "unfinished" and p.progress == "1/2 tasks" and p.seed == 3
    p = probs["runs/xtail-mini/seq-lora/seed1"]
    assert p.status == "unfinished" and "2 of T+1 = 3 rows" in p.reason and p.progress == "1/2 tasks"
    p = probs["runs/xtail-mini/seq-lora/seed2"]
    assert p.status == "unreadable" and "metrics.json is unreadable" in p.reason
    dup = [p for p in lb.problems if p.status == "duplicate"]
    assert len(dup) == 1 and "same settings and seed 0" in dup[0].reason

    rows = {r.label: r for r in lb.tables[0].rows}
    assert rows["moram"].n == 3 and rows["moram"].mean["last"] == pytest.approx(73.0)  # unchanged
    assert [u.seed for u in rows["moram"].unfinished] == [3]
    md = L.render_markdown(lb)
    assert "| moram | 3 (+1 unfinished) |" in md
    assert "## Unfinished and unreadable runs" in md
    assert "| moram | xtail-mini | 3 | 1/2 tasks | unfinished |" in md
    statuses = [r["status"] for r in csv.DictReader(io.StringIO(L.render_csv(lb)))]
    assert statuses.count("unfinished") == 2 and statuses.count("unreadable") == 1 and statuses.count("duplicate") == 1
    assert "% not in the tables:" in L.render_latex(lb)


def test_inconsistent_matrix_files_are_not_trusted(tmp_path):
    out = make_run(tmp_path, "moram", 0, MORAM[0][0])
    IO.write_matrix_csv(out / "matrix.csv", MORAM[1][0], NAMES)  # another run's matrix
    (rec,) = L.collect_runs(tmp_path)
    assert rec.status == "unreadable" and "different accuracy matrices" in rec.reason


def test_text_stream_headline_and_paper_references(tmp_path):
    # TRACE-like stream: OP, BWT, |BWT| (TRACE); best |BWT| is the smallest
    a = [[5, 5], [40, 10], [30, 50]]   # OP 40, bwt -10, clipped (-10 + 0)/2 -> |.| 5
    b = [[5, 5], [40, 10], [38, 44]]   # OP 41, bwt -2, |.| 1
    caps = {"max_train": None, "max_test": 40}
    make_run(tmp_path, "moram", 0, a, stream="trace", modality="text", backbone="llama", stream_settings=caps)
    make_run(tmp_path, "o-lora", 0, b, stream="trace", modality="text", backbone="llama", stream_settings=caps)
    lb = L.aggregate(L.collect_runs(tmp_path))
    (table,) = lb.tables
    assert "max train: all" in table.describe() and "max test: 40" in table.describe()
    assert [s.label for s in table.metrics] == ["OP", "Plasticity", "BWT", "|BWT| (TRACE)"]
    rows = {r.label: r for r in table.rows}
    assert rows["moram"].mean["bwt_trace_magnitude"] == pytest.approx(5.0)
    assert rows["o-lora"].best == {"last", "bwt", "bwt_trace_magnitude"}
    assert rows["moram"].best == {"plasticity"}  # diagonal (40 + 50) / 2 = 45 vs (40 + 44) / 2 = 42
    md = L.render_markdown(lb)
    assert "Paper reference numbers (TRACE" in md and "| MoRAM | LLaMA-2-7B-Chat | 44.54 | 1.37 |" in md
    paper = [r for r in csv.DictReader(io.StringIO(L.render_csv(lb))) if r["status"] == "paper"]
    assert len(paper) == 9 and paper[2]["method"] == "MoRAM" and paper[2]["bwt_trace_magnitude_mean"] == "1.37"
    assert "$|$BWT$|$ (TRACE)" in L.render_latex(lb)
    assert L.aggregate(L.collect_runs(tmp_path), references=False).tables[0].references is None


def test_references_only_for_real_streams():
    assert L.references_for("xtail")["rows"][3][0] == "MoRAM"
    refs = L.load_references()  # references.yaml in the package
    assert L.references_for("X-TAIL") is refs["xtail"]
    assert L.references_for("mtil") is refs["mtil"]
    assert L.references_for("mtil-order2") is None
    assert L.references_for("xtail-mini") is None and L.references_for("synthetic-tiny") is None
    assert L.references_for("trace") is refs["trace"]
    assert refs["trace"]["rows"][2] == ("MoRAM", "LLaMA-2-7B-Chat", {"last": 44.54, "bwt_trace_magnitude": 1.37})
    assert refs["xtail"]["rows"][3][2] == {"transfer": 63.3, "mtil_avg": 72.7, "last": 80.9}


def test_formatting_helpers():
    assert L.format_params(0) == "0" and L.format_params(950) == "950"
    assert L.format_params(12_345) == "12.3K" and L.format_params(1_234_567) == "1.23M"
    assert L.format_params(294_912) == "295K" and L.format_params(None) == "–"
    assert L.format_seconds(12.34) == "12.3 s" and L.format_seconds(300) == "5.0 min"
    assert L.format_seconds(3 * 3600) == "3.0 h"
    assert L.tex_escape("a_b & 50% #1") == "a\\_b \\& 50\\% \\#1"


def test_cli_writes_the_three_files_and_the_readme_block(results, capsys):
    (results / "README.md").write_text("intro\n<!-- leaderboard:start -->\nold\n<!-- leaderboard:end -->\nend\n")
    assert L.main([str(results)]) == 0
    out = capsys.readouterr().out
    assert "1 table(s), 3 row(s) from 5 finished run(s)" in out
    for name in ("LEADERBOARD.md", "leaderboard.csv", "leaderboard.tex"):
        assert (results / name).stat().st_size > 0
    md = (results / "LEADERBOARD.md").read_text()
    assert md.startswith("# Leaderboard") and "**73.00 ± 8.96**" in md
    # the stream's picture, linked from LEADERBOARD.md and (relative to it) from the README
    assert (results / "xtail-mini.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](xtail-mini.png)" in md
    readme = (results / "README.md").read_text()
    assert readme.startswith("intro\n<!-- leaderboard:start -->\n### Leaderboard")
    assert "\nold\n" not in readme and readme.endswith("<!-- leaderboard:end -->\nend\n")
    assert "#### xtail-mini" in readme
    # regenerating gives byte-identical files (no timestamps: the committed files only
    # change when the results do)
    before = {n: (results / n).read_bytes() for n in ("LEADERBOARD.md", "leaderboard.csv", "leaderboard.tex")}
    assert L.main([str(results)]) == 0
    assert before == {n: (results / n).read_bytes() for n in before}
    # other READMEs: only those with the markers are touched
    top, plain = results / "top.md", results / "plain.md"
    top.write_text("<!-- leaderboard:start -->\n<!-- leaderboard:end -->\n")
    plain.write_text("no markers")
    assert L.main([str(results), "--readme", str(top), "--readme", str(plain)]) == 0
    assert "**73.00 ± 8.96**" in top.read_text() and plain.read_text() == "no markers"
    sub = results / "docs"
    sub.mkdir()
    (sub / "deep.md").write_text("<!-- leaderboard:start -->\n<!-- leaderboard:end -->\n")
    assert L.main([str(results), "--readme", str(sub / "deep.md")]) == 0
    assert "](../xtail-mini.png)" in (sub / "deep.md").read_text()


def test_readme_markers_count_only_on_their_own_line(tmp_path):
    # the prose may quote the markers (`<!-- leaderboard:start -->`): that is not the block
    readme = tmp_path / "README.md"
    readme.write_text("Tables go between `<!-- leaderboard:start -->` and `<!-- leaderboard:end -->`.\n\n"
                      "<!-- leaderboard:start -->\nold\n<!-- leaderboard:end -->\ntail\n")
    assert L.update_readme(readme, "NEW")
    assert readme.read_text() == ("Tables go between `<!-- leaderboard:start -->` and `<!-- leaderboard:end -->`.\n\n"
                                  "<!-- leaderboard:start -->\nNEW\n<!-- leaderboard:end -->\ntail\n")
    quoted_only = tmp_path / "q.md"
    quoted_only.write_text("see `<!-- leaderboard:start -->` and `<!-- leaderboard:end -->`\n")
    assert not L.update_readme(quoted_only, "NEW")
    assert not L.update_readme(tmp_path / "missing.md", "NEW")


def test_cli_errors(tmp_path, capsys):
    assert L.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert L.main([str(tmp_path)]) == 1
    assert "no run directories" in capsys.readouterr().err
    assert not (tmp_path / "LEADERBOARD.md").exists()
    assert L.main(["--bogus"]) == 2


def test_protocol_settings_shown_and_seed_dependent_ones_ignored(tmp_path):
    templates = {d: f"a photo of a {{}}, from {d}." for d in ("d1", "d2", "d3", "d4")}
    for seed in (0, 1):
        settings = {"protocol": "X-TAIL (embedded mini)", "shots": 16, "shot_seed": seed, "test": "full",
                    "templates": templates, "data_sha256": {"d1.npz": "ab12"}, "per_domain": {"d1": {"seed": seed}}}
        make_run(tmp_path, "moram", seed, MORAM[seed][0], stream_settings=settings)
    lb = L.aggregate(L.collect_runs(tmp_path))
    (table,) = lb.tables  # shot_seed follows the run's seed: still one table, one row of 2 seeds
    assert table.rows[0].n == 2
    md = L.render_markdown(lb)
    assert "protocol: X-TAIL (embedded mini); shots: 16; templates: 4 values; test: full*" in md
    assert "Templates: `d1: a photo of a {}, from d1.`; `d2: a photo of a {}, from d2.`;" in md
    assert "ab12" not in md and "shot seed" not in md
    # other data (another hash) is another protocol
    settings["data_sha256"] = {"d1.npz": "cd34"}
    make_run(tmp_path, "moram", 2, MORAM[2][0], stream_settings=settings)
    assert len(L.aggregate(L.collect_runs(tmp_path)).tables) == 2


# ------------------------------------------------------------------ statistics by hand


def test_t_quantiles_match_the_table():
    for df, t in T975.items():
        assert L.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert L.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        L.t_quantile(0.975, 0)


def test_confidence_interval_half_width():
    # n = 5, std 2: 2.7764 * 2 / sqrt(5) = 2.4833;  n = 10, std 1: 2.2622 / sqrt(10) = 0.71536
    assert L.ci95(2.0, 5) == pytest.approx(T975[4] * 2 / math.sqrt(5), rel=1e-4)
    assert L.ci95(1.0, 10) == pytest.approx(0.71536, rel=1e-4)
    assert L.ci95(3.0, 1) is None and L.ci95(None, 4) is None


def test_paired_t_test_p_values_by_hand():
    # d = a - b = [1, 3]: mean 2, sd sqrt(2), t = 2 / (sqrt(2) / sqrt(2)) = 2, df 1:
    #   p = 1 - 2 atan(2) / pi = 1 - 2 * 1.107149 / 3.141593 = 0.295167
    assert L.paired_t_test([11, 13], [10, 10]) == pytest.approx(1 - 2 * math.atan(2) / math.pi, rel=1e-9)
    assert L.paired_t_test([11, 13], [10, 10]) == pytest.approx(0.295167, abs=1e-6)
    # d = [1, 2, 3]: mean 2, sd 1, t = 2 * sqrt(3) = 3.4641, df 2:
    #   p = 1 - t / sqrt(2 + t^2) = 1 - 3.4641 / sqrt(14) = 0.074180
    assert L.paired_t_test([3, 4, 5], [2, 2, 2]) == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=1e-9)
    # the sign does not matter (two-sided)
    assert L.paired_t_test([2, 2, 2], [3, 4, 5]) == pytest.approx(0.074180, abs=1e-6)
    # identical pairs: no difference at all; a constant shift: no noise to hide it
    assert L.paired_t_test([5, 6, 7], [5, 6, 7]) == 1.0
    assert L.paired_t_test([6, 7, 8], [5, 6, 7]) == 0.0
    assert L.paired_t_test([1], [2]) is None
    with pytest.raises(ValueError):
        L.paired_t_test([1, 2], [1])


# T = 1 runs: every "seen tasks" metric is the single entry R[1, 1], so Last = the value.
# Rows of 'last' over seeds 0, 1, 2 (A is the best, mean 73):
#   A 70, 72, 77
#   B 60, 61, 65: A - B = 10, 11, 12: mean 11, sd 1, t = 11 sqrt(3) = 19.053, df 2:
#     p = 1 - 19.053 / sqrt(2 + 363) = 0.0027 < 0.05 -> significantly worse, not tied
#   C 62.5, 71, 74: A - C = 7.5, 1, 3: mean 23/6, sd sqrt(133/12) = 3.3292,
#     t = (23/6) / (3.3292 / sqrt(3)) = 1.9944, p = 1 - 1.9944 / sqrt(2 + 3.9776) = 0.1843 -> tied
#   D 72 on seed 0 only: one common seed with A, untested, not tied
#   Z 99 on every seed but trains nothing: a reference, never marked
LAST_BY_ROW = {"a": (70, 72, 77), "b": (60, 61, 65), "c": (62.5, 71, 74), "d": (72,), "z": (99, 99, 99)}


@pytest.fixture
def noisy(tmp_path):
    for method, values in LAST_BY_ROW.items():
        for seed, v in enumerate(values):
            make_run(tmp_path, method, seed, [[5.0], [v]], trainable=(0,) if method == "z" else (10,))
    return tmp_path


def test_tied_best_by_paired_t_test(noisy):
    (table,) = L.aggregate(L.collect_runs(noisy)).tables
    rows = {r.method: r for r in table.rows}
    a, b, c, d, z = (rows[k] for k in "abcdz")
    assert a.best == {"last", "mtil_avg", "avg_incremental", "plasticity"} == a.tied_best
    assert b.tied_best == set() and b.p_vs_best["last"] == pytest.approx(1 - 11 * math.sqrt(3) / math.sqrt(365),
                                                                          rel=1e-9)
    t_c = (23 / 6) / (math.sqrt(133 / 12) / math.sqrt(3))
    assert c.p_vs_best["last"] == pytest.approx(1 - t_c / math.sqrt(2 + t_c ** 2), rel=1e-9)
    assert c.p_vs_best["last"] == pytest.approx(0.1843, abs=1e-4)
    assert "last" in c.tied_best and "last" not in c.best
    assert d.p_vs_best["last"] is None and d.tied_best == set()
    assert z.reference and z.tied_best == set() and z.p_vs_best == {}
    # B: mean 62, sd sqrt(7), CI 4.3027 * sqrt(7) / sqrt(3) = 6.5725
    assert b.mean["last"] == pytest.approx(62.0) and b.ci["last"] == pytest.approx(6.5725, abs=1e-4)
    # undefined for T = 1 (bwt, forgetting, transfer): nothing to mark
    assert all("bwt" not in r.tied_best and r.mean["bwt"] is None for r in table.rows)

    md = L.render_markdown(L.aggregate(L.collect_runs(noisy)))
    assert "| a | 3 | **73.00 ± 8.96** |" in md
    assert "| b | 3 | 62.00 ± 6.57 |" in md
    assert "| c | 3 | **69.17 ± " in md and "** ≈ |" in md
    assert "| d | 1 (missing seeds 1, 2) | 72.00 ± – |" in md
    csv_rows = {r["method"]: r for r in csv.DictReader(io.StringIO(L.render_csv(L.aggregate(L.collect_runs(noisy)))))}
    assert [csv_rows[k]["last_tied_best"] for k in "abcdz"] == ["true", "false", "true", "false", "false"]
    assert float(csv_rows["c"]["last_p_vs_best"]) == pytest.approx(0.1843, abs=1e-4)
    assert csv_rows["d"]["last_p_vs_best"] == "" and csv_rows["a"]["bwt_tied_best"] == ""
    tex = L.render_latex(L.aggregate(L.collect_runs(noisy)))
    assert "c & 3 & \\textbf{69.17 $\\pm$ " in tex and "} $\\approx$ &" in tex


# ------------------------------------------------------------ names, orders, transforms


def test_display_name_names_the_row(tmp_path):
    # a method may name its row (e.g. l2p on a CNN backbone: 'l2p (text prompts)'), top level
    # or among its method facts
    make_run(tmp_path, "l2p", 0, MORAM[0][0], method_settings={"display_name": "l2p (text prompts)"})
    out = make_run(tmp_path, "moram", 0, MORAM[1][0])
    met = json.loads((out / "metrics.json").read_text())
    met["display_name"] = "MoRAM (ours)"
    IO.atomic_write_json(out / "metrics.json", met)
    (table,) = L.aggregate(L.collect_runs(tmp_path)).tables
    assert sorted(r.label for r in table.rows) == ["MoRAM (ours)", "l2p (text prompts)"]
    assert "| l2p (text prompts) | 1 |" in L.render_markdown(L.aggregate(L.collect_runs(tmp_path)))


def test_a_second_domain_order_is_a_separate_table_labelled_by_its_order(tmp_path):
    def with_order(out, names, domains):
        met = json.loads((out / "metrics.json").read_text())
        met["task_names"] = names
        met["config"]["stream"]["domains"] = domains
        IO.atomic_write_json(out / "metrics.json", met)
        IO.write_matrix_csv(out / "matrix.csv", met["matrix"], names)

    for seed in range(3):
        with_order(make_run(tmp_path, "moram", seed, MORAM[seed][0]), ["alpha", "beta"], None)
        with_order(make_run(tmp_path, "seq-lora", seed, MORAM[seed][0]), ["alpha", "beta"], None)
        with_order(make_run(tmp_path, "moram", seed, SEQ_LORA, subdir=f"order2/seed{seed}"),
                   ["beta", "alpha"], ["beta", "alpha"])
    lb = L.aggregate(L.collect_runs(tmp_path))
    main, held_out = lb.tables  # the table with more runs first
    assert main.title == "xtail-mini, task order alpha → beta" and len(main.rows) == 2
    assert held_out.title == "xtail-mini, task order beta → alpha" and len(held_out.rows) == 1
    # the differing setting is named, the order itself only once (in the title)
    assert main.describe().endswith("stream.domains=default") and "stream.domains" not in held_out.describe()
    md = L.render_markdown(lb)
    assert "## xtail-mini, task order alpha → beta" in md and "## xtail-mini, task order beta → alpha" in md
    assert "task order beta $\\rightarrow$ alpha" in L.render_latex(lb)
    orders = [r["task_order"] for r in csv.DictReader(io.StringIO(L.render_csv(lb)))]
    assert orders == ["alpha;beta", "alpha;beta", "beta;alpha"]


def test_equal_sized_tables_put_the_default_settings_first(tmp_path):
    def with_domains(out, domains):
        met = json.loads((out / "metrics.json").read_text())
        met["config"]["stream"]["domains"] = domains
        IO.atomic_write_json(out / "metrics.json", met)

    with_domains(make_run(tmp_path, "moram", 0, MORAM[0][0], subdir="a/seed0"), ["a", "b"])
    with_domains(make_run(tmp_path, "moram", 0, MORAM[1][0], subdir="z/seed0"), None)
    lb = L.aggregate(L.collect_runs(tmp_path))
    assert [t.distinct["stream.domains"] for t in lb.tables] == [None, ["a", "b"]]
    assert "The table's one run: 12.0 s." in L.render_markdown(lb)


def test_training_through_the_evaluation_transform_is_stated(tmp_path):
    # the data module records which transform training used: "train" (augmentation) or "eval"
    settings = {"shots": 16, "train_transform": "eval"}
    make_run(tmp_path, "moram", 0, MORAM[0][0], stream_settings=settings)
    make_run(tmp_path, "moram", 0, MORAM[0][0], stream_settings={"shots": 16, "train_transform": "train"},
             subdir="aug/seed0")
    lb = L.aggregate(L.collect_runs(tmp_path))
    assert len(lb.tables) == 2  # another training transform is another protocol
    md = L.render_markdown(lb)
    assert md.count("Training images go through the evaluation transform") == 1
    assert "(train transform: eval): no training augmentation" in md and "train transform: train" in md


# ------------------------------------------------------------------------- CLI errors


def test_cli_a_file_is_not_a_results_folder(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("x")
    assert L.main([str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a file, not a folder" in err and "does not exist" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_only_unfinished_runs_leave_the_old_leaderboard(tmp_path, capsys):
    make_run(tmp_path, "moram", 0, MORAM[0][0], finished=False, rows_written=2)
    for name in ("LEADERBOARD.md", "leaderboard.csv"):
        (tmp_path / name).write_text("the committed leaderboard\n")
    assert L.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no finished runs") and "left as they are" in err
    assert "moram/seed0: unfinished, 1/2 tasks" in err
    for name in ("LEADERBOARD.md", "leaderboard.csv"):
        assert (tmp_path / name).read_text() == "the committed leaderboard\n"
    assert not (tmp_path / "leaderboard.tex").exists() and not (tmp_path / "xtail-mini.png").exists()


def test_cli_read_only_folder_is_one_line_and_exit_2(results, capsys, monkeypatch):
    # (the tests may run as root, for whom chmod does not block writes: simulate the
    # refusal the operating system gives a read-only folder)
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    (results / "LEADERBOARD.md").write_text("old\n")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert L.main([str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write into") and "Permission denied" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (results / "LEADERBOARD.md").read_text() == "old\n"


def test_cli_write_failure_midway_is_one_line(results, capsys, monkeypatch):
    from moram_bench.leaderboard import cli

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cli, "atomic_write_text", refuse)
    assert L.main([str(results), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the leaderboard") and "LEADERBOARD.md" in err
    assert len(err.strip().splitlines()) == 1
