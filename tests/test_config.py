"""Config resolution: defaults, group files, user YAML, dotlist overrides and their errors."""
import re

import pytest

from moram_bench.config import ConfigError, check_ranges, config_hash, resolve_config


def test_defaults_resolve_to_moram_on_xtail_mini():
    cfg = resolve_config([])
    assert cfg.method.name == "moram" and cfg.stream.name == "xtail-mini"
    assert cfg.method.r == 16 and cfg.method.tau == 0.01 and cfg.method.optim.betas == [0.9, 0.9999]
    assert cfg.backbone.name == cfg.stream.backbone


def test_group_selection_and_nested_override():
    cfg = resolve_config(["method=seq-lora", "stream=synthetic-tiny", "method.r=4", "seed=3"])
    assert (cfg.method.name, cfg.method.r, cfg.seed, cfg.stream.name) == ("seq-lora", 4, 3, "synthetic-tiny")
    assert cfg.backbone.name == "tiny-clip"


@pytest.mark.parametrize("override, fragment", [
    ("method=nope", "unknown method 'nope'; valid choices:"),
    ("stream=nope", "unknown stream 'nope'; valid choices:"),
    ("backbone=nope", "unknown backbone 'nope'; valid choices:"),
    ("seed", "malformed override 'seed'"),
    ("method.toppk=3", "unknown config key 'method.toppk'"),
    ("seed=abc", "wrong type"),
    ("method.fold_scale=3", "wrong type"),
])
def test_bad_overrides_name_the_problem(override, fragment):
    with pytest.raises(ConfigError) as e:
        resolve_config([override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError) as e:
        resolve_config(["method=nope"])
    for name in ("moram", "seq-lora", "zeroshot"):
        assert name in str(e.value)


def test_user_yaml_merges_and_overrides_win(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("method:\n  name: seq-lora\n  r: 2\nseed: 7\n")
    cfg = resolve_config(["seed=8"], str(f))
    assert (cfg.method.name, cfg.method.r, cfg.seed) == ("seq-lora", 2, 8)
    f.write_text("method: zeroshot\n")
    assert resolve_config([], str(f)).method.name == "zeroshot"


def test_malformed_and_unknown_user_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        resolve_config([], str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("sed: 1\n")
    with pytest.raises(ConfigError, match="invalid key"):
        resolve_config([], str(unknown))
    with pytest.raises(ConfigError, match="not found"):
        resolve_config([], str(tmp_path / "missing.yaml"))


def test_config_hash_ignores_volatile_keys():
    a = resolve_config(["stream=synthetic-tiny"])
    b = resolve_config(["stream=synthetic-tiny", "trainer.devices=2", "trainer.enable_progress_bar=false"])
    c = resolve_config(["stream=synthetic-tiny", "seed=1"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


@pytest.mark.parametrize("rule, ok, bad", [
    (">= 1", [1, 2, 10.0], [0, -1, 0.5]),
    ("> 0", [1e-9, 3], [0, -2]),
    ("< 1", [0.99, -5], [1, 2]),
    ("<= 1", [1, 0], [1.01]),
    ("in [0, 1)", [0, 0.5, 0.999], [1, -0.1]),
    ("in (0, 1]", [1, 1e-6], [0, 1.5]),
])
def test_check_ranges_accepts_and_rejects_at_the_bounds(rule, ok, bad):
    for v in ok:
        check_ranges({"x": v}, {"x": rule})
    for v in bad:
        with pytest.raises(ConfigError, match=rf"^method\.x must be {re.escape(rule)} \(got {re.escape(str(v))}\)$"):
            check_ranges({"x": v}, {"x": rule})


def test_check_ranges_skips_missing_and_null_and_rejects_non_numbers():
    check_ranges({"x": None}, {"x": ">= 1", "y": "> 0"})
    with pytest.raises(ConfigError, match=r"method\.x must be a number \(got 'abc'\)"):
        check_ranges({"x": "abc"}, {"x": ">= 1"})


def test_every_method_declares_parseable_ranges_that_its_defaults_meet():
    from moram_bench import registry

    registry.discover()
    for name, cls in registry.METHODS.items():
        cfg = resolve_config([f"method={name}"] + (["stream=trace-mini"] if "image" not in cls.modalities else []))
        cls.validate_config(cfg.method)  # the shipped defaults are valid


def test_olora_orders_are_one_stream_and_the_old_names_are_aliases():
    from moram_bench.rundir import comparable

    for n in range(1, 7):
        old = resolve_config([f"stream=olora-order{n}", "method=seq-lora"])
        new = resolve_config(["stream=olora", f"stream.order={n}", "method=seq-lora"])
        assert old.stream.name == f"olora-order{n}" and old.stream.order == n
        a, b = comparable(old), comparable(new)
        a["stream"].pop("name"), b["stream"].pop("name")
        assert a == b  # the alias is exactly the stream with its order
    assert resolve_config(["stream=olora-order5", "stream.max_train=7"]).stream.max_train == 7
