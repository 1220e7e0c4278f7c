"""The plots are produced headless as valid PNGs, for complete and partial matrices."""
import json

import numpy as np
import pytest
from PIL import Image

from moram_bench import plots
from moram_bench.plots import (
    curve_png,
    heatmap_figure,
    heatmap_figsize,
    heatmap_png,
    routing_figure,
    routing_png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["aircraft", "caltech101", "dtd", "eurosat_with_a_rather_long_name"]


def _matrix(T, seed=0):
    return np.random.default_rng(seed).uniform(0, 100, size=(T + 1, T))


def _check_png(path, size_in=None):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    if size_in is not None:
        ew, eh = size_in[0] * plots.DPI, size_in[1] * plots.DPI
        assert abs(w - ew) <= 2 and abs(h - eh) <= 2, (w, h, ew, eh)
    # no temp files left beside it
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    return w, h


def test_heatmap_png_complete(tmp_path):
    p = heatmap_png(_matrix(4), NAMES, tmp_path / "heatmap.png", title="a title")
    assert p == tmp_path / "heatmap.png"
    _check_png(p, heatmap_figsize(4))


@pytest.mark.parametrize("k", [0, 3])
def test_heatmap_png_partial(tmp_path, k):
    # a run in progress: rows 0..k only; same picture size as the complete one
    p = heatmap_png(_matrix(4)[: k + 1], NAMES, tmp_path / "sub" / f"h{k}.png")
    _check_png(p, heatmap_figsize(4))


def test_heatmap_figure_contents():
    R = _matrix(4)
    fig = heatmap_figure(R[:3], NAMES)
    ax = fig.axes[0]
    ylabels = [t.get_text() for t in ax.get_yticklabels()]
    assert ylabels == ["0 zero-shot", "1", "2", "3", "4"]
    xlabels = [t.get_text() for t in ax.get_xticklabels()]
    assert xlabels[:3] == NAMES[:3] and xlabels[3].endswith("..") and len(xlabels[3]) <= 16
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 3 * 4  # one value per finished cell, none in unfinished rows
    assert f"{R[2, 1]:.1f}" in texts
    assert "after task 2 of 4" in ax.get_title()
    assert len(fig.axes) == 2  # heatmap + colorbar
    # a figure can be rendered by an external Agg canvas (what TensorBoard's add_figure does)
    fig.canvas.draw()
    assert np.asarray(fig.canvas.buffer_rgba()).shape[2] == 4


def test_heatmap_t15_readable(tmp_path):
    names = [f"domain_{i:02d}_with_long_name" for i in range(15)]
    p = heatmap_png(_matrix(15, seed=1), names, tmp_path / "h15.png")
    w, h = _check_png(p, heatmap_figsize(15))
    assert w >= 1000 and h >= 700  # cells stay large enough to print their values


def test_heatmap_errors(tmp_path):
    with pytest.raises(ValueError, match="task names"):
        heatmap_png(_matrix(3), NAMES, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        heatmap_png(_matrix(4) * 2, NAMES, tmp_path / "x.png")
    with pytest.raises(ValueError, match="rows"):
        heatmap_png(np.zeros((6, 4)), NAMES, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("k", [0, 1, 4])
def test_curve_png(tmp_path, k):
    p = curve_png(_matrix(4)[: k + 1], NAMES, tmp_path / "curve.png")
    w, h = _check_png(p)
    assert w >= 400 and h >= 300


def test_curve_values():
    R = np.array([[10, 20, 30], [90, 20, 30], [60, 80, 40], [50, 70, 90]], dtype=float)
    fig = plots.curve_figure(R, ["a", "b", "c"])
    seen, allt = fig.axes[0].lines[:2]
    # seen from t=1: 90; (60+80)/2 = 70; (50+70+90)/3 = 70
    np.testing.assert_allclose(seen.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(seen.get_ydata(), [90, 70, 70])
    # all tasks from t=0: 20; 140/3; 60; 70
    np.testing.assert_allclose(allt.get_xdata(), [0, 1, 2, 3])
    np.testing.assert_allclose(allt.get_ydata(), [20, 140 / 3, 60, 70])


def test_routing_png(tmp_path):
    rng = np.random.default_rng(0)
    M = rng.dirichlet(np.ones(4), size=4)
    p = routing_png(M, NAMES, tmp_path / "routing.png")
    _check_png(p, heatmap_figsize(4))
    # only the first two tasks trained so far: 4 test domains x 2 tasks, a NaN cell
    Mp = M[:, :2].copy()
    Mp[0, 1] = np.nan
    fig = routing_figure(Mp, NAMES)
    assert len(fig.axes[0].texts) == 4 * 2 - 1
    _check_png(routing_png(Mp, NAMES, tmp_path / "routing_partial.png"))


def test_routing_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        routing_png(np.full((4, 4), 50.0), NAMES, tmp_path / "r.png")
    with pytest.raises(ValueError, match="T x T"):
        routing_png(np.full((5, 4), 0.2), NAMES, tmp_path / "r.png")
    with pytest.raises(ValueError, match="T x T"):
        routing_png(np.full(4, 0.2), NAMES, tmp_path / "r.png")
    assert list(tmp_path.iterdir()) == []


def test_png_overwrite_is_atomic(tmp_path, monkeypatch):
    p = heatmap_png(_matrix(2), ["a", "b"], tmp_path / "h.png")
    before = p.read_bytes()

    def boom(self, *a, **k):
        raise RuntimeError("render failed (simulated)")

    monkeypatch.setattr(plots.Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        heatmap_png(_matrix(2, seed=5), ["a", "b"], p)
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["h.png"]


def test_no_pyplot_state():
    import sys

    heatmap_figure(_matrix(2), ["a", "b"])
    if "matplotlib.pyplot" in sys.modules:  # imported by someone else: we add no figures
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
    json.dumps(plots.__all__)


def _panel(names, with_ci=True):
    ci = 2.5 if with_ci else None
    return {"title": "xtail-mini", "task_names": names, "series": [
        {"label": "moram", "curve": [(60.0, ci), (55.0, ci), (50.0, ci)][: len(names)],
         "plasticity": (62.0, ci), "forgetting": (8.0, ci), "reference": False},
        {"label": "seq-lora", "curve": [(70.0, None), (50.0, None), (40.0, None)][: len(names)],
         "plasticity": (75.0, None), "forgetting": (21.0, None), "reference": False},
        {"label": "zeroshot", "curve": [(10.0, 0.0), (12.0, 0.0), (12.0, 0.0)][: len(names)],
         "plasticity": (12.0, 0.0), "forgetting": (0.0, 0.0), "reference": True},
    ]}


def test_comparison_figure_lines_bands_and_error_bars(tmp_path):
    fig = plots.comparison_figure([_panel(NAMES[:3])], title="xtail-mini")
    ax_curve, ax_trade = fig.axes
    # one line per method, its mean over seeds after each task t = 1..3
    lines = {ln.get_label(): ln for ln in ax_curve.get_lines()}
    assert set(lines) == {"moram", "seq-lora", "zeroshot"}
    np.testing.assert_allclose(lines["moram"].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(lines["moram"].get_ydata(), [60, 55, 50])
    # a confidence band only where the CI is known (moram's +-2.5; zeroshot's zero width)
    bands = ax_curve.collections
    assert len(bands) == 2
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(47.5) and ys.max() == pytest.approx(62.5)
    # the trade-off: one point per method at (plasticity, forgetting)
    points = {}
    for container in ax_trade.containers:
        line = container.lines[0]
        points[container.get_label()] = (float(line.get_xdata()[0]), float(line.get_ydata()[0]))
    assert points == {"moram": (62.0, 8.0), "seq-lora": (75.0, 21.0), "zeroshot": (12.0, 0.0)}
    assert ax_trade.get_xlabel().startswith("plasticity") and ax_trade.get_ylabel().startswith("forgetting")
    # a method keeps its colour in every panel, even when the panels hold other methods
    second = _panel(NAMES[:2], with_ci=False)
    second["series"] = second["series"][1:]  # no moram here
    fig2 = plots.comparison_figure([_panel(NAMES[:3]), second])
    colour = {ax_i: {ln.get_label(): ln.get_color() for ln in fig2.axes[ax_i].get_lines()} for ax_i in (0, 2)}
    assert colour[0]["seq-lora"] == colour[2]["seq-lora"] != colour[0]["moram"]
    path = plots.comparison_png([_panel(NAMES[:3]), _panel(NAMES[:2], with_ci=False)], tmp_path / "s.png")
    w, h = _check_png(path)
    assert h > w / 2  # two lines of plots, one per table (e.g. two task orders)


def test_comparison_figure_errors():
    with pytest.raises(ValueError, match="no panels"):
        plots.comparison_figure([])
    bad = _panel(NAMES[:3])
    bad["series"][0]["curve"] = bad["series"][0]["curve"][:2]
    with pytest.raises(ValueError, match="2 curve points for 3 tasks"):
        plots.comparison_figure([bad])
