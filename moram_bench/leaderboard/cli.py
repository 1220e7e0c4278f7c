"""Writing the leaderboard files and the command line
(``python -m moram_bench leaderboard [RESULTS_DIR]``)."""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ..results_io import atomic_write_text
from .aggregate import Leaderboard, Table, aggregate
from .reading import collect_runs, run_dirs
from .render import render_csv, render_latex, render_markdown

__all__ = ["OUTPUT_FILES", "README_START", "README_END", "update_readme", "figure_name", "stream_panels",
           "write_leaderboard", "main"]

OUTPUT_FILES = ("LEADERBOARD.md", "leaderboard.csv", "leaderboard.tex")
README_START = "<!-- leaderboard:start -->"
README_END = "<!-- leaderboard:end -->"


class LeaderboardError(Exception):
    """A problem reported as one ``error:`` line with exit status 2."""


def update_readme(path: Path, body: str) -> bool:
    """Replace the text between the leaderboard markers of ``path``; ``False`` if the file
    or its markers are absent. A marker counts only on a line of its own (a marker quoted
    in the prose, e.g. inside backticks, is text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    start = re.search(rf"^[ \t]*{re.escape(README_START)}[ \t]*$", text, re.M)
    end = start and re.search(rf"^[ \t]*{re.escape(README_END)}[ \t]*$", text[start.end():], re.M)
    if not start or not end:
        return False
    new = text[: start.end()] + "\n" + body.rstrip("\n") + "\n" + text[start.end() + end.start():]
    if new != text:
        atomic_write_text(path, new)
    return True


def figure_name(stream: str) -> str:
    """``<stream>.png`` with anything but letters, digits, ``.``, ``_`` and ``-`` replaced."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", stream) + ".png"


def stream_panels(tables: Sequence[Table]) -> list[dict]:
    """The data of :func:`moram_bench.plots.comparison_figure` for the tables of one stream."""
    panels = []
    for t in tables:
        series = [{"label": r.label, "reference": r.reference, "curve": r.curve,
                   "plasticity": (r.mean.get("plasticity"), r.ci.get("plasticity")),
                   "forgetting": (r.mean.get("forgetting"), r.ci.get("forgetting"))} for r in t.rows]
        title = t.title + (f" ({'; '.join(f'{k}={v}' for k, v in t.distinct.items() if k != 'stream.domains')})"
                           if any(k != "stream.domains" for k in t.distinct) else "")
        panels.append({"title": title, "task_names": t.task_names, "series": series})
    return panels


def _check_writable(folder: Path) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".leaderboard-check.", suffix=".tmp")
    except OSError as e:
        raise LeaderboardError(f"cannot write into {str(folder)!r} ({e.strerror or e}); "
                               "nothing written") from None
    os.close(fd)
    os.unlink(tmp)


def write_leaderboard(root: str | os.PathLike, references: bool = True,
                      readmes: Optional[Sequence[str | os.PathLike]] = None,
                      figures: bool = True, lb: Optional[Leaderboard] = None) -> tuple[Leaderboard, list[Path]]:
    """Collect, aggregate and write ``LEADERBOARD.md``, ``leaderboard.csv``,
    ``leaderboard.tex`` and one ``<stream>.png`` per stream into ``root``, and the tables
    into the marked block of each of ``readmes`` (default ``root/README.md``) that has
    the markers (its picture links relative to that file). Every output is rendered
    before the first file is replaced. ``lb``: an already aggregated leaderboard of
    ``root``. Returns the leaderboard and the paths written."""
    root = Path(root)
    if lb is None:
        lb = aggregate(collect_runs(root), references=references)
    source = os.fspath(root)
    pictures: dict[str, Path] = {}
    if figures:
        from ..plots import comparison_figure

        by_stream: dict[str, list[Table]] = {}
        for t in lb.tables:
            by_stream.setdefault(t.stream, []).append(t)
        pictures = {s: root / figure_name(s) for s in by_stream}
        figs = {s: comparison_figure(stream_panels(ts), title=s) for s, ts in by_stream.items()}
    links = {s: p.name for s, p in pictures.items()}
    texts = {root / "LEADERBOARD.md": render_markdown(lb, source=source, figures=links),
             root / "leaderboard.csv": render_csv(lb),
             root / "leaderboard.tex": render_latex(lb)}
    readme_paths = [Path(r) for r in (readmes if readmes is not None else [root / "README.md"])]
    blocks = {r: render_markdown(lb, heading_level=3, source=source,
                                 figures={s: Path(os.path.relpath(p, r.parent)).as_posix()
                                          for s, p in pictures.items()})
              for r in readme_paths}
    written = []
    if figures:
        from ..plots import save_figure_png

        for s, path in pictures.items():
            written.append(save_figure_png(figs[s], path))
    for path, text in texts.items():
        written.append(atomic_write_text(path, text))
    for readme, block in blocks.items():
        if update_readme(readme, block):
            written.append(readme)
    return lb, written


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m moram_bench leaderboard [RESULTS_DIR] [--no-references] [--no-figures]
    [--readme FILE ...]``.

    Exit codes: 0 written; 1 nothing to tabulate (no run directories, or none finished:
    nothing is written, so a committed leaderboard is never replaced by an empty one);
    2 usage errors (a missing folder, a file given as the folder, a folder that cannot be
    written)."""
    parser = argparse.ArgumentParser(prog="python -m moram_bench leaderboard",
                                     description="Write LEADERBOARD.md, leaderboard.csv, leaderboard.tex and "
                                                 "one <stream>.png per stream from every run directory below "
                                                 "RESULTS_DIR.")
    parser.add_argument("results", nargs="?", default="results", help="folder holding run directories (default: results)")
    parser.add_argument("--no-references", action="store_true", help="leave out the paper reference numbers")
    parser.add_argument("--no-figures", action="store_true", help="write no <stream>.png pictures")
    parser.add_argument("--readme", action="append", default=None, metavar="FILE",
                        help="a Markdown file whose leaderboard markers get the tables; repeatable "
                             "(default: RESULTS_DIR/README.md)")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0)
    root = Path(args.results)
    if not root.exists():
        print(f"error: results folder {str(root)!r} does not exist", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"error: {str(root)!r} is a file, not a folder of run directories", file=sys.stderr)
        return 2
    if not run_dirs(root):
        print(f"error: no run directories (run_state.json or metrics.json) below {str(root)!r}; nothing written",
              file=sys.stderr)
        return 1
    try:
        _check_writable(root)
        lb = aggregate(collect_runs(root), references=not args.no_references)
        if not lb.tables:
            print(f"error: no finished runs below {str(root)!r} ({len(lb.problems)} unfinished or unreadable); "
                  "nothing written, the existing leaderboard files are left as they are", file=sys.stderr)
            for p in lb.problems:
                print(f"  not finished: {p.name}: {p.status}, {p.progress}: {p.reason}", file=sys.stderr)
            return 1
        lb, written = write_leaderboard(root, references=not args.no_references, readmes=args.readme,
                                        figures=not args.no_figures, lb=lb)
    except LeaderboardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"error: cannot write the leaderboard{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    n_rows = sum(len(t.rows) for t in lb.tables)
    n_runs = sum(r.n for t in lb.tables for r in t.rows)
    print(f"leaderboard: {len(lb.tables)} table(s), {n_rows} row(s) from {n_runs} finished run(s)"
          + (f"; {len(lb.problems)} run(s) not in the tables (unfinished or unreadable, listed)" if lb.problems else ""))
    for p in lb.problems:
        print(f"  not in the tables: {p.name}: {p.status}, {p.progress}: {p.reason}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
