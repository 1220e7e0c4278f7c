"""Metrics of the accuracy matrix, checked against values computed by hand.

Notation in the comments: R[i, j] with 1-based task columns as in docs/PROTOCOLS.md (row 0 =
zero-shot, row i = after task i). In numpy that is R[i, j - 1].
"""
import json
import math
import os
import stat

import numpy as np
import pytest

from moram_bench import metrics as M
from moram_bench import results_io as IO
from moram_bench.metrics import (
    avg_incremental,
    bwt,
    bwt_trace_clipped,
    compute_all,
    forgetting,
    format_matrix,
    format_metrics,
    fwt,
    last,
    mtil_avg,
    partial_metrics,
    plasticity,
    transfer,
    validate_matrix,
    validate_rows,
)
from moram_bench.results_io import (
    MatrixFileError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_matrix_csv,
    write_matrix_csv,
)

approx = pytest.approx

# ---------------------------------------------------------------------------------------
# T = 2
#            task1  task2
# row 0       50     40      (zero-shot)
# row 1       80     45
# row 2       70     94
R2 = [[50, 40], [80, 45], [70, 94]]


def test_t2_by_hand():
    # last = (R[2,1] + R[2,2]) / 2 = (70 + 94) / 2 = 82
    assert last(R2) == approx(82.0)
    # avg_incremental = mean(R[1,1], mean(R[2,1], R[2,2])) = mean(80, 82) = 81
    assert avg_incremental(R2) == approx(81.0)
    # mtil_avg = (80 + 45 + 70 + 94) / 4 = 289 / 4 = 72.25
    assert mtil_avg(R2) == approx(72.25)
    # transfer: j=2 only: mean over i=1..1 of R[i,2] = R[1,2] = 45
    assert transfer(R2) == approx(45.0)
    # bwt = 1/1 * (R[2,1] - R[1,1]) = 70 - 80 = -10
    assert bwt(R2) == approx(-10.0)
    # bwt_trace_clipped = 1/2 * (min(70-80, 0) + min(94-94, 0)) = -10/2 = -5
    assert bwt_trace_clipped(R2) == approx(-5.0)
    # forgetting = 1/1 * (max over l in 1..1 of R[l,1] - R[2,1]) = 80 - 70 = 10
    assert forgetting(R2) == approx(10.0)
    # fwt = 1/1 * (R[1,2] - R[0,2]) = 45 - 40 = 5
    assert fwt(R2) == approx(5.0)


# ---------------------------------------------------------------------------------------
# T = 3, with a backward gain on task 1 after task 2 (so forgetting's max over rows j..T-1
# differs from the diagonal variant) and a gain on task 2 after task 3 (clipped by TRACE).
#            task1  task2  task3
# row 0       30     20     12
# row 1       60     25     12
# row 2       66     70     15
# row 3       50     75     80
R3 = [[30, 20, 12], [60, 25, 12], [66, 70, 15], [50, 75, 80]]


def test_t3_by_hand():
    # last = (50 + 75 + 80) / 3 = 205 / 3
    assert last(R3) == approx(205 / 3)
    # avg_incremental: t=1: 60; t=2: (66+70)/2 = 68; t=3: 205/3
    #   -> (60 + 68 + 205/3) / 3 = 589 / 9 = 65.444...
    assert avg_incremental(R3) == approx(589 / 9)
    # mtil_avg: rows 1..3 sum to 97 + 151 + 205 = 453 -> 453 / 9
    assert mtil_avg(R3) == approx(453 / 9)
    # transfer: j=2: R[1,2] = 25; j=3: mean(R[1,3], R[2,3]) = (12 + 15)/2 = 13.5
    #   -> (25 + 13.5) / 2 = 19.25
    assert transfer(R3) == approx(19.25)
    # bwt: j=1: R[3,1]-R[1,1] = 50-60 = -10; j=2: R[3,2]-R[2,2] = 75-70 = +5
    #   -> (-10 + 5) / 2 = -2.5
    assert bwt(R3) == approx(-2.5)
    # bwt_trace_clipped: (min(-10,0) + min(5,0) + min(80-80,0)) / 3 = -10/3
    assert bwt_trace_clipped(R3) == approx(-10 / 3)
    # forgetting: j=1: max(R[1,1], R[2,1]) = max(60, 66) = 66, minus R[3,1]=50 -> 16
    #             j=2: max(R[2,2]) = 70, minus R[3,2]=75 -> -5
    #   -> (16 - 5) / 2 = 5.5   (the "diagonal" variant would give (10 - 5)/2 = 2.5)
    assert forgetting(R3) == approx(5.5)
    # fwt: j=2: R[1,2] - R[0,2] = 25 - 20 = 5; j=3: R[2,3] - R[0,3] = 15 - 12 = 3
    #   -> (5 + 3) / 2 = 4
    assert fwt(R3) == approx(4.0)


