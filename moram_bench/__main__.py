"""Command line: ``python -m moram_bench <command> ...``.

    fit [--config FILE] [key=value ...]   train a method through a stream (see README)
    list                                   methods, streams and backbones with one-line summaries
    check-data stream=NAME data_dir=PATH   is a real stream's data where and as expected?
    sweep method=a,b seed=0,1,2 ...        a grid of fits, skipping finished runs
    leaderboard [RESULTS_DIR]              LEADERBOARD.md/.csv/.tex from run directories
    bench [--quick] [--out FILE]           speed/memory benchmark of the memory layer
    doctor [data_dir=PATH]                 self-test of this machine (GPU numerics, DDP, data, time estimate)
    rehearse stream=xtail|mtil|trace       the real streams at full size on synthetic data (few steps)

Configuration problems print one line ``error: ...`` and exit with code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import os
import sys

USAGE_ERROR = 2


def _fail(msg: str, code: int = USAGE_ERROR) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def cmd_fit(args: argparse.Namespace) -> int:
    from .config import resolve_config
    from .errors import ConfigError, RunInterrupted

    try:
        cfg = resolve_config(args.overrides, args.config)
        from .runner import NonFiniteLossError, run

        try:
            run(cfg)
        except NonFiniteLossError as e:
            return _fail(str(e), 1)
    except (ConfigError, FileNotFoundError) as e:  # StreamError is a ConfigError
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except RunInterrupted as e:  # SIGINT / SIGTERM: what is saved and how to resume
        return _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted; finished tasks are saved, run the same command again to resume", 130)
    except Exception as e:  # lightning's configuration errors are user errors too
        if type(e).__name__ == "MisconfigurationException":
            return _fail(str(e).splitlines()[0])
        raise
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from . import registry

    registry.discover(args.plugins or [])
    from .config import CONF_DIR, _group_defaults

    print("methods:")
    for name in sorted(registry.METHODS):
        cls = registry.METHODS[name]
        mods = "/".join(getattr(cls, "modalities", ()))
        print(f"  {name:<14} [{mods}] {registry.describe(cls)}")
    print("streams:")
    for name in sorted(registry.STREAMS):
        extra = ""
        if (CONF_DIR / "stream" / f"{name}.yaml").exists():
            c = _group_defaults("stream", name, None)
            extra = f"[{c.get('modality', 'image')}, backbone {c.get('backbone')}] "
        print(f"  {name:<14} {extra}{registry.describe(registry.STREAMS[name])}")
    print("backbones:")
    for name in sorted(registry.BACKBONES):
        print(f"  {name:<14} {registry.describe(registry.BACKBONES[name])}")
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    """Subcommands with their own argument parsing (each module has ``main(argv)``)."""
    import importlib

    module = {"bench": "bench", "check-data": "check_data", "leaderboard": "leaderboard", "sweep": "sweep",
              "doctor": "doctor", "rehearse": "rehearse"}[command]
    return importlib.import_module(f"moram_bench.{module}").main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m moram_bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_fit = sub.add_parser("fit", help="train a method through a stream and write its run directory")
    p_fit.add_argument("--config", help="a YAML file merged over the defaults")
    p_fit.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")
    p_list = sub.add_parser("list", help="list methods, streams and backbones")
    p_list.add_argument("--plugins", nargs="*", help="extra method files or folders")
    for name, text in (("bench", "speed/memory benchmark of the memory layer"),
                       ("check-data", "check a real stream's data folder: check-data stream=xtail data_dir=PATH"),
                       ("sweep", "run a grid: sweep method=a,b stream=s seed=0,1,2"),
                       ("leaderboard", "tables from run directories: leaderboard [RESULTS_DIR]"),
                       ("doctor", "self-test of this machine: doctor [data_dir=PATH]"),
                       ("rehearse", "real streams at full size on synthetic data: rehearse stream=xtail")):
        sub.add_parser(name, help=text, add_help=False)

    if argv and argv[0] in ("bench", "check-data", "sweep", "leaderboard", "doctor", "rehearse"):
        return _delegate(argv[0], argv[1:])
    args = parser.parse_args(argv)
    if args.command == "fit":
        return cmd_fit(args)
    if args.command == "list":
        return cmd_list(args)
    parser.print_help()
    return USAGE_ERROR


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
