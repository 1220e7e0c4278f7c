"""Configuration: YAML defaults in conf/, a user's YAML, and omegaconf dotlist overrides.

Resolution order (later wins):

1. ``conf/config.yaml`` (top-level defaults),
2. ``conf/stream/<stream>.yaml``, ``conf/backbone/<backbone>.yaml`` and
   ``conf/method/<method>.yaml`` (or ``<method>.yaml`` beside a plugin's file, or the
   method class's ``default_config``); a method YAML may hold an ``image:`` and a
   ``text:`` block, merged over its top level for streams of that modality,
3. the user's ``--config FILE``,
4. command-line ``key=value`` overrides.

Names are picked first (``method=NAME`` on the command line, else the user's file, else
the defaults) so that group defaults load before values are overridden. Overrides may only
set keys that exist (typos are errors) and must keep the type of the default.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import registry

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("method", "stream", "backbone")
MODALITY_BLOCKS = ("image", "text")
# keys that may differ between a run and its resumption without changing results
VOLATILE_KEYS = ("overwrite", "output_dir", "trainer.enable_progress_bar", "trainer.devices",
                 "trainer.num_nodes", "trainer.strategy", "trainer.num_threads",
                 "trainer.log_every_n_steps", "data.num_workers", "data.eval_batch_size",
                 "cache_dir", "plugins")


class ConfigError(ValueError):
    """A user-facing configuration problem: printed as one line, exit code 2."""


def _load_yaml(path: Path, what: str) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        msg = str(e).replace("\n", " ")
        raise ConfigError(f"malformed YAML in {what} {path}: {msg}") from None
    if cfg is None:
        cfg = OmegaConf.create({})
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return cfg


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings with omegaconf's own value grammar."""
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"malformed override {item!r}: expected key=value (e.g. method=moram seed=1)")
        key, _, _ = item.partition("=")
        try:
            parsed = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"malformed override {item!r}: {str(e).splitlines()[0]}") from None
        value = OmegaConf.select(parsed, key.strip())
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        out.append((key.strip(), value))
    return out


def _choices(group: str) -> list[str]:
    reg = {"method": registry.METHODS, "stream": registry.STREAMS, "backbone": registry.BACKBONES}[group]
    return sorted(reg)


def _group_defaults(group: str, name: str, modality: str | None) -> DictConfig:
    path = CONF_DIR / group / f"{name}.yaml"
    if group == "method" and not path.exists() and name in registry.METHOD_SOURCES:
        path = registry.METHOD_SOURCES[name].with_name(f"{name}.yaml")
    if path.exists():
        cfg = _load_yaml(path, f"{group} defaults")
    else:
        cfg = OmegaConf.create({})
    if group == "method":
        cls = registry.METHODS[name]
        base = OmegaConf.create(getattr(cls, "default_config", {}) or {})
        cfg = OmegaConf.merge(base, cfg)
        blocks = {b: cfg.pop(b) for b in MODALITY_BLOCKS if b in cfg}
        if modality in blocks and blocks[modality] is not None:
            cfg = OmegaConf.merge(cfg, blocks[modality])
    cfg = OmegaConf.merge(OmegaConf.create({"name": name}), cfg)
    return cfg


def _type_ok(old: Any, new: Any) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)):
        return isinstance(new, (int, float))
    if isinstance(old, str):
        return isinstance(new, str)
    if isinstance(old, (list, ListConfig)):
        return isinstance(new, (list, ListConfig))
    if isinstance(old, (dict, DictConfig)):
        return isinstance(new, (dict, DictConfig))
    return True


def _name_from(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, DictConfig)):
        return value.get("name")
    return str(value)


