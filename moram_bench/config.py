"""Configuration: YAML defaults in conf/, a user's YAML, and omegaconf dotlist overrides.

Resolution order (later wins):

1. ``conf/config.yaml`` (top-level defaults),
2. ``conf/stream/<stream>.yaml``, ``conf/backbone/<backbone>.yaml`` and
   ``conf/method/<method>.yaml`` (or ``<method>.yaml`` beside a plugin's file); a method
   YAML may hold an ``image:`` and a ``text:`` block, merged over its top level for
   streams of that modality,
3. the user's ``--config FILE``,
4. command-line ``key=value`` overrides.

Names are picked first (``method=NAME`` on the command line, else the user's file, else
the defaults) so that group defaults load before values are overridden. Overrides may only
set keys that exist (typos are errors) and must keep the type of the default.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import registry
from .errors import ConfigError  # noqa: F401  (re-exported: `from moram_bench.config import ConfigError`)
# the run directory's rules, re-exported under their old names
from .rundir import RESULT_NEUTRAL_KEYS as VOLATILE_KEYS, comparable, config_hash  # noqa: F401
from .rundir import output_dir as default_output_dir  # noqa: F401

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("method", "stream", "backbone")
MODALITY_BLOCKS = ("image", "text")


def _load_yaml(path: Path, what: str) -> DictConfig:
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a YAML file")
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        msg = str(e).replace("\n", " ")
        raise ConfigError(f"malformed YAML in {what} {path}: {msg}") from None
    if cfg is None:
        cfg = OmegaConf.create({})
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return cfg


def show(value: Any, limit: int = 60) -> str:
    """``repr`` of a user's value for a one-line message, cut to ``limit`` characters."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    text = repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text


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
    if "alias_of" in cfg:  # e.g. stream olora-order3: olora's settings with order: 3
        target = str(cfg.pop("alias_of"))
        cfg = OmegaConf.merge(_group_defaults(group, target, modality), cfg)
        cfg.pop("name")
    if group == "method":
        blocks = {b: cfg.pop(b) for b in MODALITY_BLOCKS if b in cfg}
        if modality in blocks and blocks[modality] is not None:
            cfg = OmegaConf.merge(cfg, blocks[modality])
    cfg = OmegaConf.merge(OmegaConf.create({"name": name}), cfg)
    return cfg


# keys whose default is null (or an int although fractions make sense): the type a value
# must have, by the key's last component. Other keys keep the type of their default, and an
# integer default takes integers only (`method.r=2.5` and `seed=1e3` are errors).
TYPED_KEYS: dict[str, type | tuple[type, ...]] = {
    "seed": int, "num_threads": int, "data_seed": int, "shot_seed": int, "shots": int,
    "max_test_per_domain": int, "max_train": int, "max_test": int, "warmup_steps": int,
    "output_dir": str, "data_dir": str, "cache_dir": str, "data_root": str,
    "targets": list, "adapter_targets": list,
    "alpha": (int, float), "epochs": (int, float), "grad_clip": (int, float), "lr": (int, float),
}
ANY_TYPE_KEYS = ("trainer.precision", "trainer.devices")  # Lightning takes strings or ints here
# path settings: `~` and environment variables are expanded once, when the config is resolved
PATH_KEYS = ("output_dir", "data_dir", "cache_dir", "data_root")


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "true or false",
             dict: "a mapping"}
    return names.get(t, "a number") if not isinstance(t, tuple) else "a number"


def _expected_type(key: str, old: Any) -> type | tuple[type, ...] | None:
    """The type a value of ``key`` must have (None: anything)."""
    if key in ANY_TYPE_KEYS:
        return None
    last = key.rsplit(".", 1)[-1]
    if last in TYPED_KEYS:
        return TYPED_KEYS[last]
    if old is None:
        return None
    if isinstance(old, bool):
        return bool
    if isinstance(old, int):
        return int
    if isinstance(old, float):
        return (int, float)
    for t in (str, list, dict):
        if isinstance(old, t) or (t is list and isinstance(old, ListConfig)) or (t is dict and isinstance(old, DictConfig)):
            return t
    return None


def check_type(key: str, old: Any, new: Any, where: str = "") -> None:
    """Raise ConfigError when ``new`` (the user's value of ``key``) has the wrong type."""
    want = _expected_type(key, old)
    if want is None or new is None:
        if new is None and isinstance(old, (dict, DictConfig)):
            raise ConfigError(f"{key}{where} must be a mapping of settings like the default, not null")
        return
    kinds = want if isinstance(want, tuple) else (want,)
    value = OmegaConf.to_container(new) if isinstance(new, (DictConfig, ListConfig)) else new
    ok = any(isinstance(value, k) for k in kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        if want is dict:
            raise ConfigError(f"{key}{where} must be a mapping of settings (e.g. {key}.<name>: value), "
                              f"not {show(value)}")
        raise ConfigError(f"{key}={show(value)}{where} has the wrong type: expected {_type_name(want)}"
                          + (f" like the default {show(old)}" if old is not None else ""))


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
            if k in (group, f"{group}.name"):  # `method.name=X` switches the method like `method=X`
                name = _name_from(v)
        names[group] = name

    def check(group: str, name: str | None) -> None:
        if name not in _choices(group):
            raise ConfigError(f"unknown {group} {show(name)}; valid choices: {', '.join(_choices(group))}")

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
    _check_user_file(cfg, user, config_file, names)
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, user)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid key in {config_file}: {str(e).splitlines()[0]}") from None

    for key, value in parsed:
        if key in GROUPS or key in {f"{g}.name" for g in GROUPS}:
            continue
        try:
            old = OmegaConf.select(cfg, key, throw_on_missing=False, default="__missing__")
        except OmegaConfBaseException:
            old = "__missing__"
        if old == "__missing__":
            group = key.split(".")[0]
            where = f" for {group} {names[group]!r}" if group in GROUPS else ""
            raise ConfigError(f"unknown config key {show(key)}{where} (check the spelling; `python -m moram_bench list` shows names)")
        check_type(key, old, value, where=" (command line)")
        OmegaConf.update(cfg, key, value, merge=False, force_add=False)
    OmegaConf.set_struct(cfg, False)
    _expand_paths(cfg)
    validate_config(cfg)
    return cfg


