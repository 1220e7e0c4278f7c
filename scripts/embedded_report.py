#!/usr/bin/env python
"""Per-task learning and routing over seeds, from finished run directories (Markdown).

For each method below a stream folder of a results root (``<folder>/<method>/seed*/``):

* the matrix diagonal: accuracy on task i right after training task i, per task, as
  mean ± 95 % Student-t half-width over the seeds (and its mean over tasks, plasticity);
* the accuracy on each task at the end of the stream (the last row), the same way;
* for methods that write ``routing.csv`` (MoRAM, the MoE methods): the share of each test
  domain's routing weight that goes to its own task's atoms or experts (the routing
  report's diagonal), and to the last task's, mean over seeds.

docs/EMBEDDED.md quotes its output for the default and the held-out domain orders:

    python scripts/embedded_report.py results/runs/xtail-mini \
        results/runs/heldout-order/runs/xtail-mini --methods moram,seq-lora,moe-lora
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from moram_bench.leaderboard.stats import ci95
from moram_bench.routing import read_routing_csv


def _cell(values: list[float]) -> str:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return "–"
    mean = float(np.mean(v))
    half = ci95(float(np.std(v, ddof=1)), len(v)) if len(v) > 1 else None
    return f"{mean:.1f} ± {half:.1f}" if half is not None else f"{mean:.1f}"


def read_runs(folder: Path, method: str) -> list[dict]:
    """Finished runs of ``method`` below ``folder``: their matrix, task names, routing."""
    runs = []
    for d in sorted((folder / method).glob("seed*")):
        m = d / "metrics.json"
        if not m.is_file():
            continue
        met = json.loads(m.read_text())
        if not met.get("finished"):
            continue
        routing = None
        if (d / "routing.csv").is_file():
            routing, names = read_routing_csv(d / "routing.csv")
            if names != met["task_names"]:
                raise SystemExit(f"error: {d}/routing.csv has tasks {names}, metrics.json {met['task_names']}")
        runs.append({"seed": met.get("seed"), "R": np.asarray(met["matrix"], dtype=float),
                     "tasks": met["task_names"], "routing": routing})
    return runs


def report(folder: Path, methods: list[str]) -> list[str]:
    lines = []
    per_method = {m: read_runs(folder, m) for m in methods}
    per_method = {m: r for m, r in per_method.items() if r}
    if not per_method:
        return [f"(no finished runs of {', '.join(methods)} below {folder})", ""]
    tasks = next(iter(per_method.values()))[0]["tasks"]
    for m, runs in per_method.items():
        if any(r["tasks"] != tasks for r in runs):
            raise SystemExit(f"error: runs of {m} below {folder} use another task order than {tasks}")
    lines.append(f"### {folder} (tasks in order: {', '.join(tasks)})")
    lines.append("")
    head = "| method | seeds | " + " | ".join(tasks) + " | mean |"
    rule = "|---|---|" + "---:|" * (len(tasks) + 1)
    lines += ["Accuracy on each task right after training it (the matrix diagonal), mean ± 95 % CI over seeds:",
              "", head, rule]
    for m, runs in per_method.items():
        diag = [[r["R"][i + 1, i] for r in runs] for i in range(len(tasks))]
        plast = [float(np.mean([r["R"][i + 1, i] for i in range(len(tasks))])) for r in runs]
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(_cell(v) for v in diag) + f" | {_cell(plast)} |")
    lines += ["", "Accuracy on each task at the end of the stream (last row):", "", head, rule]
    for m, runs in per_method.items():
        last = [[r["R"][-1, i] for r in runs] for i in range(len(tasks))]
        mean_last = [float(np.mean(r["R"][-1, :])) for r in runs]
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(_cell(v) for v in last) + f" | {_cell(mean_last)} |")
    routed = {m: [r for r in runs if r["routing"] is not None] for m, runs in per_method.items()}
    routed = {m: r for m, r in routed.items() if r}
    if routed:
        lines += ["", "Routing report (image-side inputs of the test set): share of each test domain's routing weight "
                  "on its own task's atoms or experts, and on the last task's; mean ± 95 % CI over seeds:", "",
                  "| method | seeds | share | " + " | ".join(tasks) + " |", "|---|---|---|" + "---:|" * len(tasks)]
        for m, runs in routed.items():
            own = [[100 * r["routing"][i, i] for r in runs] for i in range(len(tasks))]
            newest = [[100 * r["routing"][i, -1] for r in runs] for i in range(len(tasks))]
            lines.append(f"| {m} | {len(runs)} | own task (%) | " + " | ".join(_cell(v) for v in own) + " |")
            lines.append(f"| {m} | {len(runs)} | last task (%) | " + " | ".join(_cell(v) for v in newest) + " |")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="stream folders of results roots, e.g. results/runs/xtail-mini")
    p.add_argument("--methods", default="moram,seq-lora,moe-lora", help="comma list (default: %(default)s)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for folder in args.folders:
        if not folder.is_dir():
            print(f"error: {folder} is not a folder of run directories", file=sys.stderr)
            return 2
        print("\n".join(report(folder, methods)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