def resolve_config(overrides: list[str] | None = None, config_file: str | None = None) -> DictConfig:
    """Build the full run config. Raises ConfigError with a one-line message on any problem."""
    overrides = list(overrides or [])
    parsed = parse_overrides(overrides)
    base = _load_yaml(CONF_DIR / "config.yaml", "defaults")
    user = _load_yaml(Path(config_file), "config") if config_file else OmegaConf.create({})

    plugins = list(base.get("plugins") or []) + list(user.get("plugins") or [])
    plugins += [p for k, v in parsed if k == "plugins" for p in (v if isinstance(v, list) else [v])]
    registry.discover(plugins)

    names: dict[str, str | None] = {}
    for group in GROUPS:
        name = _name_from(base.get(group))
        if group in user:
            name = _name_from(user.get(group)) or name
        for k, v in parsed:
            if k == group:
                name = _name_from(v)
        names[group] = name

    def check(group: str, name: str | None) -> None:
        if name not in _choices(group):
            raise ConfigError(f"unknown {group} {name!r}; valid choices: {', '.join(_choices(group))}")

    check("stream", names["stream"])
    stream_cfg = _group_defaults("stream", names["stream"], None)
    if names["backbone"] is None:
        names["backbone"] = stream_cfg.get("backbone")
    check("backbone", names["backbone"])
    check("method", names["method"])
    modality = stream_cfg.get("modality", "image")

    cfg = base.copy()
    for group in GROUPS:
        cfg[group] = _group_defaults(group, names[group], modality)
    cfg.stream.backbone = names["backbone"]

    # the user's file: groups given as mappings merge into the group; names already applied
    user = user.copy()
    for group in GROUPS:
        if group in user and not isinstance(user[group], DictConfig):
            user.pop(group)
        elif group in user:
            user[group].pop("name", None)
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, user)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid key in {config_file}: {str(e).splitlines()[0]}") from None

    for key, value in parsed:
        if key in GROUPS:
            continue
        try:
            old = OmegaConf.select(cfg, key, throw_on_missing=False, default="__missing__")
        except OmegaConfBaseException:
            old = "__missing__"
        if old == "__missing__":
            group = key.split(".")[0]
            where = f" for {group} {names[group]!r}" if group in GROUPS else ""
            raise ConfigError(f"unknown config key {key!r}{where} (check the spelling; `python -m moram_bench list` shows names)")
        if not _type_ok(old, value):
            raise ConfigError(f"override {key}={value!r} has the wrong type: expected {type(old).__name__} like the default {old!r}")
        OmegaConf.update(cfg, key, value, merge=False, force_add=False)
    OmegaConf.set_struct(cfg, False)
    return cfg


def default_output_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("results") / "runs" / cfg.stream.name / cfg.method.name / f"seed{cfg.seed}"


def comparable(cfg: DictConfig) -> dict:
    """The config without keys that may change between a run and its resumption."""
    d = OmegaConf.to_container(cfg, resolve=True)
    for key in VOLATILE_KEYS:
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return d


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(comparable(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


_RULE = re.compile(r"^(?P<op>>=|>|<=|<)\s*(?P<x>[-+.\deE]+)$"
                   r"|^in\s*(?P<lb>[\[(])\s*(?P<lo>[-+.\deE]+)\s*,\s*(?P<hi>[-+.\deE]+)\s*(?P<rb>[\])])$")


def check_ranges(hp: Any, rules: dict[str, str], prefix: str = "method.") -> None:
    """Check numeric settings against simple rules and raise a one-line ``ConfigError``
    naming the first key that breaks its rule. A rule is ``">= 1"``, ``"> 0"``, ``"<= 1"``,
    ``"< 1"`` or an interval ``"in [0, 1)"``; a key that is absent or null is skipped."""
    for key, rule in rules.items():
        value = hp.get(key) if hasattr(hp, "get") else getattr(hp, key, None)
        if value is None:
            continue
        m = _RULE.match(rule.strip())
        if m is None:
            raise ValueError(f"bad range rule {rule!r} for {key}")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{prefix}{key} must be a number (got {value!r})") from None
        if m["op"]:
            bound = float(m["x"])
            ok = {">=": x >= bound, ">": x > bound, "<=": x <= bound, "<": x < bound}[m["op"]]
        else:
            lo, hi = float(m["lo"]), float(m["hi"])
            ok = (x >= lo if m["lb"] == "[" else x > lo) and (x <= hi if m["rb"] == "]" else x < hi)
        if not ok:
            raise ConfigError(f"{prefix}{key} must be {rule.strip()} (got {value})")
