"""Name -> implementation registries for methods, streams and backbones.

Methods, streams and backbones register themselves with a decorator when their module is
imported. ``discover()`` imports every module of the built-in packages (``moram_bench``'s
method/stream/backbone modules and the top-level ``baselines`` package) plus any user
plugin files or folders named in ``MORAM_BENCH_PLUGINS`` (os.pathsep-separated) or in the
config's ``plugins`` list, so adding a method never means editing a central list.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

METHODS: dict[str, type] = {}
STREAMS: dict[str, Callable] = {}
BACKBONES: dict[str, Callable] = {}
# where each method came from (a plugin file may carry its defaults in NAME.yaml beside it)
METHOD_SOURCES: dict[str, Path] = {}

_BUILTIN_PACKAGES = ("moram_bench.methods", "moram_bench.streams", "moram_bench.backbones", "baselines")
_discovered: set[str] = set()


def register_method(name: str):
    """Class decorator: ``@register_method("my-method")`` on a ContinualModule subclass."""

    def deco(cls):
        cls.method_name = name
        METHODS[name] = cls
        mod = sys.modules.get(cls.__module__)
        if mod is not None and getattr(mod, "__file__", None):
            METHOD_SOURCES[name] = Path(mod.__file__)
        return cls

    return deco


def register_stream(name: str):
    def deco(fn):
        STREAMS[name] = fn
        return fn

    return deco


def register_backbone(name: str):
    def deco(fn):
        BACKBONES[name] = fn
        return fn

    return deco


def _import_package(pkg_name: str) -> None:
    try:
        pkg = importlib.import_module(pkg_name)
    except ModuleNotFoundError as e:  # the top-level baselines/ package is optional
        if e.name == pkg_name:
            return
        raise
    for info in pkgutil.iter_modules(pkg.__path__, pkg_name + "."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(info.name)


def load_plugin(path: str | os.PathLike) -> None:
    """Import a user's method file (or every ``*.py`` in a folder) so it registers itself."""
    p = Path(path).expanduser().resolve()
    if str(p) in _discovered:
        return
    if p.is_dir():
        files = sorted(f for f in p.glob("*.py") if not f.name.startswith("_"))
    elif p.is_file():
        files = [p]
    else:
        raise ConfigError(f"plugin path {str(path)!r} does not exist")
    _discovered.add(str(p))
    for f in files:
        mod_name = f"moram_bench_plugin_{abs(hash(str(f)))}_{f.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, f)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)


def discover(plugins: list[str] | tuple[str, ...] = ()) -> None:
    if "builtin" not in _discovered:
        # the repository root holds the top-level baselines/ package (editable installs
        # and running from a checkout both see it)
        root = Path(__file__).resolve().parents[1]
        if (root / "baselines").is_dir() and str(root) not in sys.path:
            sys.path.append(str(root))
        for pkg in _BUILTIN_PACKAGES:
            _import_package(pkg)
        _discovered.add("builtin")
    env = os.environ.get("MORAM_BENCH_PLUGINS", "")
    for p in [x for x in env.split(os.pathsep) if x] + list(plugins or ()):
        load_plugin(p)


def describe(obj: Any) -> str:
    """First line of a docstring: the one-line summary ``list`` prints."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""