def test_plasticity_is_the_mean_of_the_diagonal():
    # R3's diagonal: R[1,1] = 60, R[2,2] = 70, R[3,3] = 80 -> (60 + 70 + 80) / 3 = 70
    assert plasticity(R3) == approx(70.0)
    # R2: R[1,1] = 80, R[2,2] = 94 -> 87
    assert plasticity(R2) == approx(87.0)
    # T = 1: the single trained entry R[1,1] = 33 (row 0 never counts)
    assert plasticity([[99.0], [33.0]]) == approx(33.0)
    # 4 tasks, off-diagonal entries set to 100 so that reading them would show:
    #   diagonal 10, 20, 30, 0 (an exact zero counts) -> 60 / 4 = 15
    R4 = np.full((5, 4), 100.0)
    R4[1, 0], R4[2, 1], R4[3, 2], R4[4, 3] = 10, 20, 30, 0
    assert plasticity(R4) == approx(15.0)
    assert compute_all(R4)["plasticity"] == approx(15.0)
    # a run stopped after task 2 of 3: the plasticity of the first two tasks, (60 + 70) / 2
    assert partial_metrics(R3[:3])["plasticity"] == approx(65.0)
    assert partial_metrics(R3[:1])["plasticity"] is None


def test_file_helpers_still_importable_from_metrics():
    # moved to results_io; old callers (metrics.atomic_write_json, ...) keep working
    for name in ("MatrixFileError", "write_matrix_csv", "read_matrix_csv", "atomic_write_text",
                 "atomic_write_bytes", "atomic_write_json"):
        assert getattr(M, name) is getattr(IO, name)
    from moram_bench.metrics import atomic_write_json as old

    assert old is IO.atomic_write_json
    with pytest.raises(AttributeError):
        M.no_such_name


def test_compute_all_t3_and_note():
    d = compute_all(np.array(R3))
    assert d["num_tasks"] == 3
    for name in M.METRIC_NAMES:
        assert d[name] == approx(getattr(M, name)(R3))
        assert type(d[name]) is float
    assert d["bwt_trace_magnitude"] == approx(10 / 3)  # TRACE reports the magnitude
    assert d["zero_shot_avg"] == approx(62 / 3)  # (30 + 20 + 12) / 3
    assert "macro" in d["averaging"] and "task-averaged" in d["averaging"]
    json.dumps(d, allow_nan=False)  # plain JSON types only


# ---------------------------------------------------------------------------------------
# Exact zeros in the upper triangle (and in row 0 and the last row): value-masking
# (treating 0 as "not evaluated", as the official X-TAIL code does) would drop them.
#            task1  task2  task3
# row 0       10      0      5
# row 1       80     20      0     <- exact 0 above the diagonal
# row 2       70     90     30
# row 3        0     85     95     <- exact 0 in the final row
RZ = [[10, 0, 5], [80, 20, 0], [70, 90, 30], [0, 85, 95]]


def test_exact_zero_counts():
    # transfer: j=2: R[1,2] = 20; j=3: (R[1,3] + R[2,3]) / 2 = (0 + 30)/2 = 15 -> 17.5
    #   (value-masked: j=3 -> 30, transfer 25)
    assert transfer(RZ) == approx(17.5)
    # mtil_avg: (80+20+0 + 70+90+30 + 0+85+95) / 9 = 470 / 9   (value-masked: /7)
    assert mtil_avg(RZ) == approx(470 / 9)
    # last: (0 + 85 + 95) / 3 = 60
    assert last(RZ) == approx(60.0)
    # avg_incremental: 80; (70+90)/2 = 80; 60 -> 220/3
    assert avg_incremental(RZ) == approx(220 / 3)
    # fwt: j=2: R[1,2]-R[0,2] = 20-0 = 20; j=3: R[2,3]-R[0,3] = 30-5 = 25 -> 22.5
    assert fwt(RZ) == approx(22.5)
    # bwt: j=1: 0-80 = -80; j=2: 85-90 = -5 -> -42.5
    assert bwt(RZ) == approx(-42.5)
    # forgetting: j=1: max(80, 70) - 0 = 80; j=2: 90 - 85 = 5 -> 42.5
    assert forgetting(RZ) == approx(42.5)
    # bwt_trace_clipped: (-80 - 5 + 0) / 3
    assert bwt_trace_clipped(RZ) == approx(-85 / 3)


