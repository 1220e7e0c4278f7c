"""``python -m moram_bench check-data stream=NAME data_dir=PATH [--verify-images]``

Checks, before anything trains, that the local datasets a stream reads are where the
loaders expect them. Per domain it prints one line: ``found`` (with class and sample
counts), ``missing`` or ``malformed``, and the exact path it expected or could not parse.
Exit code 0 when every domain is found, 2 otherwise (and on configuration errors).

``--verify-images`` also checks that every image file the split files list exists (cheap
``os.path`` checks; MNIST's IDX files are read through) and reports how many are missing.

Streams that read local data register a checker with ``@register_data_check(name)``;
``fit`` calls ``require_data(cfg)``, which raises a one-line ``StreamError`` naming the
first problem. Streams without a checker (bundled or synthetic data) always pass.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from .streams.base import StreamError

USAGE_ERROR = 2
STATUSES = ("found", "missing", "malformed")


@dataclass
class DomainReport:
    """The state of one domain's data."""

    domain: str
    status: str  # "found", "missing" or "malformed"
    path: str  # found: the dataset folder; otherwise the exact path expected / at fault
    detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "found"

    def problem(self) -> str:
        """One line: ``domain: detail: path``."""
        if self.status == "missing":
            return f"{self.domain}: {self.detail}, expected {self.path}"
        return f"{self.domain}: malformed {self.path}: {self.detail}"

    def line(self, width: int = 14) -> str:
        if self.ok:
            counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
            extra = "; ".join([counts] + self.notes) if self.notes else counts
            return f"  {self.domain:<{width}} found      {self.path}  ({extra})"
        return f"  {self.domain:<{width}} {self.status:<10} {self.path}  ({self.detail})"


@dataclass
class DataReport:
    stream: str
    data_dir: str | None
    domains: list[DomainReport] = field(default_factory=list)
    error: str | None = None  # a problem before any domain could be checked
    checked: bool = True  # False: the stream reads no local data

    @property
    def ok(self) -> bool:
        return self.error is None and all(d.ok for d in self.domains)

    def problems(self) -> list[DomainReport]:
        return [d for d in self.domains if not d.ok]

    def first_problem(self) -> str | None:
        if self.error:
            return self.error
        bad = self.problems()
        return bad[0].problem() if bad else None

    def format(self) -> str:
        if not self.checked:
            return f"stream {self.stream} reads no local datasets; nothing to check"
        head = f"check-data: stream {self.stream}, data_dir {self.data_dir}"
        if self.error:
            return f"{head}\n  {self.error}"
        width = max([14] + [len(d.domain) for d in self.domains])
        lines = [f"{head} ({len(self.domains)} domains)"] + [d.line(width) for d in self.domains]
        n = {s: sum(d.status == s for d in self.domains) for s in STATUSES}
        lines.append(f"{n['found']} found, {n['missing']} missing, {n['malformed']} malformed")
        if not self.ok:
            lines.append("expected layouts: docs/REAL_BENCHMARKS.md")
        return "\n".join(lines)


DataCheck = Callable[..., list[DomainReport]]
DATA_CHECKS: dict[str, DataCheck] = {}


def register_data_check(name: str):
    """``@register_data_check("xtail")`` on ``fn(cfg, verify_images=False) -> [DomainReport]``.
    The function raises ``StreamError`` for problems that concern no single domain."""

    def deco(fn):
        DATA_CHECKS[name] = fn
        return fn

    return deco


# ---- image domains (the CoOp / torchvision loaders) ------------------------------------------
def check_domain(domain: str, data_dir, verify_images: bool = False) -> DomainReport:
    """Load one image domain's splits and report what was found."""
    from .streams.coop import DataMalformed, DataMissing, DataProblem, IdxImageSet, load_domain

    try:
        data = load_domain(domain, data_dir)
    except DataMissing as e:
        return DomainReport(domain, "missing", e.path, f"{e.detail} not found")
    except DataMalformed as e:
        return DomainReport(domain, "malformed", e.path, e.detail)
    report = DomainReport(domain, "found", str(data.root), counts=data.counts(), notes=list(data.notes))
    if verify_images:
        files = data.image_files()
        if files:
            missing = [p for p in files if not os.path.isfile(p)]
            if missing:
                return DomainReport(domain, "missing", missing[0],
                                    f"{len(missing)} of {len(files)} listed images not found; first shown",
                                    counts=data.counts())
            report.notes.append(f"all {len(files)} listed images exist")
        for part in (data.train, data.val, data.test):
            if isinstance(part, IdxImageSet):
                try:
                    part.array()
                except DataProblem as e:
                    return DomainReport(domain, e.kind, e.path, e.detail, counts=data.counts())
    return report


# ---- entry points ----------------------------------------------------------------------------
def check_stream(cfg, verify_images: bool = False) -> DataReport:
    """Check the local data of the stream ``cfg.stream.name`` (full resolved run config)."""
    from . import registry

    registry.discover()
    name = str(cfg.stream.name)
    data_dir = cfg.get("data_dir")
    report = DataReport(name, None if data_dir is None else str(data_dir))
    fn = DATA_CHECKS.get(name)
    if fn is None:
        report.checked = False
        return report
    if data_dir is None or str(data_dir) == "":
        report.error = (f"stream {name} reads local datasets: set data_dir=PATH "
                        "(the folder holding them; layouts in docs/REAL_BENCHMARKS.md)")
        return report
    if not os.path.isdir(os.path.expanduser(str(data_dir))):
        report.error = f"data_dir not found: {data_dir}"
        return report
    report.domains = list(fn(cfg, verify_images=verify_images))
    return report


def require_data(cfg) -> None:
    """Raise ``StreamError`` (one line) naming the first data problem of the run's stream."""
    report = check_stream(cfg)
    first = report.first_problem()
    if first is None:
        return
    n = len(report.problems())
    more = f" (and {n - 1} more domain(s) not ready)" if n > 1 else ""
    hint = f"; `python -m moram_bench check-data stream={report.stream} data_dir=...` lists every problem"
    raise StreamError(f"data for stream {report.stream}: {first}{more}{hint}")


def main(argv: list[str] | None = None) -> int:
    """``check-data`` subcommand: ``argv`` is what follows ``check-data`` on the command line."""
    from .config import ConfigError, resolve_config

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m moram_bench check-data",
        description="check that a stream's local datasets are present and parseable (exit 2 if not)")
    parser.add_argument("--config", help="a YAML file merged over the defaults")
    parser.add_argument("--verify-images", action="store_true",
                        help="also check that every image the split files list exists")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stream=xtail data_dir=/data")
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(args.overrides, args.config)
        report = check_stream(cfg, verify_images=args.verify_images)
    except (ConfigError, StreamError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    print(report.format(), flush=True)
    return 0 if report.ok else USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
