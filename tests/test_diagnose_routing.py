"""scripts/diagnose_routing.py: a tiny 2-task run on the embedded xtail-mini stream.

Uses the real mini-clip backbone (built into the cache on first use, as in
test_xtail_mini.py) and 3 training steps per task, 8 test images per domain.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "diagnose_routing.py"
GROUPS = ("MiniLM linears", "text.proj", "visual.head.conv_head", "visual.head.proj")


def load_script():
    spec = importlib.util.spec_from_file_location("diagnose_routing", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_moram_run_reports_real_routing(capsys, monkeypatch):
    mod = load_script()
    seen = {}
    real_render = mod.render

    def keep(result):
        seen["r"] = result
        return real_render(result)

    monkeypatch.setattr(mod, "render", keep)
    assert mod.main(["--iterations", "3", "--test-items", "8"]) == 0
    out = capsys.readouterr().out
    r = seen["r"]

    # the tables
    assert out.startswith("## moram, image side tokens, tau 0.01: fashion_mnist -> digits "
                          "(xtail-mini, seed 42)")
    assert ("`python scripts/diagnose_routing.py --method moram --image-side tokens --iterations 3 "
            "--test-items 8`") in out
    assert "### Accuracy (%) per test domain\n\n| after | fashion_mnist | digits |" in out
    assert "| task 2 (digits) |" in out
    assert "### Routing while training digits (task 2 of 2)" in out
    assert "Per layer: 16 frozen + 16 new atoms, top-16 of 32." in out
    for g in GROUPS:
        assert f"| {g} | " in out
    assert "| position | `[CLS]` | `a` | `photo` | `of` | `the` | `number` | `(varies)` | `.` | `[SEP]` |" in out
    assert "### Atoms after the last task" in out
    assert "### Routing report after the last task" in out
    assert "| digits | " in out.split("### Routing report after the last task")[1]

    # accuracy: untrained + one row per task, 8 test images per domain
    assert r["test_items"] == [8, 8]
    assert len(r["accuracy"]) == 3 and all(len(row) == 2 for row in r["accuracy"])
    assert all(0.0 <= v <= 100.0 for row in r["accuracy"] for v in row)

    first, last = r["training"][0]["groups"], r["training"][1]["groups"]
    assert set(first) == set(GROUPS) == set(last)
    # every call of every memory was seen: text.proj reads the 10 class prompts per step,
    # conv_head 4 tokens of each of the 32 images, the image projection one vector per image
    for s in (first, last):
        assert s["text.proj"]["tokens"] == 3 * 10
        assert s["visual.head.conv_head"]["tokens"] == 3 * 32 * 4
        assert s["visual.head.proj"]["tokens"] == 3 * 32
        assert s["MiniLM linears"]["layers"] == 36
    # task 1: every atom is new, so every winner, every top-k slot and all the weight are new
    for g in GROUPS:
        assert first[g]["new_win_share"] == 1.0
        assert first[g]["new_slot_share"] == 1.0
        assert first[g]["new_weight_share"] == pytest.approx(1.0, abs=1e-6)
    # task 2: 16 frozen + 16 new atoms, top-16 -> real shares strictly inside (0, 1) for the
    # slots; the others in [0, 1]; the winner's weight is at least 1/16
    for g in GROUPS:
        d = last[g]
        for key in ("new_win_share", "new_weight_share", "new_slot_share"):
            assert 0.0 <= d[key] <= 1.0, (g, key, d[key])
        assert 0.0 < d["new_slot_share"] < 1.0
        assert 1 / 16 <= d["winner_weight"] <= 1.0
    positions = r["training"][1]["text_positions"]
    assert [lab for lab, _ in positions][:3] == ["[CLS]", "a", "photo"]
    assert all(0.0 <= v <= 1.0 for _, v in positions)
    # the probe's routing (recomputed from the inputs) equals the memories' own statistics
    assert r["probe_check"] < 1e-5

    # fresh keys: kaiming_uniform(a=sqrt(5)) rows have norm sqrt(1/3) in expectation
    for g in GROUPS:
        for norm in r["atoms"][g]["fresh_key_norm"]:
            assert abs(norm - math.sqrt(1 / 3)) < 0.05

    # the routing report: rows are test domains, shares of the routing weight summing to 1
    routing = r["routing"]
    assert len(routing) == 2
    for row in routing:
        assert all(0.0 <= v <= 1.0 for v in row)
        assert sum(row) == pytest.approx(1.0, abs=1e-6)


def test_plain_loop_trains_exactly_as_the_runners_trainer(tmp_path):
    """Two steps per task through the script's loop and through ``fit``'s Lightning
    Trainer (runner.make_trainer) give the same weights."""
    from lightning.fabric.utilities.seed import seed_everything

    from moram_bench import logs, runner
    from moram_bench.config import resolve_config
    from moram_bench.tblog import RunLogger

    mod = load_script()
    torch.set_num_threads(1)
    logs.quiet_run()
    args = mod.parse_args(["--iterations", "2"])
    states = []
    for way in ("loop", "trainer"):
        cfg = resolve_config(mod.overrides(args))
        built = runner.build(cfg)
        m = built.module
        for t in range(len(built.stream)):
            seed_everything(args.seed * 1000 + t, verbose=False)
            m.meta_begin_task(t, built.data)
            if way == "loop":
                mod.train_task(m, built.data, t, built.steps[t], None)
            else:
                built.data.set_task(t)
                trainer = runner.make_trainer(cfg, RunLogger(tmp_path / f"log{t}"), [], max_steps=built.steps[t],
                                              label="check")
                trainer.fit(m, datamodule=built.data)
            m.meta_end_task(t, built.data)
        states.append(m.grown_state())
    loop, fit = states
    assert set(loop) == set(fit)
    assert any(float(v.abs().max()) > 0 for v in loop.values())  # something was trained
    for k in loop:
        torch.testing.assert_close(loop[k], fit[k], rtol=0, atol=1e-6)


def test_tau_is_for_moram_only():
    mod = load_script()
    with pytest.raises(SystemExit):
        mod.parse_args(["--method", "seq-lora", "--tau", "0.1"])
    args = mod.parse_args(["--method", "moram", "--tau", "0.1", "--domains", "digits,fashion_mnist"])
    assert "method.tau=0.1" in mod.overrides(args)
    assert "stream.domains=[digits,fashion_mnist]" in mod.overrides(args)
    assert mod.command(args) == ("python scripts/diagnose_routing.py --method moram --image-side tokens "
                                 "--tau 0.1 --domains digits,fashion_mnist")