def test_all_zero_matrix_is_valid():
    d = compute_all(np.zeros((4, 3)))
    for name in M.METRIC_NAMES:
        assert d[name] == 0.0
    assert not math.copysign(1.0, d["bwt_trace_clipped"]) < 0  # no "-0.0" in output


# ---------------------------------------------------------------------------------------
# Sign conventions: bwt (GEM) is negative when forgetting, forgetting (Chaudhry) positive,
# bwt_trace_clipped only sees drops.


def test_sign_conventions_forgetting():
    R = [[0, 0], [100, 0], [50, 100]]
    # bwt = 50 - 100 = -50; forgetting = 100 - 50 = 50; trace = min(-50,0)/2 = -25
    assert bwt(R) == approx(-50.0)
    assert forgetting(R) == approx(50.0)
    assert bwt_trace_clipped(R) == approx(-25.0)
    assert compute_all(R)["bwt_trace_magnitude"] == approx(25.0)


def test_sign_conventions_backward_gain():
    R = [[0, 0], [50, 0], [100, 100]]
    # bwt = 100 - 50 = +50; forgetting = 50 - 100 = -50; trace clips gains: 0
    assert bwt(R) == approx(50.0)
    assert forgetting(R) == approx(-50.0)
    assert bwt_trace_clipped(R) == 0.0


def test_fwt_reference_is_row_zero():
    # Same rows 1..2, different zero-shot row 0: only fwt changes, by -(delta of R[0,2]).
    a = [[10, 30], [80, 50], [70, 90]]
    b = [[10, 10], [80, 50], [70, 90]]
    # fwt(a) = R[1,2] - R[0,2] = 50 - 30 = 20; fwt(b) = 50 - 10 = 40
    assert fwt(a) == approx(20.0)
    assert fwt(b) == approx(40.0)
    # row 0's task-1 entry plays no part in fwt (j starts at 2)
    c = [[99, 30], [80, 50], [70, 90]]
    assert fwt(c) == approx(20.0)
    for name in ("last", "avg_incremental", "mtil_avg", "transfer", "bwt", "forgetting"):
        assert getattr(M, name)(a) == getattr(M, name)(b)


# ---------------------------------------------------------------------------------------
# T = 1


def test_t1_edge_cases():
    R = [[40.0], [75.0]]
    assert last(R) == 75.0
    assert avg_incremental(R) == 75.0
    assert mtil_avg(R) == 75.0
    assert transfer(R) is None
    assert bwt(R) is None
    assert forgetting(R) is None
    assert fwt(R) is None
    assert bwt_trace_clipped(R) == 0.0  # only the j = T term, which is 0
    d = compute_all(R)
    assert d["transfer"] is None and d["bwt"] is None and d["fwt"] is None
    assert json.loads(json.dumps(d, allow_nan=False))["bwt"] is None
    assert "n/a" in format_metrics(d)


# ---------------------------------------------------------------------------------------
# partial matrices (run in progress)


def test_partial_metrics_k0():
    d = partial_metrics(np.array(R3[:1]))
    assert d["tasks_done"] == 0 and d["num_tasks"] == 3
    assert d["zero_shot_avg"] == approx(62 / 3)
    assert d["avg_all"] == approx(62 / 3)
    assert d["avg_seen"] is None
    for name in M.METRIC_NAMES:
        assert d[name] is None
    json.dumps(d, allow_nan=False)


def test_partial_metrics_k1_k2():
    d1 = partial_metrics(R3[:2])
    # k=1: avg_seen = R[1,1] = 60; avg_all = (60+25+12)/3 = 97/3
    assert d1["tasks_done"] == 1
    assert d1["avg_seen"] == approx(60.0)
    assert d1["avg_all"] == approx(97 / 3)
    assert d1["last"] == approx(60.0)
    assert d1["bwt"] is None and d1["forgetting"] is None and d1["fwt"] is None
    d2 = partial_metrics(R3[:3])
    # k=2, the block [[30,20],[60,25],[66,70]]:
    #   avg_seen = (66+70)/2 = 68; avg_all = (66+70+15)/3 = 151/3
    #   avg_incremental = (60 + 68)/2 = 64; mtil_avg = (60+25+66+70)/4 = 55.25
    #   transfer = R[1,2] = 25; bwt = 66 - 60 = 6; trace = (min(6,0)+0)/2 = 0
    #   forgetting = 60 - 66 = -6; fwt = 25 - 20 = 5
    assert d2["avg_seen"] == approx(68.0)
    assert d2["avg_all"] == approx(151 / 3)
    assert d2["avg_incremental"] == approx(64.0)
    assert d2["mtil_avg"] == approx(55.25)
    assert d2["transfer"] == approx(25.0)
    assert d2["bwt"] == approx(6.0)
    assert d2["bwt_trace_clipped"] == 0.0
    assert d2["forgetting"] == approx(-6.0)
    assert d2["fwt"] == approx(5.0)