def _check_user_file(defaults: DictConfig, user: DictConfig, config_file: str | None, names: dict) -> None:
    """Every key of the user's file exists in the defaults and keeps its type (one line per problem)."""
    where = f" (in {config_file})"

    def walk(node: DictConfig, ref: Any, prefix: str) -> None:
        for k in node.keys():
            key = f"{prefix}{k}"
            if not isinstance(ref, DictConfig) or k not in ref:
                group = key.split(".")[0]
                extra = f" for {group} {names[group]!r}" if group in GROUPS and "." in key else ""
                raise ConfigError(f"invalid key {show(key)}{where}: no such setting{extra} (check the spelling)")
            old, new = ref.get(k), node.get(k)
            check_type(key, old, new, where)
            if isinstance(old, DictConfig) and isinstance(new, DictConfig):
                walk(new, old, f"{key}.")

    walk(user, defaults, "")


def _expand_paths(cfg: DictConfig) -> None:
    """``~`` and ``$VARS`` in path settings (any depth) and plugin paths, expanded once here."""
    def expand(value: Any) -> Any:
        return os.path.expanduser(os.path.expandvars(value)) if isinstance(value, str) else value

    def walk(node: DictConfig) -> None:
        for k in list(node.keys()):
            v = node.get(k)
            if isinstance(v, DictConfig):
                walk(v)
            elif k in PATH_KEYS and isinstance(v, str):
                node[k] = expand(v)

    walk(cfg)
    if cfg.get("plugins"):
        cfg.plugins = [expand(p) for p in cfg.plugins]


# lightning's precision names (strings and ints such as 16)
def _precisions() -> set[str]:
    import typing

    from lightning.fabric.plugins.precision import precision as P

    out: set[str] = set()
    for name in ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS", "_PRECISION_INPUT_INT"):
        out.update(str(x) for x in typing.get_args(getattr(P, name, None)) or ())
    return out


OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


def validate_config(cfg: DictConfig) -> None:
    """Value checks of the whole resolved config, before anything is built or written."""
    check_ranges(cfg, {"seed": "in [0, 4294967295]"}, prefix="")
    if "iterations" in cfg.stream and cfg.stream.get("epochs") is None:
        it = cfg.stream.iterations
        if it is not None and int(it) < 1:
            raise ConfigError(f"stream.iterations must be >= 1 (got {it}); for a run that only evaluates the "
                              "backbone use method=zeroshot")
    check_ranges(cfg.stream, {"batch_size": ">= 1", "epochs": "> 0"}, prefix="stream.")
    t = cfg.trainer
    precisions = _precisions()
    if precisions and str(t.precision) not in precisions:
        raise ConfigError(f"trainer.precision={show(t.precision)} is not a precision Lightning knows; "
                          f"valid: {', '.join(sorted(precisions))}")
    check_ranges(t, {"num_threads": ">= 1", "num_nodes": ">= 1", "log_every_n_steps": ">= 1"}, prefix="trainer.")
    check_ranges(cfg.data, {"eval_batch_size": ">= 1", "num_workers": ">= 0"}, prefix="data.")
    for key in ("method.targets", "backbone.adapter_targets"):
        pats = OmegaConf.select(cfg, key, default=None)
        if pats is None:
            continue
        if isinstance(pats, str) or not len(pats):
            raise ConfigError(f"{key} must be a non-empty list of regular expressions (got {show(pats)})")
        for pat in pats:
            try:
                re.compile(str(pat))
            except re.error as e:
                raise ConfigError(f"{key}: {show(str(pat))} is not a valid regular expression ({e})") from None
    o = cfg.method.get("optim")
    if isinstance(o, DictConfig):
        name = str(o.get("name", "adamw")).lower()
        if name not in OPTIMIZERS:
            raise ConfigError(f"unknown method.optim.name {show(o.get('name'))}; valid choices: {', '.join(OPTIMIZERS)}")
        schedule = str(o.get("schedule", "cosine")).lower()
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown method.optim.schedule {show(o.get('schedule'))}; valid choices: {', '.join(SCHEDULES)}")
        check_ranges(o, {"lr": "> 0", "weight_decay": ">= 0", "warmup_steps": ">= 0", "grad_clip": "> 0",
                         "momentum": ">= 0", "eps": "> 0"}, prefix="method.optim.")
        betas = o.get("betas")
        if betas is not None:
            if len(betas) != 2:
                raise ConfigError(f"method.optim.betas must be two numbers in [0, 1) (got {show(betas)})")
            for b in betas:
                check_ranges({"betas": b}, {"betas": "in [0, 1)"}, prefix="method.optim.")
    registry.METHODS[cfg.method.name].validate_config(cfg.method)


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