def test_partial_metrics_complete_equals_compute_all():
    d = partial_metrics(R3)
    full = compute_all(R3)
    for name in M.METRIC_NAMES + ("bwt_trace_magnitude",):
        assert d[name] == approx(full[name])
    assert d["avg_seen"] == d["avg_all"] == approx(full["last"])
    assert "tasks_done" in format_metrics(d)


def test_partial_rows_validation():
    with pytest.raises(ValueError, match="rows"):
        validate_rows(np.zeros((5, 3)))  # more than T + 1 rows
    with pytest.raises(ValueError, match="rows"):
        validate_rows(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="expected 4 tasks"):
        validate_rows(np.zeros((2, 3)), num_tasks=4)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        partial_metrics([[10, 20], [101, 3]])


# ---------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((3, 3)), "T \\+ 1"),  # T rows instead of T + 1 (e.g. row 0 missing)
        (np.zeros((5, 3)), "T \\+ 1"),
        (np.zeros((4, 3)).T, "T \\+ 1"),  # transposed
        (np.zeros(4), "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.zeros((1, 0)), "no task columns"),
        ([[1, 2], [3, float("nan")], [5, 6]], "non-finite"),
        ([[1, 2], [3, float("inf")], [5, 6]], "non-finite"),
        ([[1, 2], [3, -0.5], [5, 6]], r"\[0, 100\]"),
        ([[1, 2], [3, 100.01], [5, 6]], r"\[0, 100\]"),
        ([["a", 2], [3, 4], [5, 6]], "numbers"),
        ([[1, 2], [3], [5, 6]], "numbers"),  # ragged
    ],
)
def test_validate_matrix_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        validate_matrix(bad)
    with pytest.raises(ValueError):
        compute_all(bad)


def test_validate_matrix_ok():
    out = validate_matrix([[0, 100], [100, 0], [50.5, 0]])
    assert out.dtype == np.float64 and out.shape == (3, 2)


def test_fraction_scale_hint():
    with pytest.raises(ValueError, match="multiplied by 100"):
        validate_matrix([[0.5, 120.0], [0.4, 0.3], [0.2, 0.1]])


# ---------------------------------------------------------------------------------------
# formatting


def test_format_matrix():
    names = ["aircraft", "a_very_long_task_name_indeed", "dtd"]
    text = format_matrix(R3, names)
    lines = text.splitlines()
    assert "rows: after training task i" in lines[0]
    table = lines[1:]
    assert len({len(line) for line in table}) == 1  # fixed width
    assert "0 (zero-shot)" in table[2]
    assert table[3].startswith("1 ") and table[5].startswith("3 ")
    assert "a_very_lon.." in table[0] and "a_very_long_task_name_indeed" not in text
    assert "66.00" in table[4] and "80.00" in table[5]
    # partial
    ptext = format_matrix(R3[:2], names)
    assert len(ptext.splitlines()) == 1 + 2 + 2
    with pytest.raises(ValueError, match="task names"):
        format_matrix(R3, names[:2])


def test_format_metrics():
    text = format_metrics(compute_all(R2))
    assert "last" in text and "82.00" in text
    assert "bwt_trace_magnitude" in text and "5.00" in text
    assert "macro" in text


# ---------------------------------------------------------------------------------------
# matrix.csv and atomic writes


def _no_temp_files(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_csv_round_trip(tmp_path):
    R = np.array([[33.3333333, 0.0], [100.0, 12.3456], [0.004, 99.99]])
    names = ["aircraft", "needs, quoting \"here\""]
    p = tmp_path / "matrix.csv"
    write_matrix_csv(p, R, names)
    lines = p.read_text().splitlines()
    assert lines[0] == 'after_task,aircraft,"needs, quoting ""here"""'
    assert lines[1] == "0,33.3333,0.0000"
    rows, got_names = read_matrix_csv(p)
    assert got_names == names
    assert rows.shape == (3, 2)
    np.testing.assert_allclose(rows, R, atol=5e-5)
    assert _no_temp_files(tmp_path) == []


def test_csv_partial_round_trip_and_overwrite(tmp_path):
    p = tmp_path / "sub" / "matrix.csv"  # parent created
    names = ["a", "b", "c"]
    write_matrix_csv(p, R3[:1], names)
    rows, _ = read_matrix_csv(p)
    assert rows.shape == (1, 3)
    write_matrix_csv(p, R3[:3], names, decimals=2)  # next evaluation overwrites
    rows, _ = read_matrix_csv(p)
    np.testing.assert_array_equal(rows, np.array(R3[:3], dtype=float))
    assert p.read_text().splitlines()[1] == "0,30.00,20.00,12.00"
    assert _no_temp_files(p.parent) == []


def test_csv_write_errors(tmp_path):
    p = tmp_path / "m.csv"
    with pytest.raises(ValueError, match="task names"):
        write_matrix_csv(p, R2, ["only-one"])
    with pytest.raises(ValueError, match="duplicate"):
        write_matrix_csv(p, R2, ["x", "x"])
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        write_matrix_csv(p, [[1, 2], [3, 400]], ["x", "y"])
    with pytest.raises(ValueError, match="decimals"):
        write_matrix_csv(p, R2, ["x", "y"], decimals=6)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty"),
        ("\n\n", "empty"),
        ("task,a,b\n0,1,2\n", "after_task"),
        ("after_task\n0\n", "no task columns"),
        ("after_task,a,b\n", "no rows"),
        ("after_task,a,b\n0,1\n", ":2: 2 fields"),
        ("after_task,a,b\n0,1,2,3\n", ":2: 4 fields"),
        ("after_task,a,b\n1,1,2\n", "row index 1, expected 0"),
        ("after_task,a,b\n0,1,2\n2,1,2\n", ":3: row index 2, expected 1"),
        ("after_task,a,b\nzero,1,2\n", "not an integer"),
        ("after_task,a,b\n0,1,abc\n", "'abc' for task 'b' is not a number"),
        ("after_task,a,b\n0,1,nan\n", "not in \\[0, 100\\]"),
        ("after_task,a,b\n0,1,100.5\n", "not in \\[0, 100\\]"),
        ("after_task,a,b\n0,1,-1\n", "not in \\[0, 100\\]"),
        ("after_task,a,b\n0,1,2\n1,1,2\n2,1,2\n3,1,2\n", "4 rows for 2 tasks"),
        ("after_task,a,a\n0,1,2\n", "duplicate"),
        ("after_task,a,\n0,1,2\n", "non-empty"),
    ],
)
def test_csv_read_errors(tmp_path, content, match):
    p = tmp_path / "matrix.csv"
    p.write_text(content)
    with pytest.raises(MatrixFileError, match=match) as ei:
        read_matrix_csv(p)
    assert str(p) in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_csv_read_missing_file(tmp_path):
    with pytest.raises(MatrixFileError, match="no such matrix file"):
        read_matrix_csv(tmp_path / "nope.csv")


def test_atomic_write_text_and_mode(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    um = os.umask(0o022)
    os.umask(um)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~um  # like a plain open(..., "w")
    atomic_write_text(p, "second")
    assert p.read_text() == "second"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "keep.json"
    atomic_write_json(p, {"v": 1})

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(IO.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(p, b"new content")
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"v": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.json"]  # temp file removed
    # unserialisable object: fails before touching anything
    with pytest.raises(TypeError):
        atomic_write_json(p, {"v": object()})
    assert json.loads(p.read_text()) == {"v": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.json"]


def test_atomic_write_json_types(tmp_path):
    p = tmp_path / "deep" / "m.json"
    obj = {
        "metrics": compute_all(R3),
        "rows": np.array(R3[:2]),
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(7),
        "nan": float("nan"),
        "inf": np.inf,
        "tuple": (1, 2),
        "path": tmp_path,
        np.int64(3): "numpy key",
    }
    atomic_write_json(p, obj)
    text = p.read_text()
    assert text.endswith("\n")
    back = json.loads(text)  # strict JSON
    assert back["rows"] == [[30.0, 20.0, 12.0], [60.0, 25.0, 12.0]]
    assert back["np_scalar"] == 1.5 and back["np_int"] == 7
    assert back["nan"] is None and back["inf"] is None
    assert back["tuple"] == [1, 2] and back["path"] == str(tmp_path)
    assert back["3"] == "numpy key"
    assert back["metrics"]["transfer"] == approx(19.25)
    assert _no_temp_files(p.parent) == []
